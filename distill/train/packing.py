"""Packing samples into fixed-length rows, and the deterministic stream of optimizer steps.

Rows are `seq_len` tokens holding several whole samples (best-fit-decreasing bins), padded at
the end. Each sample keeps its own positions (0, 1, ...) and its own attention segment
(`cu_seqlens`), so a packed row computes exactly what the samples would alone; padding is one
more segment whose labels are all -100.

The step plan is pure arithmetic over the packed rows: every rank computes the same plan from
the same cache and seed, takes its own slice of each global batch, and knows the global
batch's target-token count without a collective (that count is the loss normaliser).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from distill.train.data import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

    from distill.train.data import TokenCache


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= capacity. Deterministic: samples are taken
    longest first (ties by index) and each goes into the fullest bin that still fits it (among
    equally full bins, the one filled last).

    Open bins are grouped by free space, and there are at most `capacity` distinct amounts, so
    each placement is a search over those amounts, not over the bins: ~3.5 s for a million
    samples at capacity 8192."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        i = int(lengths.argmax())
        raise ValueError(f"sample {i} has {lengths[i]} tokens, more than a row of {capacity}; "
                         "build the token cache with max_len <= seq_len")
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"sample {int(lengths.argmin())} is empty")
    bins: list[list[int]] = []
    sizes: list[int] = []  # sorted free amounts that some open bin has
    by_size: dict[int, list[int]] = {}  # free amount -> bins with exactly that much free
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        at = bisect.bisect_left(sizes, n)
        if at == len(sizes):
            bins.append([i])
            b, room = len(bins) - 1, capacity - n
        else:
            room = sizes[at]
            group = by_size[room]
            b = group.pop()
            if not group:
                del by_size[room], sizes[at]
            bins[b].append(i)
            room -= n
        if room > 0:
            if room not in by_size:
                bisect.insort(sizes, room)
                by_size[room] = []
            by_size[room].append(b)
    return bins


def packing_efficiency(cache_or_lengths, bins: list[list[int]], seq_len: int) -> float:
    """Real tokens / (rows * seq_len): the share of computed positions that are not padding."""
    lengths = np.asarray(getattr(cache_or_lengths, "lengths", cache_or_lengths))
    if not bins:
        return 0.0
    return float(sum(int(lengths[b].sum()) for b in map(list, bins)) / (len(bins) * seq_len))


@dataclass
class PackedBatch:
    """One micro-batch: B packed rows of seq_len tokens."""

    input_ids: "torch.Tensor"
    """long [B, T]"""
    labels: "torch.Tensor"
    """long [B, T], shifted (labels[t] is the target after input_ids[:t+1]); -100 on padding."""
    position_ids: "torch.Tensor"
    """long [B, T]: restart at 0 for each sample (the padding is a segment of its own)."""
    cu_seqlens: "torch.Tensor"
    """int32 [n_segments + 1]: segment boundaries over the flattened B*T tokens."""
    max_seqlen: int
    n_target_tokens: int
    """(labels != -100).sum()"""

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device),
                           self.cu_seqlens.to(device), self.max_seqlen, self.n_target_tokens)


def make_batch(cache: "TokenCache", bins: list[list[int]], seq_len: int, *, pad_id: int = 0) -> PackedBatch:
    """Rows of whole samples, in bin order, padded to seq_len with `pad_id` (never a target and
    attended only by other padding, so its value does not matter)."""
    import torch

    rows = len(bins)
    ids = np.full((rows, seq_len), pad_id, dtype=np.int64)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((rows, seq_len), dtype=np.int64)
    bounds = [0]
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            x, y = cache.sample(int(i))
            n = len(x)
            if at + n > seq_len:
                raise ValueError(f"bin {r} holds {at + n}+ tokens, more than seq_len={seq_len}")
            ids[r, at:at + n], labels[r, at:at + n], pos[r, at:at + n] = x, y, np.arange(n)
            at += n
            bounds.append(r * seq_len + at)
        if at < seq_len:
            pos[r, at:] = np.arange(seq_len - at)
            bounds.append((r + 1) * seq_len)
    cu = np.asarray(bounds, dtype=np.int32)
    return PackedBatch(
        input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels), position_ids=torch.from_numpy(pos),
        cu_seqlens=torch.from_numpy(cu), max_seqlen=int(np.diff(cu).max()) if len(cu) > 1 else 0,
        n_target_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def _target_counts(cache_or_counts) -> np.ndarray:
    return np.asarray(getattr(cache_or_counts, "n_targets", cache_or_counts))


@dataclass
class StepPlan:
    """The data stream, deterministic for (cache, seq_len, seed, epochs)."""

    bins: list[list[int]]
    """Shuffled (seeded) order of packed rows, epochs concatenated."""

    def _global(self, world: int, micro_batch: int, grad_accum: int) -> int:
        if min(world, micro_batch, grad_accum) < 1:
            raise ValueError(f"world={world}, micro_batch={micro_batch}, grad_accum={grad_accum}: all must be >= 1")
        return world * micro_batch * grad_accum

    def num_steps(self, world: int, micro_batch: int, grad_accum: int) -> int:
        """Full global batches in the stream; the last < one global batch of rows is left out
        (only at the end of the last epoch, since epochs are concatenated first)."""
        return len(self.bins) // self._global(world, micro_batch, grad_accum)

    def _step_rows(self, step: int, world: int, micro_batch: int, grad_accum: int) -> list[list[int]]:
        g = self._global(world, micro_batch, grad_accum)
        if not 0 <= step < self.num_steps(world, micro_batch, grad_accum):
            raise IndexError(f"step {step} is outside the plan's {self.num_steps(world, micro_batch, grad_accum)} steps")
        return self.bins[step * g:(step + 1) * g]

    def micro_batches(self, step: int, rank: int, world: int, micro_batch: int, grad_accum: int) -> list[list[list[int]]]:
        """The bins for each of `grad_accum` micro-batches of `rank` at optimizer step `step`.

        Rank r takes the r-th contiguous share of the step's rows, so the global batch is the
        same set of rows whatever the split into ranks and accumulation steps."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        rows = self._step_rows(step, world, micro_batch, grad_accum)
        mine = rows[rank * micro_batch * grad_accum:(rank + 1) * micro_batch * grad_accum]
        return [mine[j * micro_batch:(j + 1) * micro_batch] for j in range(grad_accum)]

    def global_target_tokens(self, step: int, world: int, micro_batch: int, grad_accum: int, lengths_or_cache) -> int:
        """Target tokens in the WHOLE global batch of that step (all micro-batches, all ranks) —
        computable by every rank from the plan, so loss normalisation needs no extra collective.

        `lengths_or_cache` is the TokenCache, or its per-sample target counts (`cache.n_targets`):
        the normaliser counts targets, not tokens."""
        counts = _target_counts(lengths_or_cache)
        return int(sum(int(counts[b].sum()) for b in self._step_rows(step, world, micro_batch, grad_accum)))


def plan_steps(cache: "TokenCache", seq_len: int, *, seed: int, epochs: int) -> StepPlan:
    """Pack once, then shuffle the rows afresh for each epoch (seed, epoch) and concatenate."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: must be >= 1")
    rows = best_fit_decreasing(cache.lengths, seq_len)
    stream: list[list[int]] = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        stream += [rows[i] for i in order]
    return StepPlan(bins=stream)
