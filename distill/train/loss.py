"""The training loss: summed token cross-entropy, normalised by the global batch's target count.

The step's loss for one micro-batch is `token_loss_sum(...)[0] / global_target_tokens`, where
the denominator counts target tokens in the WHOLE global batch (every micro-batch of every
rank, see `StepPlan.global_target_tokens`). Summed over micro-batches and, by a gradient
all-reduce SUM, over ranks, this is exactly the mean token loss of the global batch, so the
gradient does not depend on how the batch is split. A per-micro-batch mean would weight a
token in a short micro-batch more than one in a long micro-batch.

Backends that average gradients over ranks or divide by accumulation steps (DeepSpeed does
both) must multiply the loss by world * grad_accum to undo it.
"""

from __future__ import annotations

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
