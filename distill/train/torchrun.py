"""Training without Ray: `torchrun --nproc-per-node N -m distill.train.torchrun CONFIG [overrides]`.

For clusters scheduled by Slurm or similar. Every rank reads the same run config; rank 0 alone
prepares (validates against the student, builds the token cache, compiles DeepSpeed's native ops)
and hands the resulting job to the other ranks through torchrun's TCP store, on which they wait:
N ranks building one cache or compiling one op at once is the race `prepare` exists to avoid.
After training, rank 0 exports the model to train.export.dir (default RUN/model/). `--job
JOB.json` runs a job the `train` stage prepared (no prepare, no export: the stage does both).
Ranks on several nodes need run.dir on a filesystem they all see, at the same path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Callable

def prepared_key() -> str:
    """Store key under which rank 0 publishes the prepared job (or its error); one per torchrun
    attempt, so that a restarted group never reads a previous attempt's answer."""
    return f"distill/prepared_job/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


PREPARE_WAIT = timedelta(days=1)
"""How long the other ranks wait for rank 0's prepare: it tokenises the whole SFT set, so no
short bound is right. A rank 0 that dies does not leave them hanging: torchrun's agent stops the
whole group when one rank fails."""


def launcher_store():
    """A client of the TCP store torchrun set up for this attempt (MASTER_ADDR:MASTER_PORT), usable
    before any process group exists.

    torchrun's agent hosts the store itself unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE is set
    (TORCHELASTIC_USE_AGENT_STORE tells which); otherwise rank 0 hosts it, as init_process_group
    would, in multi-tenant mode so that the process group's own store later shares this server
    instead of failing to bind the port."""
    from torch.distributed import TCPStore

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                    is_master=rank == 0 and not agent, timeout=PREPARE_WAIT, wait_for_workers=False,
                    multi_tenant=True)


def prepare_on_rank0(prepare: Callable[[], "TrainJob"], rank: int, store) -> "TrainJob":
    """Rank 0 runs `prepare` and publishes the job on `store`; the other ranks wait for it. An error
    in rank 0's prepare reaches every rank (the others fail with its message, not a timeout)."""
    from distill.train.loop import TrainJob

    key = prepared_key()
    if rank == 0:
        try:
            job = prepare()
        except BaseException as e:
            store.set(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        store.set(key, json.dumps({"job": asdict(job)}))
        return job
    store.wait([key], PREPARE_WAIT)
    msg = json.loads(store.get(key))
    if "error" in msg:
        raise RuntimeError(f"rank 0 failed to prepare the run: {msg['error']}")
    return TrainJob(**msg["job"])


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
    store = None
    if args.job is not None:
        job, export_dir = TrainJob.read(args.job), None
    else:
        from distill.config import load_config
        from distill.train.launch import prepare

        cfg = load_config(args.config, args.overrides, require_source=False)
        run_dir = Path(cfg.run.dir)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            job = prepare(cfg.train, run_dir)  # one rank: nobody to wait (and maybe no torchrun store)
        else:
            store = launcher_store()  # kept open until training ends: rank 0 may be its server
            job = prepare_on_rank0(lambda: prepare(cfg.train, run_dir), rank, store)
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
