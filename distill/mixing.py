"""Weighted mixing of several sets: how many items each set contributes, and which ones.

Pure functions, shared by every stage that mixes (imported trace sets today). A mix is exact and
reproducible: each item gets a 64-bit hash of (seed, its key); a set contributing `q` of its `n`
items keeps the `q` with the smallest hashes. So the proportions are the targets to one item of
rounding (not a coin flip per item, whose noise at 1,000 items is +-1.5%), the same seed keeps the
same items on any machine and in any order, and the kept items are a uniform sample of the set.
The cost is one pass that hashes every candidate item before the pass that keeps them, and
8 bytes per item while a set's threshold is found.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np


class MixError(ValueError):
    pass


def mix_hash(seed: int, key: str) -> int:
    """The item's rank key: uniform over 64 bits, a function of (seed, key) only."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest(), "little")


def quotas(counts: Sequence[int], weights: Sequence[float], total: int | None = None,
           names: Sequence[str] | None = None) -> list[int]:
    """Items each set contributes so that shares follow `weights` (normalised). `total` unset:
    the largest mix the sets hold without repeating an item (the set that runs out first sets
    it). Rounding by largest remainder, so the quotas add up to the total exactly."""
    if len(counts) != len(weights) or not counts:
        raise MixError("need one weight per set, and at least one set")
    names = list(names or [f"set {i}" for i in range(len(counts))])
    if any(w <= 0 for w in weights):
        raise MixError("weights must be positive")
    share = [w / sum(weights) for w in weights]
    if total is None:
        total = min(math.floor(n / p + 1e-9) for n, p in zip(counts, share))
    exact = [p * total for p in share]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
        out[i] += 1
    short = [f"{names[i]!r} needs {q} but holds {n}" for i, (q, n) in enumerate(zip(out, counts)) if q > n]
    if short:
        raise MixError(f"a mix of {total} at these weights cannot be made without repeating items: "
                       f"{'; '.join(short)}")
    return out


def threshold(hashes: np.ndarray, quota: int) -> int:
    """The largest hash an item may have to be kept: the `quota`-th smallest (-1: keep none).
    `hashes` are one set's items' `mix_hash`es (uint64)."""
    if quota <= 0:
        return -1
    if quota >= len(hashes):
        return (1 << 64) - 1
    return int(np.partition(np.asarray(hashes, dtype=np.uint64), quota - 1)[quota - 1])
