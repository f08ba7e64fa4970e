"""Hugging Face weights from a Megatron-backend checkpoint (`ckpt/megatron/`).

The checkpoint holds one weights file per (tensor rank, pipeline stage), written by data rank 0,
and `meta.json` with the degrees and the model's shapes. Each file is memory-mapped
(`torch.load(mmap=True, weights_only=True)`), and `convert.iter_to_hf` merges one HF tensor at a
time from the shards, so peak memory is about one merged tensor plus the writer's shard, not
the model. The weights are the model's own (bf16 for a bf16 run: Megatron's fp32 master copy
lives in the optimizer shards, which export does not read). `distill.export.hf.export_checkpoint`
dispatches here and writes the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.train.backends.megatron import META_FILE, model_file
from distill.train.backends.megatron.convert import ModelSpec, iter_to_hf


def iter_hf_tensors(megatron_dir: Path):
    """(HF name, tensor) pairs of the checkpoint's model, merged from every shard."""
    import torch

    from distill.export.hf import ExportError

    megatron_dir = Path(megatron_dir)
    meta_path = megatron_dir / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{megatron_dir} has no {META_FILE}: not a complete Megatron checkpoint")
    meta = json.loads(meta_path.read_text())
    spec, tp, pp = ModelSpec.from_dict(meta["spec"]), meta["tensor_parallel"], meta["pipeline_parallel"]
    missing = [model_file(t, p) for p in range(pp) for t in range(tp) if not (megatron_dir / model_file(t, p)).is_file()]
    if missing:
        raise ExportError(f"{megatron_dir} lacks shard files {', '.join(missing)} (tensor_parallel={tp}, "
                          f"pipeline_parallel={pp}); the checkpoint is incomplete")
    cache: dict[tuple[int, int], dict] = {}

    def shard(t: int, p: int) -> dict:
        if (t, p) not in cache:
            cache[(t, p)] = torch.load(megatron_dir / model_file(t, p), map_location="cpu", weights_only=True,
                                       mmap=True)
        return cache[(t, p)]

    yield from iter_to_hf(shard, spec, tp=tp, pp=pp)
