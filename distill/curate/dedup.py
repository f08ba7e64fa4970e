"""Question dedup: exact copies after normalisation, near copies by MinHash LSH (pure functions).

Two questions are exact duplicates when `normalize_text` maps them to the same string (case,
spacing, punctuation, LaTeX spelling, number formatting and prompt wrappers differ). They are near
duplicates when the Jaccard similarity of their word-shingle sets (word n-grams of `word_tokens`)
is at least `threshold`; MinHash LSH only proposes candidate pairs, and every pair is confirmed
with the exact Jaccard of the two shingle sets, so the LSH's false positives cost time, never a
wrongly dropped question.

Representative rule: questions are taken in the given input order and the first one of a group
wins. A later question is compared with the questions kept so far and dropped as a copy of the
most similar one (ties: the earliest). So every dropped question names a kept question it
duplicates, and the result depends on the input order and `seed`, nothing else (no Python hash
randomisation, no worker timing). Callers that want a stable choice pass the questions in source
order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Literal

import numpy as np
from pydantic import Field, model_validator

from distill.curate.normalize import normalize_text, words_of_normalized
from distill.section import Section

_SCHEME = "affine32"
"""datasketch's MinHash scheme (its 2.x default), named explicitly because signatures computed in
one process are turned back into MinHash objects in another."""


class DedupConfig(Section):
    exact: bool = True
    """Drop questions whose normalised text equals an earlier question's (cheap: one dict)."""

    near: bool = True
    """Drop questions whose word shingles overlap an earlier kept question's by at least
    `threshold` Jaccard (MinHash LSH candidates, confirmed exactly). Costs one MinHash per
    question (~0.4 ms for a GSM8K question, parallel per shard) and an in-memory LSH index."""

    threshold: float = 0.8
    """Jaccard similarity of word-shingle sets at or above which two questions are near
    duplicates. Lower merges more reworded copies but also distinct questions that share a
    template: on the 7,473 GSM8K train questions 0.8 merges one pair (a true duplicate), 0.7
    merges several distinct ones."""

    num_perm: int = Field(default=128, ge=16)
    """MinHash permutations: more give better LSH recall near the threshold at linear cost in
    time and signature memory (4 bytes each)."""

    shingle: int = Field(default=2, ge=1)
    """Word n-gram size of the shingles. One edited word changes up to n shingles, so larger n
    misses one-word edits of short questions (3 misses ~1 in 20 on GSM8K, 2 almost none);
    1 ignores word order entirely."""

    seed: int = 1
    """MinHash permutation seed. The result depends on it only through which near-threshold pairs
    the LSH proposes; exact Jaccard decides."""

    @model_validator(mode="after")
    def _check(self) -> "DedupConfig":
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"curate.dedup.threshold={self.threshold}: must be in (0, 1]")
        return self


@dataclass(frozen=True)
class Duplicate:
    """Why a question was dropped."""

    kept_id: str
    """The kept question it duplicates."""
    method: Literal["exact", "near"]
    score: float
    """Exact Jaccard similarity of the two word-shingle sets (1.0 for exact duplicates)."""
    estimate: float | None = None
    """MinHash estimate of the same similarity (near duplicates only)."""


@dataclass
class DedupResult:
    kept: list[str] = field(default_factory=list)
    """Ids of kept questions, in input order."""
    dropped: dict[str, Duplicate] = field(default_factory=dict)
    """Dropped id -> its kept representative, method and similarity."""


def shingle_set(normalized: str, n: int) -> set[str]:
    """Word n-grams of an already normalised text, each joined by spaces (the whole text as one
    shingle if it has fewer than n words; empty for a text without words)."""
    words = words_of_normalized(normalized)
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def shingle_hashes(normalized: str, n: int) -> np.ndarray:
    """`shingle_set` as a sorted array of distinct 64-bit hashes: ~8 bytes a shingle instead of
    ~100 for a string in a set, so the dedup stage can hold the shingles of every candidate of a
    template-heavy set. Jaccard over the hashes equals Jaccard over the strings unless two
    shingles of a pair collide (~n^2 / 2^64)."""
    return np.unique(np.fromiter((int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                                  for g in shingle_set(normalized, n)), dtype=np.uint64))


def jaccard_hashes(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def pair_scores(pairs: np.ndarray, shingles: dict[int, np.ndarray]) -> np.ndarray:
    """Exact Jaccard of each candidate pair (rows i, j), from `shingle_hashes` per row."""
    return np.array([jaccard_hashes(shingles[i], shingles[j]) for i, j in pairs.tolist()], dtype=np.float64)


LSH_RECALL = 0.99
"""Least probability that the LSH proposes a pair whose Jaccard is exactly at the threshold
(higher above it). datasketch's default band layout balances false positives against false
negatives and finds only ~40% of pairs at the threshold; here false positives cost just an exact
Jaccard check, so the layout is chosen for recall."""


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows per band) for MinHash LSH: the most rows per band (fewest spurious candidates)
    such that a pair at Jaccard `threshold` collides in at least one band with probability
    >= `recall`, i.e. 1 - (1 - threshold**rows)**bands >= recall, bands = num_perm // rows."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def minhash_signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures of the texts' word shingles, `uint32[len(texts), cfg.num_perm]`.

    Pure and row-independent, so a stage can compute them per shard in parallel and concatenate.
    Texts are normalised here, the same way `dedup_questions` does."""
    from datasketch import MinHash

    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME)
    for row, text in enumerate(texts):
        # Sharing the template's permutations skips re-drawing them per text (~40% of the cost).
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=template.permutations, scheme=_SCHEME)
        m.update_batch([s.encode("utf-8") for s in sorted(shingle_set(normalize_text(text), cfg.shingle))])
        out[row] = m.hashvalues
    return out


def exact_key(normalized: str) -> int:
    """64-bit key of a normal form: equal forms, equal keys (two different forms collide with
    probability ~2^-64 per pair, ~3e-8 over a million questions)."""
    return int.from_bytes(hashlib.blake2b(normalized.encode(), digest_size=8).digest(), "little")


def band_hashes(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """`uint64[n, bands]`: each LSH band of each signature hashed to one number (the layout of
    `lsh_params`). Two questions are LSH candidates when they share a value in some column; 64
    bits per band instead of the band's rows x 4 bytes, so a million questions cost ~8 MB a band."""
    num_perm = signatures.shape[1]
    bands, rows = lsh_params(threshold, num_perm)
    out = np.empty((signatures.shape[0], bands), dtype=np.uint64)
    for b in range(bands):
        block = np.ascontiguousarray(signatures[:, b * rows:(b + 1) * rows])
        out[:, b] = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") for row in block]
    return out


def pairs_sharing_value(col: np.ndarray) -> np.ndarray:
    """`int64[k, 2]` row pairs (i < j) with equal values in one band column: sort it and pair up
    the rows of each run of equal values (a run of m rows gives m(m-1)/2 pairs: a template many
    questions share costs as many comparisons as an LSH index would)."""
    order = np.argsort(col, kind="stable")
    sorted_col = col[order]
    starts = np.flatnonzero(np.r_[True, sorted_col[1:] != sorted_col[:-1]])
    ends = np.r_[starts[1:], len(col)]
    found = []
    for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        rows = np.sort(order[lo:hi])
        i, j = np.triu_indices(len(rows), k=1)
        found.append(np.stack([rows[i], rows[j]], axis=1))
    return np.concatenate(found).astype(np.int64) if found else np.empty((0, 2), dtype=np.int64)


def candidate_pairs(bands: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """`int64[k, 2]` row pairs (i < j) that share a value in at least one band, each once.
    `bands` is the `band_hashes` matrix or its columns one at a time (so a caller can read one
    band column from disk at a time: memory is one column and the pairs)."""
    columns = bands.T if isinstance(bands, np.ndarray) else bands
    found = [pairs_sharing_value(np.asarray(col)) for col in columns]
    found = [f for f in found if len(f)]
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


def resolve_near(pairs: np.ndarray, scores: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """Which questions are near copies, given candidate `pairs` (rows in input order, i < j) and
    their exact Jaccard `scores`: rows are taken in order and a row with a kept earlier row at
    or above `threshold` is dropped as a copy of the most similar one (ties: the earliest).
    Returns dropped row -> (kept row, score). The same decisions as querying an LSH index of the
    kept rows one by one, since the index proposes exactly the pairs sharing a band."""
    keep = scores >= threshold
    pairs, scores = pairs[keep], scores[keep]
    order = np.lexsort((pairs[:, 0], pairs[:, 1]))
    dropped: dict[int, tuple[int, float]] = {}
    best: tuple[int, int, float] | None = None  # (later row, earlier row, score)
    for (i, j), score in zip(pairs[order].tolist(), scores[order].tolist()):
        if best is not None and best[0] != j:
            dropped[best[0]] = (best[1], best[2])
            best = None
        if i in dropped:
            continue
        if best is None or score > best[2]:
            best = (j, i, score)
    if best is not None:
        dropped[best[0]] = (best[1], best[2])
    return dropped


def dedup_questions(
    ids: list[str], texts: list[str], cfg: DedupConfig, signatures: np.ndarray | None = None
) -> DedupResult:
    """Exact then near dedup of questions; the first of each group in input order is kept.

    `signatures` (from `minhash_signatures(texts, cfg)`, rows aligned with `texts`) may be passed
    when computed elsewhere; they are computed here otherwise. Each dropped question names the
    kept question it duplicates: for near copies, the most similar kept one (ties: earliest).
    The dedup stage runs the same steps (`exact_key`, `band_hashes`, `candidate_pairs`,
    `resolve_near`) over partitions without holding the texts."""
    if len(ids) != len(texts):
        raise ValueError(f"dedup_questions: {len(ids)} ids but {len(texts)} texts")
    if len(set(ids)) != len(ids):
        raise ValueError("dedup_questions: question ids must be unique")
    result = DedupResult()
    normalized = [normalize_text(t) for t in texts]

    candidates = []
    first_of: dict[str, int] = {}
    for i, norm in enumerate(normalized):
        if cfg.exact and norm in first_of:
            result.dropped[ids[i]] = Duplicate(ids[first_of[norm]], "exact", 1.0)
        else:
            first_of.setdefault(norm, i)
            candidates.append(i)

    if not cfg.near:
        result.kept = [ids[i] for i in candidates]
        return result

    if signatures is None:
        signatures = minhash_signatures(texts, cfg)
    if signatures.shape != (len(texts), cfg.num_perm):
        raise ValueError(
            f"dedup_questions: signatures have shape {signatures.shape}, expected "
            f"({len(texts)}, {cfg.num_perm}) (curate.dedup.num_perm)"
        )
    rows = np.asarray(candidates, dtype=np.int64)
    pairs = rows[candidate_pairs(band_hashes(signatures[rows], cfg.threshold))] if len(rows) else np.empty((0, 2), np.int64)
    scores = pair_scores(pairs, {i: shingle_hashes(normalized[i], cfg.shingle) for i in np.unique(pairs).tolist()})
    near = resolve_near(pairs, scores, cfg.threshold)
    for i in candidates:
        if i in near:
            j, score = near[i]
            estimate = float(np.mean(signatures[i] == signatures[j]))
            result.dropped[ids[i]] = Duplicate(ids[j], "near", score, estimate)
        else:
            result.kept.append(ids[i])
    return result
