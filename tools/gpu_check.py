"""The parts of tools/gpu_check.sh that are Python: numerical checks that run the same code on a GPU
(bf16, NCCL) and, for the CPU rehearsal, on CPU at tiny sizes, and the JSON summary.

    gpu_check.py env                     torch / CUDA / packages / which packed-attention kernel
    gpu_check.py deepspeed [--tiny]      ZeRO-2 and ZeRO-3, one device, vs a CPU fp32 reference;
                                         resume = uninterrupted; export logits = trained logits
    gpu_check.py megatron [--tiny]       Megatron backend TP=1 on the device vs the same run on CPU (fp32)
    gpu_check.py summarize WORK OUT      steps.jsonl + results/*.json -> OUT/summary.json, OUT/logs.tar.gz

Each check prints one JSON line (its figures, and "pass") and exits 1 when a tolerance is missed.
Tolerances (bf16 keeps 8 mantissa bits, ~4e-3 per rounding; two devices sum in different orders):
- a bf16 run tracks the CPU fp32 reference: every step's loss within rel 2e-2 (DeepSpeed: 10
  steps of a SmolLM2-135M-shaped model; Megatron: 6 steps of a 4-layer Qwen2);
- resume = uninterrupted: every loss within rel 1e-3 on GPU (kernels may reorder sums between
  runs), 1e-6 on CPU;
- export logits = trained logits: max |difference| within 2e-2 of the logits' max |value| in bf16
  (the export is loaded by transformers with its own SDPA, the trained model ran the packed
  attention), 1e-5 absolute in fp32.
`summarize` needs only the standard library: it runs with the machine's bare interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- summary (stdlib only)


def summarize(work: Path, out: Path) -> dict:
    """Collect the steps recorded so far into out/summary.json and the logs into out/logs.tar.gz
    (two files: the device hands back at most 8). Called after every step, so a run killed at its
    time limit still leaves a summary of what finished."""
    steps = [json.loads(ln) for ln in (work / "steps.jsonl").read_text().splitlines() if ln.strip()] \
        if (work / "steps.jsonl").is_file() else []
    results = {}
    for step in steps:
        path = work / "results" / f"{step['step']}.json"
        if path.is_file():
            lines = path.read_text().strip().splitlines()
            try:  # a check prints one JSON line last; other steps' output is only in the logs
                results[step["step"]] = json.loads(lines[-1])
            except (json.JSONDecodeError, IndexError):
                pass
    summary = {"passed": sum(s["ok"] for s in steps), "failed": sum(not s["ok"] for s in steps),
               "wall_s": round(sum(s["seconds"] for s in steps), 1), "steps": steps, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "summary.json")
    with tarfile.open(out / ".logs.tar.gz.tmp", "w:gz") as tar:
        tar.add(work / "logs", arcname="logs")
    (out / ".logs.tar.gz.tmp").replace(out / "logs.tar.gz")
    return summary


# --------------------------------------------------------------------------- env


def env_report() -> dict:
    import importlib.metadata as md

    import torch

    from distill.train.attention import packed_path

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    probe = torch.zeros(1, dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "packed_attention": packed_path(probe),
            **{d: version(d) for d in ("transformers", "deepspeed", "megatron-core", "pydantic", "flash-attn",
                                        "triton", "ray")},
            "pass": True}


# --------------------------------------------------------------------------- DeepSpeed


def close_enough(a: list[float], b: list[float], rel: float) -> float:
    """Largest relative difference between two loss curves of equal length (inf when they differ in length)."""
    if len(a) != len(b) or not a:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def student_dir(root: Path, tiny: bool) -> Path:
    """A random-weight student with the SmolLM2 tokenizer: SmolLM2-135M's shape from its config,
    or the 2-layer tiny one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from distill.teachers.models import resolve_model
    from distill.train.model import tiny_student

    src = resolve_model(TOKENIZER)
    out = root / ("tiny" if tiny else "smollm2-135m-shape")
    if out.is_dir():
        return out
    if tiny:
        model = tiny_student(src)
    else:
        import torch

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def check_deepspeed(tiny: bool, root: Path) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import GSM8K_TRAIN
    from train_probe import PROBE_IDS, TrainAssets, make_job, read_losses, run_probe, write_sft_jsonl

    from distill.train.config import TrainConfig
    from distill.train.launch import prepare

    gpu = torch.cuda.is_available()
    steps, seq_len = (4, 256) if tiny else (10, 512)
    half = steps // 2
    model = student_dir(root, tiny)
    data = write_sft_jsonl(GSM8K_TRAIN, root / "sft.jsonl", 48 if tiny else 200)
    base = {"seq_len": seq_len, "optimizer.lr": 1e-4, "schedule.warmup_steps": 1, "launch.num_workers": 1,
            "launch.cpus_per_worker": max(1, (os.cpu_count() or 2) // 2), "schedule.total_steps": steps}
    from train_probe import tiny_train_config

    job0 = prepare(TrainConfig.model_validate(tiny_train_config(model, data, **base)), root / "base")
    assets = TrainAssets(root=root, model=model, data=data, cache=job0.cache_path, base=base)

    def train(name: str, stage: int, max_steps: int, *, cpu: bool = False, every: int = steps) -> tuple:
        job = make_job(assets, name, max_steps=max_steps, **{"deepspeed.zero_stage": stage,
                                                             "checkpoint.every_steps": every})
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if cpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the reference: CPU, fp32, gloo
        try:
            logits = run_probe(job, world=1)
        finally:
            if cpu:
                os.environ.pop("CUDA_VISIBLE_DEVICES") if saved is None else os.environ.update(
                    CUDA_VISIBLE_DEVICES=saved)
        losses = read_losses(job)
        return job, [losses[s] for s in sorted(losses)], logits

    t0 = time.monotonic()
    if not gpu:
        # DeepSpeed's CPU accelerator JIT-builds its shared-memory collective op in the first
        # process group (minutes on 2 busy cores, then cached in TORCH_EXTENSIONS_DIR): once here,
        # outside the launches' 240 s limit. The CUDA accelerator builds nothing (NCCL).
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    _, ref, _ = train("cpu-fp32", 2, steps, cpu=True)
    _, z2, _ = train("zero2", 2, steps)
    z3_job, z3, z3_logits = train("zero3", 3, steps)
    train("zero3-resumed", 3, half, every=half)
    resumed_job, resumed, resumed_logits = train("zero3-resumed", 3, steps, every=half)

    from transformers import AutoModelForCausalLM

    from distill.export.hf import export_checkpoint
    from distill.train.checkpoint import latest_checkpoint

    exported = export_checkpoint(latest_checkpoint(Path(resumed_job.checkpoint_dir)), root / "exported",
                                 max_shard_size_mb=200)
    dtype = torch.bfloat16 if gpu else torch.float32
    device = "cuda" if gpu else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).to(device)
    with torch.no_grad():
        export_logits = loaded(input_ids=torch.tensor(PROBE_IDS, device=device)).logits.float().cpu().numpy()
    export_err = float(np.abs(export_logits - resumed_logits).max())
    scale = float(np.abs(resumed_logits).max())

    track_tol = 2e-2 if gpu else 1e-5
    resume_tol = 1e-3 if gpu else 1e-6
    export_ok = export_err <= (2e-2 * scale if gpu else 1e-5)
    out = {"check": "deepspeed", "device": torch.cuda.get_device_name(0) if gpu else "cpu",
           "precision": "bf16" if gpu else "fp32", "steps": steps, "seq_len": seq_len,
           "model": "tiny" if tiny else "SmolLM2-135M shape, random weights",
           "losses": {"cpu_fp32": ref, "zero2": z2, "zero3": z3, "zero3_resumed": resumed},
           "zero2_vs_cpu_rel": close_enough(z2, ref, track_tol), "zero3_vs_cpu_rel": close_enough(z3, ref, track_tol),
           "resumed_vs_straight_rel": close_enough(resumed, z3, resume_tol),
           "resumed_logits_vs_straight_max_abs": float(np.abs(resumed_logits - z3_logits).max()),
           "export_logits_max_abs": export_err, "logits_max_abs": scale,
           "tolerances": {"track_rel": track_tol, "resume_rel": resume_tol,
                          "export": "2e-2 x max|logits|" if gpu else "1e-5 abs"},
           "seconds": round(time.monotonic() - t0, 1)}
    out["pass"] = bool(out["zero2_vs_cpu_rel"] <= track_tol and out["zero3_vs_cpu_rel"] <= track_tol
                       and out["resumed_vs_straight_rel"] <= resume_tol and export_ok)
    return out


# --------------------------------------------------------------------------- Megatron


def megatron_losses(tiny: bool, steps: int) -> dict:
    """Losses of `steps` Megatron steps (TP=1, one process) on fixed packed batches, on whatever
    device this process sees: bf16 on CUDA, fp32 on CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.testing.batches import packed_rows

    from distill.train.backends.megatron import MegatronBackend
    from distill.train.config import TrainConfig
    from distill.train.loop import local_env

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(local_env(s.getsockname()[1]))
    gpu = torch.cuda.is_available()
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512) if tiny else \
        dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=4096)
    seq_len = 256 if tiny else 1024
    hf_cfg = AutoConfig.for_model("qwen2", max_position_embeddings=seq_len, tie_word_embeddings=True, **shape)
    cfg = TrainConfig.model_validate({"backend": "megatron", "seq_len": seq_len, "optimizer": {"lr": 1e-3},
                                      "schedule": {"warmup_steps": 1}, "launch": {"launcher": "local"}})
    backend = MegatronBackend(cfg, precision="bf16" if gpu else "fp32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    if gpu:
        model = model.to(torch.bfloat16)
    backend.setup(model, total_steps=steps)
    losses = []
    for s in range(steps):
        batch = packed_rows(2, seq_len, shape["vocab_size"], seed=s, min_len=seq_len // 8, max_len=seq_len // 2)
        losses.append(backend.train_step([batch], batch.n_target_tokens).loss)
    backend.close()
    return {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "precision": "bf16" if gpu else "fp32",
            "losses": losses}


def check_megatron(tiny: bool, root: Path) -> dict:
    steps = 6
    t0 = time.monotonic()
    runs = {}
    for name, hide in (("device", False), ("cpu", True)):
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if hide else {})}
        cmd = [sys.executable, __file__, "megatron-run", "--steps", str(steps)] + (["--tiny"] if tiny else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        (root / f"megatron-{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"megatron {name} run failed: {proc.stderr[-3000:]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    gpu = runs["device"]["precision"] == "bf16"
    tol = 2e-2 if gpu else 1e-6
    rel = close_enough(runs["device"]["losses"], runs["cpu"]["losses"], tol)
    return {"check": "megatron", "tp": 1, "steps": steps, "device": runs["device"]["device"],
            "precision": runs["device"]["precision"], "losses": {k: v["losses"] for k, v in runs.items()},
            "device_vs_cpu_rel": rel, "tolerance_rel": tol, "seconds": round(time.monotonic() - t0, 1),
            "pass": bool(rel <= tol)}


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    for name in ("deepspeed", "megatron", "megatron-run"):
        s = sub.add_parser(name)
        s.add_argument("--tiny", action="store_true", help="rehearsal sizes (CPU)")
        s.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "distill-gpu-check")
        s.add_argument("--steps", type=int, default=6)
    s = sub.add_parser("summarize")
    s.add_argument("work", type=Path)
    s.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "summarize":
        summary = summarize(args.work, args.out)
        print(f"gpu_check: {summary['passed']} passed, {summary['failed']} failed ({summary['wall_s']} s)")
        return 0
    if args.cmd == "env":
        result = env_report()
    elif args.cmd == "megatron-run":
        result = megatron_losses(args.tiny, args.steps)
        result["pass"] = True
    else:
        root = args.work / args.cmd
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        result = (check_deepspeed if args.cmd == "deepspeed" else check_megatron)(args.tiny, root)
    print(json.dumps(result), flush=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
