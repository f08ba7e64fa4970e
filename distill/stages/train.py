"""Stage `train`: SFT of the student on `train.data.paths` or RUN/sft/, then export.

Writes RUN/train/ (token_cache/, checkpoints/, metrics.jsonl, tensorboard/) and the final
Hugging Face model to train.export.dir (default RUN/model/). Re-running resumes from the last
checkpoint; a finished run only re-exports.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import RunConfig


def preflight(cfg: RunConfig) -> None:
    """What can be checked against the student before any stage of the run starts (its context
    vs train.seq_len; for Megatron its family and shape vs the tensor / pipeline degrees) and the
    configured metric sinks: the launcher's own checks, run hours earlier. (Data checks wait for
    the data.)"""
    from distill.train.launch import check_student

    check_student(cfg.train)


def run(cfg: RunConfig, run_dir: Path) -> Path:
    from distill.export.hf import export_checkpoint
    from distill.train.launch import launch, prepare

    train = cfg.train
    job = prepare(train, run_dir)
    final = launch(job)
    out = export_checkpoint(final, train.export.dir or Path(run_dir) / "model",
                            max_shard_size_mb=train.export.max_shard_size_mb, dtype=train.export.dtype)
    print(f"train: model written to {out} (from {final}); load it with "
          f'AutoModelForCausalLM.from_pretrained("{out}")', flush=True)
    return out
