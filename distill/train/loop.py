"""The training loop one rank runs: plan -> model -> backend -> steps -> checkpoints.

Every rank computes the same StepPlan from the same token cache and seed and takes its own
share of each global batch, so the data position is just the step index: resuming restores
the backend's state and starts at the checkpoint's step. The loop knows nothing of DeepSpeed or
of how it was launched (Ray Train, torchrun, or in-process); the launcher passes a `TrainJob`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.train.checkpoint import latest_checkpoint, load_rng, read_state, save_checkpoint
from distill.train.config import TrainConfig, resolve_precision

_PLAN_KEYS = ("cache", "seq_len", "seed", "epochs", "micro_batch", "grad_accum", "world_size")


@dataclass
class TrainJob:
    """Everything a rank needs, resolved by the driver (JSON-able: it crosses process bounds)."""

    train: dict
    """TrainConfig, dumped (mode="json")."""
    model_path: str
    """The student, resolved to something `from_pretrained` loads (a directory or a Hub id)."""
    cache_path: str
    """The token cache directory (built by the driver)."""
    out_dir: str
    """RUN/train: metrics.jsonl and tensorboard/ go here."""
    checkpoint_dir: str

    def config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)

    def write(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(asdict(self), indent=1))
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> "TrainJob":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class TrainOutcome:
    steps_done: int
    total_steps: int
    checkpoint: Path | None
    backend: object
    """The backend, still holding the trained weights (closed by `close_backend` / the caller)."""


def planned_steps(cfg: TrainConfig, steps_in_plan: int) -> int:
    """Optimizer steps this run takes. Pure."""
    return min(steps_in_plan, cfg.max_steps) if cfg.max_steps else steps_in_plan


def plan_signature(cfg: TrainConfig, cache_fingerprint: str, world_size: int) -> dict:
    """What the data position (a step index) means; a checkpoint is resumable only under the same."""
    return {"cache": cache_fingerprint, "seq_len": cfg.seq_len, "seed": cfg.seed, "epochs": cfg.epochs,
            "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "world_size": world_size}


def resume_problems(saved: dict, current: dict) -> list[str]:
    """Why a checkpoint cannot continue this run (empty when it can). Pure."""
    keys = {"cache": "the training data or tokenizer (token cache fingerprint)", "seq_len": "train.seq_len",
            "seed": "train.seed", "epochs": "train.epochs", "micro_batch": "train.micro_batch",
            "grad_accum": "train.grad_accum", "world_size": "train.launch.num_workers (world size)"}
    return [f"{keys[k]} changed from {saved.get(k)!r} to {current[k]!r}" for k in _PLAN_KEYS if saved.get(k) != current[k]]


def _save_hf_files(model, model_path: str, out: Path) -> None:
    """Config, generation config, tokenizer and chat template: what export needs besides weights."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)


def train_worker(job: TrainJob) -> TrainOutcome:
    """Train on this rank until the plan, max_steps or max_minutes ends; checkpoint; return."""
    import numpy as np
    import torch

    from distill.train.backends import build_backend
    from distill.train.data import load_token_cache
    from distill.train.metrics import MetricsLogger, mfu
    from distill.train.model import load_student
    from distill.train.packing import make_batch, packing_efficiency, plan_steps

    cfg = job.config()
    started = time.monotonic()
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    precision = resolve_precision(cfg, has_gpu)
    backend = build_backend(cfg, precision=precision)
    # Data is sharded over data-parallel replicas; ranks of one model-parallel group get the same rows.
    rank, world, dp_rank = backend.rank, backend.dp_size, backend.dp_rank

    cache = load_token_cache(Path(job.cache_path))
    plan = plan_steps(cache, cfg.seq_len, seed=cfg.seed, epochs=cfg.epochs)
    in_plan = plan.num_steps(world, cfg.micro_batch, cfg.grad_accum)
    total = planned_steps(cfg, in_plan)
    if total < 1:
        raise ValueError(f"{cache.n_samples} samples pack into {len(plan.bins)} rows, fewer than one global batch "
                         f"of {world * cfg.micro_batch * cfg.grad_accum} rows (num_workers * micro_batch * "
                         "grad_accum): add data or lower them")

    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = load_student(job.model_path, dtype="bfloat16" if precision == "bf16" else "float32",
                         packed=cfg.student.attention == "packed",
                         gradient_checkpointing=cfg.deepspeed.activation_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())  # counted before ZeRO-3 partitions them
    backend.setup(model, total_steps=cfg.schedule.total_steps or total)

    ckpt_root = Path(job.checkpoint_dir)
    signature = plan_signature(cfg, cache.fingerprint, world)
    start, last_ckpt = 0, None
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = read_state(latest)
        problems = resume_problems(state, signature)
        if problems:
            raise RuntimeError(f"cannot resume from {latest}: " + "; ".join(problems)
                               + f". Restore the setting, or use a new run.dir / train.checkpoint.dir")
        backend.load_checkpoint(latest)
        load_rng(latest, rank)
        start, last_ckpt = state["step"], latest
        if rank == 0:
            print(f"train: resumed from {latest} at step {start}", flush=True)

    metrics = MetricsLogger(Path(job.out_dir), cfg.metrics, enabled=rank == 0, run_name=Path(job.out_dir).parent.name,
                            config=job.train, resume_step=start)
    if rank == 0:
        print(f"train: {cache.n_samples} samples ({cache.n_dropped} over seq_len dropped) in {len(plan.bins)} rows, "
              f"packing efficiency {packing_efficiency(cache, plan.bins, cfg.seq_len):.1%}; steps {start}..{total} of "
              f"{in_plan} planned; world {world}, ZeRO-{cfg.deepspeed.zero_stage}, {precision}", flush=True)

    def write_parts(tmp: Path) -> None:
        backend.save_checkpoint(tmp)
        if rank == 0:
            _save_hf_files(model, job.model_path, tmp / "hf")

    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    step = start
    while step < total:
        t0 = time.monotonic()
        shares = [plan.micro_batches(step, r, world, cfg.micro_batch, cfg.grad_accum) for r in range(world)]
        batches = [make_batch(cache, bins, cfg.seq_len) for bins in shares[dp_rank]]
        global_targets = plan.global_target_tokens(step, world, cfg.micro_batch, cfg.grad_accum, cache)
        stats = backend.train_step(batches, global_targets)
        step += 1
        out_of_time = budget_s is not None and time.monotonic() - started > budget_s
        # Every rank must stop at the same step, and clocks differ: rank 0 decides for all.
        stop = backend.any_rank(out_of_time and rank == 0)
        if step % cfg.log_every == 0 or step == total or stop:
            dt = time.monotonic() - t0
            rows = [b for share in shares for mb in share for b in mb]
            real = int(sum(int(cache.lengths[b].sum()) for b in rows))
            values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                      "target_tokens": global_targets, "target_tokens_per_s": global_targets / dt,
                      "tokens_per_s": real / dt, "packing_efficiency": real / (len(rows) * cfg.seq_len),
                      "mfu": mfu(n_params, real, dt, cfg.metrics.peak_flops, backend.world_size), "step_s": dt}
            metrics.log(step, values)
            metrics.progress(step, total, values)
        if step % cfg.checkpoint.every_steps == 0 or step == total or stop:
            last_ckpt = save_checkpoint(ckpt_root, step, {**signature, "total_steps": total}, rank=rank,
                                        keep_last=cfg.checkpoint.keep_last, write_parts=write_parts,
                                        barrier=backend.barrier)
        if stop:
            if rank == 0:
                print(f"train: time budget train.max_minutes={cfg.max_minutes} reached after step {step}", flush=True)
            break
    metrics.close()
    return TrainOutcome(steps_done=step, total_steps=total, checkpoint=last_ckpt, backend=backend)


def local_env(port: int) -> dict:
    """Environment of a one-process torch.distributed group on this machine (launcher `local`)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))
