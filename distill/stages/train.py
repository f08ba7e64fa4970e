"""Stage `train`: SFT of the student on `train.data.paths` or RUN/sft/, then export.

Writes RUN/train/ (token_cache/, checkpoints/, metrics.jsonl, tensorboard/) and the final
Hugging Face model to train.export.dir (default RUN/model/). Re-running resumes from the last
checkpoint; a finished run only re-exports.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import RunConfig
from distill.stages import ActorAsk, Stage


def resources(cfg: RunConfig) -> ActorAsk:
    ln = cfg.train.launch
    return ActorAsk(ln.num_workers, ln.cpus_per_worker, ln.gpus_per_worker, f"{cfg.train.backend} ranks via {ln.launcher}")


def preflight(cfg: RunConfig) -> None:
    """What can be checked before any stage of the run starts: the launcher's own checks against
    the student (its context and sliding window vs train.seq_len; for Megatron its family and
    shape vs the tensor / pipeline degrees) and the metric sinks, run hours earlier; that the
    training data will exist (train.data.paths, or an sft stage in this run, or RUN/sft/). The
    contents of the data are checked when the token cache is built."""
    from distill.config import ConfigError
    from distill.train.launch import check_student, data_path_problems, sft_input_problem

    problems = data_path_problems(cfg.train)
    before = cfg.run.stages[:cfg.run.stages.index("train")] if "train" in cfg.run.stages else []
    no_sft = sft_input_problem(cfg.train, Path(cfg.run.dir), before)
    problems += [no_sft] if no_sft else []
    try:
        check_student(cfg.train)
    except ConfigError as e:  # reported with the data problems, all at once
        problems += e.problems
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


STAGE = Stage("train", "train", run, resources, preflight=preflight, shards=False)
