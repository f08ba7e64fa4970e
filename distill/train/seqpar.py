"""Ulysses sequence parallelism for packed rows: each rank of a group of `degree` ranks holds a
contiguous 1/degree of every row, and attention trades that sequence split for a head split.

Outside attention every op is per token (embeddings, norms, MLP, rotary on per-token position
ids, the loss on already-shifted labels), so a rank runs the unmodified model on its shard. Before
attention one all-to-all turns q/k/v from [local tokens, all heads] into [all tokens, heads /
degree]; the existing packed attention then runs on whole rows with the row's GLOBAL cu_seqlens
(a sample crossing a shard boundary is whole again), and a second all-to-all turns the output
back. Cost per layer: 2 all-to-alls in forward (q, k and v go together in one), 2 in backward
and 2 more where activation checkpointing recomputes the layer, each moving (degree - 1) / degree
of its tensor off the rank; activation and logits memory / degree. The attention itself is not
split by sequence, so its cost per rank is the whole rows' for heads / degree heads.

Gradients: the ranks of a group hold the same parameters and each backpropagates the loss of its
own shard's targets; the all-to-all's backward carries the other shards' contributions across, so
the SUM over the group's ranks of their parameter gradients is the gradient of the whole row's
loss. A backend that sums (or averages and rescales) gradients over every rank therefore needs no
extra reduction for the group, and the loss normaliser must count each target once (the plan's
global batch counts rows, and the group's ranks read the same rows).

Key/value heads must divide by the degree too (checked with the heads in `shape.shape_problems`):
each rank then holds whole GQA groups (its query heads and the kv heads they read). Replicating kv
heads instead would allow larger degrees for GQA students at the cost of kv all-to-all traffic;
not done.

Only torch.distributed here: the backend builds the groups and turns sharding on around its
forward and backward (`sharded`); the attention asks `active()`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from distill.train.packing import PackedBatch


@dataclass(frozen=True)
class SeqGroup:
    """This rank's sequence-parallel group: `degree` consecutive ranks sharing the same rows."""

    group: object
    """The torch.distributed process group of those ranks."""
    index: int
    """This rank's place in the group: it holds tokens [index * T / degree, (index + 1) * T / degree)."""
    degree: int


def new_groups(degree: int) -> SeqGroup | None:
    """Split the default group into groups of `degree` consecutive ranks; this rank's (None for
    degree 1). Every rank must call it (each `new_group` is collective over the world), in the
    same order. Consecutive ranks share a node when ranks fill nodes in order, which keeps the
    all-to-alls on the fastest links."""
    import torch.distributed as dist

    if degree == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % degree:
        raise ValueError(f"train.deepspeed.sequence_parallel={degree} does not divide the world of {world} ranks: "
                         "change train.launch.num_workers or the degree")
    mine = None
    for first in range(0, world, degree):
        group = dist.new_group(list(range(first, first + degree)))
        if first <= rank < first + degree:
            mine = SeqGroup(group=group, index=rank - first, degree=degree)
    return mine


def shard_batch(batch: "PackedBatch", seq: SeqGroup | None) -> "PackedBatch":
    """This rank's contiguous slice of every row: input ids, labels (already shifted, so the slice's
    targets are exactly the row's targets at those positions) and per-sample position ids.
    cu_seqlens and max_seqlen stay the whole row's: attention runs over whole rows after the
    all-to-all. n_target_tokens counts the slice's targets."""
    from distill.train.data import IGNORE_INDEX
    from distill.train.packing import PackedBatch

    if seq is None:
        return batch
    t = batch.input_ids.shape[1]
    if t % seq.degree:
        raise ValueError(f"rows of {t} tokens do not split into train.deepspeed.sequence_parallel={seq.degree} "
                         "equal shards: make train.seq_len a multiple of it")
    n = t // seq.degree
    cut = slice(seq.index * n, (seq.index + 1) * n)
    labels = batch.labels[:, cut]
    return PackedBatch(batch.input_ids[:, cut], labels, batch.position_ids[:, cut], batch.cu_seqlens,
                       batch.max_seqlen, int((labels != IGNORE_INDEX).sum()))


_ACTIVE: list[SeqGroup] = []
"""The group whose sharded forward/backward is running (set by `sharded`). A module global, not a
context variable: under activation checkpointing the forward is recomputed inside backward, which
on CUDA runs in autograd's own thread."""


@contextmanager
def sharded(seq: SeqGroup | None) -> Iterator[None]:
    """Within: the packed attention treats its inputs as this rank's shard of `seq`'s rows. Wrap the
    forward AND the backward (recomputed layers call attention again). No-op for None."""
    if seq is None:
        yield
        return
    _ACTIVE.append(seq)
    try:
        yield
    finally:
        _ACTIVE.pop()


def active() -> SeqGroup | None:
    return _ACTIVE[-1] if _ACTIVE else None


@cache
def _all_to_all_fn():
    """The autograd Function, built on first use (torch is imported lazily, as elsewhere)."""
    import torch
    import torch.distributed as dist

    def exchange(x, group):
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    class AllToAll(torch.autograd.Function):
        """[degree, ...] -> [degree, ...]: slot j goes to rank j, slot i of the result came from rank
        i. It is its own adjoint (out_r[i] = x_i[r] is a transpose of (rank, slot)), so backward is
        the same exchange of the gradients."""

        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return exchange(x.contiguous(), group)

        @staticmethod
        def backward(ctx, grad):
            return exchange(grad.contiguous(), ctx.group), None

    return AllToAll


def all_to_all(x, group):
    """Autograd-aware all-to-all of a [degree, ...] tensor over `group` (gloo and NCCL both have
    `all_to_all_single`)."""
    return _all_to_all_fn().apply(x, group)


def gather_sequence(query, key, value, seq: SeqGroup):
    """q [B, H, t, D], k/v [B, Hkv, t, D] of this rank's t tokens -> the whole rows' T = t * degree
    tokens for this rank's H / degree query heads and Hkv / degree kv heads (head chunk `index`).
    q, k and v travel in ONE all-to-all (one latency instead of three)."""
    import torch

    b, h, t, d = query.shape
    hkv, p = key.shape[1], seq.degree
    if h % p or hkv % p:
        raise ValueError(f"train.deepspeed.sequence_parallel={p} must divide the attention heads ({h}) and "
                         f"key/value heads ({hkv})")
    # [B, heads, t, D] -> [degree (destination = head chunk), B, heads / degree, t, D]
    send = torch.cat([x.view(b, p, x.shape[1] // p, t, d).transpose(0, 1) for x in (query, key, value)], dim=2)
    recv = all_to_all(send, seq.group)  # [degree (source = sequence shard), B, heads / degree, t, D]
    whole = recv.permute(1, 2, 0, 3, 4).reshape(b, -1, p * t, d)
    return whole.split([h // p, hkv // p, hkv // p], dim=1)


def scatter_sequence(out, seq: SeqGroup):
    """Attention output [B, T, H / degree, D] over whole rows -> [B, t, H, D] for this rank's
    tokens (the inverse exchange of `gather_sequence`)."""
    b, big_t, hl, d = out.shape
    p = seq.degree
    t = big_t // p
    # [B, T, h, D] -> [degree (destination = sequence shard), B, t, h, D]
    send = out.view(b, p, t, hl, d).transpose(0, 1)
    recv = all_to_all(send, seq.group)  # [degree (source = head chunk), B, t, h, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, t, p * hl, d)
