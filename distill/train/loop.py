"""The training loop one rank runs: plan -> model -> backend -> steps -> checkpoints.

Every rank computes the same StepPlan from the same token cache and seed and takes its own
share of each global batch, so the data position is just the step index: resuming restores
the backend's state and starts at the checkpoint's step. The loop knows nothing of DeepSpeed or
of how it was launched (Ray Train, torchrun, or in-process); the launcher passes a `TrainJob`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.train.checkpoint import latest_good_checkpoint, list_checkpoints, load_rng, read_state, save_checkpoint
from distill.train.config import TrainConfig, resolve_precision

_PLAN_KEYS = ("cache", "seq_len", "seed", "epochs", "micro_batch", "grad_accum", "world_size")
_SPLIT_KEYS = ("micro_batch", "grad_accum", "world_size")
"""How each global batch is split over ranks and accumulation steps; the rows of a step depend
only on their product (`StepPlan.micro_batches`)."""


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
    launched_at: float = 0.0
    """Unix time the driver launched the workers: identifies this launch's attempts (restarts)
    in RUN/train/attempts.jsonl and starts its goodput clock."""

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
    exclude_node: str | None = None
    """Set when a straggler stopped this attempt early (policy restart_without): the node to
    restart the group without. The Ray launcher reads it from RUN/train/attempts.jsonl (Ray Train
    passes no return value back), which is why RUN/ must be storage every node sees."""


def planned_steps(cfg: TrainConfig, steps_in_plan: int) -> int:
    """Optimizer steps this run takes. Pure."""
    return min(steps_in_plan, cfg.max_steps) if cfg.max_steps else steps_in_plan


def plan_signature(cfg: TrainConfig, cache_fingerprint: str, world_size: int) -> dict:
    """What the data position (a step index) means; a checkpoint is resumable only under the same."""
    return {"cache": cache_fingerprint, "seq_len": cfg.seq_len, "seed": cfg.seed, "epochs": cfg.epochs,
            "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "world_size": world_size}


def resume_problems(saved: dict, current: dict, *, resplit: bool = False) -> list[str]:
    """Why a checkpoint cannot continue this run (empty when it can). Pure.

    `resplit`: the backend can load its state under another data-parallel size (Megatron's
    resharding). Then only the global batch (data ranks x micro_batch x grad_accum rows) must
    stay, since it alone decides which rows each step trains on; e.g. 2 data ranks x grad_accum 2
    may continue as 1 data rank x grad_accum 4."""
    keys = {"cache": "the training data or tokenizer (token cache fingerprint)", "seq_len": "train.seq_len",
            "seed": "train.seed", "epochs": "train.epochs", "micro_batch": "train.micro_batch",
            "grad_accum": "train.grad_accum",
            "world_size": "the data-parallel size (train.launch.num_workers / model- or sequence-parallel degrees)"}
    check = [k for k in _PLAN_KEYS if not (resplit and k in _SPLIT_KEYS)]
    problems = [f"{keys[k]} changed from {saved.get(k)!r} to {current[k]!r}" for k in check if saved.get(k) != current[k]]
    if resplit:
        rows = [math.prod(sig.get(k) or 0 for k in _SPLIT_KEYS) for sig in (saved, current)]
        if rows[0] != rows[1]:
            problems.append(f"the global batch changed from {rows[0]} to {rows[1]} rows (data-parallel size x "
                            "train.micro_batch x train.grad_accum); keep the product")
    return problems


def _save_hf_files(model, model_path: str, out: Path) -> None:
    """Config, generation config, tokenizer and chat template: what export needs besides weights."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)


def _gather_floats(values: list[float]) -> list[list[float]]:
    """All-gather a few floats from every rank (one list per rank) on the default group."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def _gather_names(name: str, width: int = 128) -> list[str]:
    """Every rank's `name` (a node id or host name: ASCII, at most `width` bytes)."""
    raw = name.encode()[:width].ljust(width, b"\0")
    return [bytes(int(b) for b in row).rstrip(b"\0").decode() for row in _gather_floats(list(raw))]


def _resume_point(root: Path, rank: int, checksums: bool) -> Path | None:
    """The checkpoint to resume from: rank 0 checks the manifests (reading every file once), the
    others take its choice (its index among the complete step-* directories, -1 for none)."""
    choice = -1.0
    if rank == 0:
        good = latest_good_checkpoint(root, checksums=checksums, warn=lambda m: print(f"train: {m}", flush=True))
        choice = float(list_checkpoints(root).index(good)) if good is not None else -1.0
    index = int(_gather_floats([choice])[0][0])
    return list_checkpoints(root)[index] if index >= 0 else None


def train_worker(job: TrainJob, *, node: str | None = None) -> TrainOutcome:
    """Train on this rank until the plan, max_steps or max_minutes ends; checkpoint; return.

    `node` names the machine in step-time and straggler records (the Ray node id under Ray, so a
    restart can exclude it; the host name otherwise)."""
    live: dict = {}  # _train puts its StepMonitor here once the rank knows its attempt
    try:
        return _train(job, node or socket.gethostname(), live)
    except BaseException as e:
        # Why this rank's attempt ended, for goodput.json (the first cause recorded wins: the
        # rank that failed first usually writes before its peers see a broken collective).
        if "monitor" in live:
            live["monitor"].record_cause(f"error on rank {live['monitor'].rank}: {type(e).__name__}: {str(e)[:300]}")
        raise
    finally:
        if "monitor" in live:
            live["monitor"].close()


def _train(job: TrainJob, node: str, live: dict) -> TrainOutcome:
    import numpy as np
    import torch

    from distill.train.backends import build_backend
    from distill.train.data import load_token_cache
    from distill.train.faults import FaultInjector, parse_faults
    from distill.train.metrics import MetricsLogger, attention_flops, attention_shape, flop_params, mfu
    from distill.train.model import load_student
    from distill.train.monitor import StepMonitor, launch_goodput, next_attempt, write_goodput
    from distill.train.packing import make_batch, packing_efficiency, plan_steps

    cfg = job.config()
    started = time.monotonic()
    started_unix = time.time()
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    precision = resolve_precision(cfg, has_gpu)
    backend = build_backend(cfg, precision=precision)
    # Data is sharded over data-parallel replicas; ranks of one model-parallel group get the same rows.
    rank, world, dp_rank = backend.rank, backend.dp_size, backend.dp_rank
    out_dir = Path(job.out_dir)
    # Rank 0 numbers the attempt (restarts of this launch) from the records; all ranks agree. A
    # job run without `launch` (no launch time) is its own launch, starting now.
    launched_at = job.launched_at or started_unix
    ours = [float(next_attempt(out_dir, launched_at)), launched_at] if rank == 0 else [0.0, 0.0]
    number, launched_at = _gather_floats(ours)[0]
    attempt = int(number)
    nodes = _gather_names(node)
    monitor = StepMonitor(cfg.fault, out_dir, rank=rank, world=backend.world_size, node=node, nodes=nodes,
                          attempt=attempt, launch=launched_at, gather=_gather_floats)
    live["monitor"] = monitor
    # Watched until the first step begins: a rank stuck loading (a dead filesystem, a collective
    # in backend setup or resume that a peer never joins) dumps its stacks and the group restarts.
    monitor.guard("startup (token cache, student, backend setup, resume)", cfg.fault.startup_timeout_s)
    injector = FaultInjector(parse_faults(cfg.fault.inject), rank=rank, attempt=attempt,
                             record_cause=monitor.record_cause)
    injector.setup()

    cache = load_token_cache(Path(job.cache_path))
    plan = plan_steps(cache, cfg.seq_len, seed=cfg.seed, epochs=cfg.epochs)
    in_plan = plan.num_steps(world, cfg.micro_batch, cfg.grad_accum)
    total = planned_steps(cfg, in_plan)
    if total < 1:
        raise ValueError(f"{cache.n_samples} samples pack into {len(plan.bins)} rows, fewer than one global batch "
                         f"of {world * cfg.micro_batch * cfg.grad_accum} rows (data-parallel ranks {world} * "
                         "micro_batch * grad_accum): add data or lower them")

    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = load_student(job.model_path, dtype="bfloat16" if precision == "bf16" else "float32",
                         packed=cfg.student.attention == "packed",
                         gradient_checkpointing=cfg.deepspeed.activation_checkpointing)
    n_params = flop_params(model)  # counted before ZeRO-3 partitions them
    layers, attn_dim = attention_shape(model.config)
    backend.setup(model, total_steps=cfg.schedule.total_steps or total)

    ckpt_root = Path(job.checkpoint_dir)
    signature = plan_signature(cfg, cache.fingerprint, world)
    start, last_ckpt = 0, None
    latest = _resume_point(ckpt_root, rank, cfg.fault.checksums)
    if latest is not None:
        state = read_state(latest)
        problems = resume_problems(state, signature, resplit=getattr(backend, "reshards_on_resume", False))
        if problems:
            raise RuntimeError(f"cannot resume from {latest}: " + "; ".join(problems)
                               + ". Restore the setting, or use a new run.dir / train.checkpoint.dir")
        backend.load_checkpoint(latest)
        load_rng(latest, rank)
        start, last_ckpt = state["step"], latest
        if rank == 0:
            print(f"train: resumed from {latest} at step {start}" + (f" (attempt {attempt})" if attempt else ""),
                  flush=True)
    if rank == 0:
        monitor.record_start(started=started_unix, resumed_from_step=start)

    metrics = MetricsLogger(Path(job.out_dir), cfg.metrics, enabled=rank == 0, run_name=Path(job.out_dir).parent.name,
                            config=job.train, resume_step=start)
    if rank == 0:
        print(f"train: {cache.n_samples} samples ({cache.n_dropped} over seq_len dropped) in {len(plan.bins)} rows, "
              f"packing efficiency {packing_efficiency(cache, plan.bins, cfg.seq_len):.1%}; steps {start}..{total} of "
              f"{in_plan} planned; {_parallel_layout(cfg, backend)}, {precision}", flush=True)

    def write_parts(tmp: Path) -> None:
        injector.at_checkpoint(step)
        backend.save_checkpoint(tmp)
        if rank == 0:
            _save_hf_files(model, job.model_path, tmp / "hf")

    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    step, exclude, report = start, None, None
    monitor.unguard()  # start-up is over (a resumed run may have no step left to arm the next phase)
    while step < total:
        monitor.begin(step + 1)  # the watchdog watches from here to monitor.end
        injector.at_step_start(step + 1)
        t0 = time.monotonic()
        shares = [plan.micro_batches(step, r, world, cfg.micro_batch, cfg.grad_accum) for r in range(world)]
        batches = [make_batch(cache, bins, cfg.seq_len) for bins in shares[dp_rank]]
        global_targets = plan.global_target_tokens(step, world, cfg.micro_batch, cfg.grad_accum, cache)
        slept = injector.slow_down(step + 1)
        data_s = time.monotonic() - t0
        # A late rank makes the others wait here, booked as their comm time rather than compute.
        wait_s = monitor.sync(backend.barrier)
        stats = backend.train_step(batches, global_targets)
        step += 1
        out_of_time = budget_s is not None and time.monotonic() - started > budget_s
        # Every rank must stop at the same step, and clocks differ: rank 0 decides for all.
        stop = backend.any_rank(out_of_time and rank == 0)
        dt = time.monotonic() - t0
        flagged = monitor.end(step, data_s=data_s, compute_s=stats.compute_s, comm_s=stats.comm_s + wait_s, step_s=dt)
        injector.observe(data_s + stats.compute_s, slept)
        last = step == total or stop
        # Every rank ran the same detector on the same gathered times: they agree without a
        # collective. After the last step there is nothing left to move.
        exclude = None if last else next((f["node"] for f in flagged if f["policy"] == "restart_without"), None)
        if last and rank == 0:
            report = launch_goodput(out_dir, launched_at, now=time.time())
        if step % cfg.log_every == 0 or last:
            rows = [b for share in shares for mb in share for b in mb]
            real = int(sum(int(cache.lengths[b].sum()) for b in rows))
            attn = attention_flops((n for b in rows for n in cache.lengths[b]), layers, attn_dim)
            values = {"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                      "target_tokens": global_targets, "target_tokens_per_s": global_targets / dt,
                      "tokens_per_s": real / dt, "packing_efficiency": real / (len(rows) * cfg.seq_len),
                      "mfu": mfu(n_params, real, dt, cfg.metrics.peak_flops, backend.world_size, attn), "step_s": dt,
                      "data_s": data_s, "compute_s": stats.compute_s, "comm_s": stats.comm_s + wait_s,
                      "straggler_ratio": monitor.max_ratio}
            if report is not None:
                values.update({f"goodput/{k}": report[k] for k in ("goodput", "wall_s", "productive_s", "lost_s",
                                                                    "restarts")})
            metrics.log(step, values)
            metrics.progress(step, total, values)
        if step % cfg.checkpoint.every_steps == 0 or last or exclude:
            monitor.guard(f"checkpoint write after step {step}", cfg.fault.checkpoint_timeout_s)
            last_ckpt = save_checkpoint(ckpt_root, step, {**signature, "total_steps": total}, rank=rank,
                                        keep_last=cfg.checkpoint.keep_last, write_parts=write_parts,
                                        barrier=backend.barrier, checksums=cfg.fault.checksums)
            monitor.unguard()
        if exclude:
            if rank == 0:
                monitor.record_cause(f"straggler: restart without node {exclude} after step {step}",
                                     exclude_node=exclude)
            break
        if stop:
            if rank == 0:
                print(f"train: time budget train.max_minutes={cfg.max_minutes} reached after step {step}", flush=True)
            break
    if report is not None:
        write_goodput(out_dir, report)
    metrics.close()
    return TrainOutcome(steps_done=step, total_steps=total, checkpoint=last_ckpt, backend=backend, exclude_node=exclude)


def _parallel_layout(cfg: TrainConfig, backend) -> str:
    """How the ranks split the work, for the start-up line."""
    if cfg.backend == "megatron":
        m = cfg.megatron
        return (f"world {backend.world_size} = dp {backend.dp_size} x tp {m.tensor_parallel} x pp "
                f"{m.pipeline_parallel} x cp {m.context_parallel} (megatron)")
    sp = cfg.deepspeed.sequence_parallel
    return (f"world {backend.world_size} = dp {backend.dp_size} x sp {sp}, ZeRO-{cfg.deepspeed.zero_stage} over all "
            "ranks" if sp > 1 else f"world {backend.world_size}, ZeRO-{cfg.deepspeed.zero_stage}")


def local_env(port: int) -> dict:
    """Environment of a one-process torch.distributed group on this machine (launcher `local`)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
            "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))
