"""Starting the training workers: prepare once in the driver, then Ray Train, torchrun or local.

`prepare` runs in ONE process before any worker exists: it resolves the student and the data,
checks what needs the model's config (`student_problems`: seq_len vs context, Megatron shapes;
the train stage's preflight runs the same checks before a run's first stage) and the optional
metric sinks, and tokenises into the token cache, so no rank tokenises while others wait on a
collective.
`launch` then starts `num_workers` ranks of `distill.train.loop.train_worker` with the chosen
launcher and returns the final checkpoint directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from distill.config import ConfigError
from distill.train.config import TrainConfig
from distill.train.loop import TrainJob


def data_files(cfg: TrainConfig, run_dir: Path) -> list[Path]:
    """The configured data, or the previous stage's output RUN/sft/."""
    if cfg.data.paths:
        return list(cfg.data.paths)
    problem = sft_input_problem(cfg, run_dir, stages=[])
    if problem:
        raise ConfigError([problem])
    return [Path(run_dir) / "sft"]


def data_path_problems(cfg: TrainConfig) -> list[str]:
    """train.data.paths that do not exist (checked before a run's first stage, and by the dry run)."""
    return [f"train.data.paths[{i}]={str(p)!r}: no such file or directory"
            for i, p in enumerate(cfg.data.paths) if not Path(p).exists()]


def sft_input_problem(cfg: TrainConfig, run_dir: Path, stages: list[str]) -> str | None:
    """Why training would find no data: train.data.paths empty, no `sft` stage among `stages` (the
    stages running before it) and no RUN/sft/ from an earlier run. None when it will find some."""
    sft = Path(run_dir) / "sft"
    if cfg.data.paths or "sft" in stages or sft.is_dir():
        return None
    return (f"train.data.paths is empty and {sft} does not exist: run the stages that write it (add them to "
            "run.stages) or set train.data.paths to Parquet/JSONL files with a `messages` column")


def student_problems(cfg: TrainConfig, model_config) -> list[str]:
    """Every check of the train config against the student's HF config (no weights, no GPU):
    `shape.shape_problems` on its shape (context and sliding window vs train.seq_len; for Megatron
    heads / key-value heads / MLP width / layers vs the degrees) and, for Megatron, whether it
    builds the family. The train stage's preflight (before the run's first stage), `prepare` and
    the dry run all call it."""
    from distill.train.shape import shape_from_hf_config, shape_problems

    problems = shape_problems(cfg, shape_from_hf_config(model_config))
    if cfg.backend == "megatron":
        from distill.train.backends.megatron import model_problems

        problems += model_problems(cfg, model_config)
    return problems


def check_student(cfg: TrainConfig, model_path: str | None = None) -> None:
    """ConfigError listing every problem visible before any data exists: `student_problems` on the
    student's config (read from `model_path`, default train.student.model resolved) and the
    configured metric sinks."""
    from transformers import AutoConfig

    from distill.teachers.models import resolve_model
    from distill.train.metrics import check_sinks

    try:
        model_config = AutoConfig.from_pretrained(model_path or resolve_model(cfg.student.model))
    except (OSError, ValueError) as e:
        raise ConfigError([f"train.student.model={cfg.student.model!r}: cannot read its config ({e}); give a "
                           "local model directory or a Hub id that is reachable (or in the local cache)"]) from None
    problems = student_problems(cfg, model_config) + check_sinks(cfg.metrics)
    if problems:
        raise ConfigError(problems)


def prepare(cfg: TrainConfig, run_dir: Path) -> TrainJob:
    """Validate against the model, build (or reuse) the token cache; the job every rank runs."""
    from distill.teachers.models import resolve_model
    from distill.train.backends import backend_class
    from distill.train.data import build_token_cache

    # Every path a worker reads is made absolute here: Ray Train workers do not run in the
    # driver's working directory, so a relative run.dir (the quickstart's) would not resolve there.
    run_dir = Path(run_dir).resolve()
    model_path = resolve_model(cfg.student.model)
    if Path(model_path).exists():
        model_path = str(Path(model_path).resolve())
    if cfg.fault.dump_dir is not None:
        cfg = cfg.model_copy(update={"fault": cfg.fault.model_copy(update={"dump_dir": cfg.fault.dump_dir.resolve()})})
    check_student(cfg, model_path)  # again: `distill train` and torchrun have no preflight of their own
    files = [f.absolute() for f in data_files(cfg, run_dir)]  # tokenising workers may run in other directories
    out_dir = run_dir / "train"
    cache = build_token_cache(files, model_path, max_len=cfg.seq_len, out_dir=cfg.data.cache_dir or out_dir / "token_cache",
                              messages_column=cfg.data.messages_column, map_chunks=_chunk_map(cfg.data.tokenize_workers))
    backend_class(cfg.backend).prepare(cfg)
    print(f"train: token cache {cache.path}: {cache.n_samples} samples, {int(cache.lengths.sum())} tokens, "
          f"{int(cache.n_targets.sum())} targets; {cache.n_dropped} longer than train.seq_len={cfg.seq_len} dropped, "
          f"{cache.n_rejected} malformed rows rejected", flush=True)
    if cache.n_samples == 0:
        raise ConfigError([f"no usable training samples in {', '.join(map(str, files))} (see {cache.path}/rejected/)"])
    return TrainJob(train=cfg.model_dump(mode="json"), model_path=model_path, cache_path=str(Path(cache.path).resolve()),
                    out_dir=str(out_dir), checkpoint_dir=str(Path(cfg.checkpoint.dir or out_dir / "checkpoints").resolve()))


def _chunk_map(workers: int | None):
    """Where the token cache's chunks are tokenised: Ray tasks when this process is connected to
    Ray (the driver under `distill run`), so every node's CPUs help; else a local process pool."""
    from distill.train.data import auto_workers, local_chunk_map, local_cpus, ordered_map

    ray = sys.modules.get("ray")  # not imported: cannot be connected (and importing it costs ~1 s)
    if ray is None or not ray.is_initialized():
        return local_chunk_map(auto_workers(local_cpus(), workers))
    n = auto_workers(int(ray.cluster_resources().get("CPU", 1)), workers)

    def run(fn, calls):
        # One CPU per task; Ray reuses its worker processes, so each loads the tokenizer once.
        # A window of n, not more: n caps the tasks running at once, at the cost of a worker
        # idling while the oldest chunk of the window finishes (chunks are of one size).
        task = ray.remote(fn).options(num_cpus=1)
        return ordered_map(lambda call: task.remote(*call), ray.get, calls, window=n, cancel=ray.cancel)

    return run


def launch(job: TrainJob) -> Path:
    """Run the workers to completion (restarting them after failures, train.fault); the final
    checkpoint directory."""
    from distill.train.checkpoint import latest_checkpoint
    from distill.train.monitor import launch_goodput, write_goodput

    cfg = job.config()
    job.launched_at = time.time()
    runner = {"ray": _launch_ray, "torchrun": _launch_torchrun, "local": _launch_local}[cfg.launch.launcher]
    try:
        runner(job, cfg)
    except BaseException:
        # Rank 0 writes goodput.json when training ends; a run that gave up never gets there.
        write_goodput(Path(job.out_dir), launch_goodput(Path(job.out_dir), job.launched_at, now=time.time()))
        raise
    final = latest_checkpoint(Path(job.checkpoint_dir))
    if final is None:
        raise RuntimeError(f"training finished without a checkpoint in {job.checkpoint_dir}")
    return final


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_local(job: TrainJob, cfg: TrainConfig) -> None:
    from distill.train.loop import local_env, train_worker

    saved = {k: os.environ.get(k) for k in local_env(0)}
    os.environ.update(local_env(_free_port()))
    try:
        outcome = train_worker(job)
        outcome.backend.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torchrun_command(job_file: Path, num_workers: int, max_restarts: int = 0) -> list[str]:
    # torchrun has no "unlimited": -1 (train.fault.max_failures) becomes a number never reached.
    restarts = 10**6 if max_restarts < 0 else max_restarts
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_workers}",
            f"--max-restarts={restarts}", "-m", "distill.train.torchrun", "--job", str(job_file)]


def _launch_torchrun(job: TrainJob, cfg: TrainConfig) -> None:
    job_file = job.write(Path(job.out_dir) / "job.json")
    cmd = torchrun_command(job_file, cfg.launch.num_workers, cfg.fault.max_failures)
    # OMP threads per rank: torchrun would otherwise force 1. A fresh store per restart: with the
    # rendezvous store shared (torch's default), a restarted group reads its dead predecessor's
    # addresses for new process groups (pytorch/pytorch#135712) and fails to connect.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(cfg.launch.cpus_per_worker))),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise RuntimeError(f"torchrun exited with status {rc}: {' '.join(cmd)}")


def _ray_worker(config: dict) -> None:
    import ray

    from distill.train.loop import train_worker

    outcome = train_worker(TrainJob(**config["job"]), node=ray.get_runtime_context().get_node_id())
    outcome.backend.close()


def excluded_nodes_selector(nodes: list[str]) -> dict[str, str] | None:
    """Ray label selector keeping workers off `nodes` (Ray node ids). Pure."""
    return {"ray.io/node-id": f"!in({','.join(nodes)})"} if nodes else None


def _launch_ray(job: TrainJob, cfg: TrainConfig) -> None:
    from dataclasses import asdict

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from distill.train.monitor import launch_records

    use_gpu = cfg.launch.gpus_per_worker > 0
    resources = {"CPU": cfg.launch.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.launch.gpus_per_worker
    fault = cfg.fault
    excluded: list[str] = []
    while True:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"job": asdict(job)},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(fault.collective_timeout_s)),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.launch.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=resources,
                                                   label_selector=excluded_nodes_selector(excluded)),
            # Ray Train's own bookkeeping; checkpoints are the trainer's, in job.checkpoint_dir.
            # A failed worker (error, death, the hang watchdog's exit) restarts the whole group,
            # which resumes from the latest good checkpoint there.
            run_config=ray.train.RunConfig(name="ray", storage_path=str(Path(job.out_dir).resolve()),
                                           failure_config=ray.train.FailureConfig(max_failures=fault.max_failures),
                                           # Ray Train's print patch logs every print AND lets it
                                           # reach stdout: each progress line would show twice.
                                           worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        )
        trainer.fit()
        # A straggler restart ends the attempt cleanly (checkpoint written) and names a node.
        starts, _, wanted = launch_records(Path(job.out_dir), job.launched_at)
        new = [n for n in wanted if n not in excluded]
        if not new:
            return
        if 0 <= fault.max_failures < len(starts):
            raise RuntimeError(f"train: {len(starts)} attempts, more than train.fault.max_failures="
                               f"{fault.max_failures} restarts allow; last straggler node {new[-1]}")
        excluded += new
        print(f"train: restarting without node(s) {', '.join(excluded)} (straggler policy restart_without)",
              flush=True)
