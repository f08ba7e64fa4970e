"""Stage `export`: the latest training checkpoint of the run -> a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from distill.config import RunConfig


def run(cfg: RunConfig, run_dir: Path) -> Path:
    from distill.export.hf import export_checkpoint

    train = cfg.train
    ckpts = train.checkpoint.dir or Path(run_dir) / "train" / "checkpoints"
    out = export_checkpoint(ckpts, train.export.dir or Path(run_dir) / "model",
                            max_shard_size_mb=train.export.max_shard_size_mb, dtype=train.export.dtype)
    print(f'export: model written to {out}; load it with AutoModelForCausalLM.from_pretrained("{out}")', flush=True)
    return out
