"""Synthetic batches for tests and benchmarks: random packed rows (the trainer's input) and the
padded batches a plain Hugging Face `Trainer` baseline takes. Imports torch, so nothing in the
package imports this at load time."""

from __future__ import annotations


def packed_rows(rows: int, seq_len: int, vocab: int, *, seed: int, min_len: int, max_len: int):
    """A PackedBatch of random samples (lengths uniform in [min_len, max_len]), every token a target."""
    import numpy as np
    import torch

    from distill.train.packing import PackedBatch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(rows, seq_len))
    pos = np.zeros((rows, seq_len), dtype=np.int64)
    bounds = [0]
    for r in range(rows):
        at = 0
        while at < seq_len:
            n = min(int(rng.integers(min_len, max_len + 1)), seq_len - at)
            pos[r, at:at + n] = np.arange(n)
            at += n
            bounds.append(r * seq_len + at)
    cu = torch.tensor(bounds, dtype=torch.int32)
    labels = torch.from_numpy(np.roll(ids, -1, axis=1))
    return PackedBatch(torch.from_numpy(ids), labels, torch.from_numpy(pos), cu, int(torch.diff(cu).max()),
                       int(labels.numel()))


def pad_collate(batch: list[dict]) -> dict:
    """Right-padded `input_ids` / `labels` (-100) / `attention_mask` from rows of numpy arrays:
    the batches the HF Trainer baselines of the benchmarks train on."""
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for r, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[r, :k], labels[r, :k], mask[r, :k] = torch.from_numpy(b["input_ids"]), torch.from_numpy(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
