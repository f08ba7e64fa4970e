"""Stage `train`: SFT of the student on `train.data.paths` or RUN/sft/, then export.

Writes RUN/train/ (token_cache/, checkpoints/, metrics.jsonl, tensorboard/) and the final
Hugging Face model to train.export.dir (default RUN/model/). Re-running resumes from the last
checkpoint; a finished run only re-exports.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import RunConfig


def preflight(cfg: RunConfig) -> None:
    """What can be checked against the student before any stage of the run starts: its context
    length vs train.seq_len, and the configured metric sinks. (Data checks wait for the data.)"""
    from transformers import AutoConfig

    from distill.config import ConfigError
    from distill.teachers.models import resolve_model
    from distill.train.config import check_against_model
    from distill.train.metrics import check_sinks

    train = cfg.train
    model_cfg = AutoConfig.from_pretrained(resolve_model(train.student.model))
    problems = check_against_model(train, getattr(model_cfg, "max_position_embeddings", None), train.student.model)
    problems += check_sinks(train.metrics)
    if problems:
        raise ConfigError(problems)


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
