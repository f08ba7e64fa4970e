"""Training without Ray: `torchrun --nproc-per-node N -m distill.train.torchrun CONFIG [overrides]`.

For clusters scheduled by Slurm or similar. Every rank reads the same run config; the token
cache is built by whichever rank takes its file lock first (the others wait on the lock, not on
a collective, then reuse it). After training, rank 0 exports the model to train.export.dir
(default RUN/model/). `--job JOB.json` runs a job the `train` stage prepared (no export: the
stage exports).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.train.torchrun")
    p.add_argument("config", nargs="?", help="YAML run config (its train: section is used)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    p.add_argument("--job", type=Path, help="a job file written by the train stage (instead of CONFIG)")
    args = p.parse_args(argv)
    if (args.job is None) == (args.config is None):
        p.error("give CONFIG or --job, not both")

    from distill.train.loop import TrainJob, rank_from_env, train_worker

    rank = rank_from_env()
    if args.job is not None:
        job, export_dir = TrainJob.read(args.job), None
    else:
        from distill.config import load_config
        from distill.train.launch import prepare

        cfg = load_config(args.config, args.overrides, require_source=False)
        run_dir = Path(cfg.run.dir)
        job = prepare(cfg.train, run_dir)
        export_dir = cfg.train.export.dir or run_dir / "model"
    outcome = train_worker(job)
    outcome.backend.close()
    if rank == 0 and export_dir is not None:
        from distill.export.hf import export_checkpoint

        cfg = job.config()
        out = export_checkpoint(outcome.checkpoint, export_dir, max_shard_size_mb=cfg.export.max_shard_size_mb,
                                dtype=cfg.export.dtype)
        print(f"train: model written to {out}; load it with "
              f'AutoModelForCausalLM.from_pretrained("{out}")', flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
