"""The training loss: summed token cross-entropy, normalised by the global batch's target count.

The step's loss for one micro-batch is `token_loss_sum(...)[0] / global_target_tokens`, where
the denominator counts target tokens in the WHOLE global batch (every micro-batch of every
rank, see `StepPlan.global_target_tokens`). Summed over micro-batches and, by a gradient
all-reduce SUM, over ranks, this is exactly the mean token loss of the global batch, so the
gradient does not depend on how the batch is split. A per-micro-batch mean would weight a
token in a short micro-batch more than one in a long micro-batch.

Backends that average gradients over ranks or divide by accumulation steps (DeepSpeed does
both) must multiply the loss by world * grad_accum to undo it.

The summed cross-entropy comes in two forms with the same value and gradients: `token_loss_sum`
over logits the caller made (dense), and `chunked_token_loss_sum` from the hidden states and the
output weight, a chunk of targets at a time (train.loss_chunk), optionally over a tensor-parallel
group's vocabulary slices (the Megatron backend).
"""

from __future__ import annotations

import functools

from distill.train.data import IGNORE_INDEX


def token_loss_sum(logits, labels) -> tuple["torch.Tensor", int]:  # noqa: F821
    """Summed cross-entropy (fp32) over labels != -100 and that count. Labels already shifted.

    `logits` is [..., V] and `labels` the matching [...]. The count is read back with `.item()`:
    a device sync; callers that already know it (PackedBatch.n_target_tokens) may ignore it."""
    import torch.nn.functional as F

    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_labels,
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((flat_labels != IGNORE_INDEX).sum().item())


def normalised_loss(loss_sum, global_target_tokens: int):
    """The micro-batch's share of the global mean loss."""
    if global_target_tokens <= 0:
        raise ValueError("the global batch has no target tokens; nothing to learn from this step")
    return loss_sum / global_target_tokens


def _chunk_logits(h, weight, valid: int, softcap: float | None):
    """fp32 logits of one chunk over this rank's vocabulary slice, and tanh(z / cap) when softcapped.

    The matmul runs in the inputs' dtype and is then upcast, as the dense path's
    `head(hidden).float()` does; columns past `valid` (Megatron's vocabulary padding) are -inf."""
    import torch

    z = torch.mm(h, weight.t())
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # fp32, or fp64 for fp64 inputs (tests)
    t = None
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if valid < z.shape[1]:
        z[:, valid:] = float("-inf")
    return z, t


def _all_reduce(x, op: str, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, op=getattr(dist.ReduceOp, op), group=group)
    return x


@functools.cache
def _chunked_ce_class():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Summed cross-entropy of softcap(hidden @ weight.T) without the [n, vocab] logits.

        Forward keeps only each row's log-sum-exp (n fp32 values); backward recomputes each
        chunk's logits and turns them into the chunk's gradients. The alternative (Liger's:
        compute the gradients during forward) saves that second matmul but holds a [vocab,
        hidden] weight gradient from forward to backward (1.1 GB in bf16 for a 7B student) and
        computes gradients when no backward follows (evaluation). Recomputing costs one more
        [chunk, hidden] x [hidden, vocab] matmul per chunk: 4 instead of 3 output-projection
        matmuls, and the head is ~15% (1.5B) to ~7% (7B) of a Qwen2 student's parameter FLOPs,
        so ~2-5% more per step.

        Under vocabulary parallelism (`group`), `weight` is this rank's slice of the vocabulary
        starting at `vocab_start`, of which the first `valid` rows are real tokens: the row max and
        the sum of exponentials are all-reduced over the group per chunk (two small collectives),
        the target logit comes from the rank that owns it. The gradient of `hidden` is then this
        rank's share (its slice's term); the caller's parallel region sums it over the group,
        as it does for Megatron's own vocabulary-parallel loss.

        chunk <= 0 is the dense case: one chunk whose fp32 logits are kept for backward instead
        of recomputed (memory n x vocab-slice x 4 bytes, no second matmul)."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk, softcap, vocab_start, valid, group):
            from distill.train.data import IGNORE_INDEX

            n = hidden.shape[0]
            dense = chunk <= 0 or chunk >= n
            step = max(n, 1) if dense else chunk
            acc = torch.promote_types(hidden.dtype, torch.float32)
            lse = torch.empty(n, dtype=acc, device=hidden.device)
            picked = torch.zeros(n, dtype=acc, device=hidden.device)
            local = labels - vocab_start
            owned = (labels != IGNORE_INDEX) & (local >= 0) & (local < valid)
            kept = None
            for s in range(0, n, step):
                z, t = _chunk_logits(hidden[s:s + step], weight, valid, softcap)
                rows = torch.arange(z.shape[0], device=z.device)
                picked[s:s + step] = torch.where(owned[s:s + step], z[rows, local[s:s + step].clamp(0, valid - 1)], 0.0)
                m = _all_reduce(z.max(dim=1).values, "MAX", group)
                if dense:
                    kept = (z, t)
                    e = (z - m[:, None]).exp_()
                else:
                    e = z.sub_(m[:, None]).exp_()  # z is not needed again: reuse its memory
                lse[s:s + step] = m + torch.log(_all_reduce(e.sum(dim=1), "SUM", group))
                del z, t, e
            # One collective for every chunk's target logit (a rank owns a target or adds 0).
            picked = _all_reduce(picked, "SUM", group)
            target = labels != IGNORE_INDEX
            loss = torch.where(target, lse - picked, 0.0).sum()
            ctx.save_for_backward(hidden, weight, labels, lse)
            ctx.kept = kept
            ctx.args = (step, softcap, vocab_start, valid)
            return loss

        @staticmethod
        def backward(ctx, grad_out):
            from distill.train.data import IGNORE_INDEX

            hidden, weight, labels, lse = ctx.saved_tensors
            step, softcap, vocab_start, valid = ctx.args
            kept, ctx.kept = ctx.kept, None
            n = hidden.shape[0]
            local = labels - vocab_start
            owned = (labels != IGNORE_INDEX) & (local >= 0) & (local < valid)
            target = (labels != IGNORE_INDEX).to(lse.dtype) * grad_out.to(lse.dtype)
            grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            for s in range(0, n, step):
                z, t = kept if kept is not None else _chunk_logits(hidden[s:s + step], weight, valid, softcap)
                kept = None
                # d(lse - z_y)/dz = softmax(z) - onehot(y), scaled by the incoming gradient; rows
                # without a target get 0.
                g = z.sub_(lse[s:s + step, None]).exp_()
                rows = torch.nonzero(owned[s:s + step]).squeeze(1)
                g[rows, local[s:s + step][rows]] -= 1.0
                g.mul_(target[s:s + step, None])
                if t is not None:  # through softcap: d(cap * tanh(x / cap))/dx = 1 - tanh^2
                    g.mul_(1.0 - t * t)
                g = g.to(weight.dtype)
                if grad_h is not None:
                    torch.mm(g, weight, out=grad_h[s:s + step])
                if grad_w is not None:
                    # Accumulated in the weight's dtype: one rounding per chunk in bf16 (as Liger
                    # does), instead of an fp32 [vocab, hidden] buffer (2.2 GB for a 7B student).
                    grad_w.addmm_(g.t(), hidden[s:s + step])
                del z, t, g
            return grad_h, grad_w, None, None, None, None, None, None

    return ChunkedCrossEntropy


def chunked_token_loss_sum(hidden, weight, labels, chunk: int, softcap: float | None = None, *, vocab_start: int = 0,
                           vocab_size: int | None = None, group=None) -> "torch.Tensor":  # noqa: F821
    """token_loss_sum(softcap(hidden @ weight.T), labels)[0], `chunk` rows at a time: the
    [n, vocab] logits never exist, in forward or backward (peak: chunk x vocab x ~4 bytes for
    fp32 inputs, ~6 for bf16 (the matmul's 16-bit output), more with softcapping).

    hidden [n, H] (any float dtype; the softmax is fp32), weight [V, H] (a tied embedding is the
    same tensor), labels [n] with IGNORE_INDEX for positions without a target. Gradients flow to
    hidden and weight. Under vocabulary parallelism `weight` is this rank's slice starting at
    `vocab_start` of a vocabulary of `vocab_size` real tokens (rows past it are padding), `group`
    the tensor-parallel group; see ChunkedCrossEntropy for what the hidden gradient is then."""
    local_rows = weight.shape[0]
    valid = local_rows if vocab_size is None else max(0, min(local_rows, vocab_size - vocab_start))
    return _chunked_ce_class().apply(hidden, weight, labels.reshape(-1), int(chunk), softcap or None,
                                     vocab_start, valid, group)
