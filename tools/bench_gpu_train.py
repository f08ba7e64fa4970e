"""Training throughput on one GPU, side by side in one run: distill's packed rows through the
DeepSpeed and Megatron backends' train_step against the Hugging Face `Trainer` with padded
batches, same random-weight ~1.5B Qwen2-shaped student (Qwen2.5-1.5B's config), same samples,
bf16. Each backend runs in its own process (its own peak memory); the driver prints a table and
one JSON line last.

    python tools/bench_gpu_train.py                 # GPU: 4k and 16k packed rows
    python tools/bench_gpu_train.py --tiny          # CPU rehearsal: 2-layer model, 256/512 rows, fp32

Samples have long-CoT-like lengths, log-uniform from seq_len/32 to seq_len tokens, the first 10%
of each a prompt (no targets). distill packs them best-fit-decreasing into rows of seq_len, one
row per step; the HF Trainer takes the same samples in batches of max(1, 8192 // seq_len),
padded to the longest. One warm-up step of each (FlexAttention compiles then) is left out of the
timing. Figures: tokens/s and target tokens/s of step time, MFU of the useful FLOPs (the
trainer's metric: 6 * params * tokens + causal attention per sample, so the padding HF computes
does not count) at --peak-flops, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.testing.batches import pad_collate  # noqa: E402

SHAPES = {
    # Qwen2.5-1.5B-Instruct's config.json (1.54B parameters, tied embeddings).
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


class Samples:
    """Random-token samples with the token cache's `sample(i)` view: (ids, shifted labels)."""

    def __init__(self, lengths, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for n in lengths:
            x = rng.integers(0, vocab, size=int(n))
            y = np.roll(x, -1)
            y[:max(1, int(n) // 10)] = -100
            y[-1] = -100
            self.items.append((x, y))

    def sample(self, i: int):
        return self.items[i]


def make_rows(seq_len: int, rows: int, vocab: int, seed: int):
    """(Samples, bins): enough samples for `rows` packed rows, and the first `rows` bins."""
    from distill.train.packing import best_fit_decreasing

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < rows * seq_len * 1.1:
        lengths.append(int(np.exp(rng.uniform(np.log(seq_len / 32), np.log(seq_len)))))
    samples = Samples(lengths, vocab, seed)
    bins = best_fit_decreasing(lengths, seq_len)[:rows]
    return samples, bins


def model_counts(model) -> dict:
    """What the FLOP count needs, read before a backend takes the model over (Megatron converts it
    and frees the HF copy)."""
    from distill.train.metrics import attention_shape, flop_params

    layers, dim = attention_shape(model.config)
    return {"params": sum(p.numel() for p in model.parameters()), "flop_params": flop_params(model),
            "layers": layers, "attn_dim": dim}


def useful_flops(counts: dict, lengths) -> float:
    from distill.train.metrics import attention_flops

    return 6.0 * counts["flop_params"] * int(sum(lengths)) + attention_flops(lengths, counts["layers"],
                                                                               counts["attn_dim"])


def build_model(shape: str, seq_len: int, dtype, device: str, packed: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.train.attention import register_packed_attention

    cfg = AutoConfig.for_model("qwen2", max_position_embeddings=max(seq_len, 32768), sliding_window=None,
                               **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                attn_implementation=register_packed_attention() if packed else "sdpa")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_distill(backend_name: str, args) -> list[dict]:
    import torch

    from distill.train.backends import backend_class
    from distill.train.config import TrainConfig
    from distill.train.loop import local_env
    from distill.train.packing import make_batch

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(local_env(s.getsockname()[1]))
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    longest = max(args.seq_lens)
    cfg = TrainConfig.model_validate({"backend": backend_name, "seq_len": longest, "schedule": {"warmup_steps": 1},
                                      "deepspeed": {"zero_stage": 2}, "launch": {"launcher": "local"}})
    backend = backend_class(backend_name)(cfg, precision="bf16" if gpu else "fp32")
    # Megatron converts from an HF model on the CPU (as the trainer hands it one); DeepSpeed takes it on the GPU.
    model = build_model(args.shape, longest, dtype, "cuda" if gpu and backend_name == "deepspeed" else "cpu", True)
    counts = model_counts(model)
    total = len(args.seq_lens) * (args.warmup + args.steps)
    backend.setup(model, total_steps=total)
    out = []
    for seq_len in args.seq_lens:
        samples, bins = make_rows(seq_len, args.warmup + args.steps, SHAPES[args.shape]["vocab_size"], seed=seq_len)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        tokens = targets = 0
        lengths = []
        for i, b in enumerate(bins):
            if i == args.warmup:
                sync()
                t0 = time.perf_counter()
            batch = make_batch(samples, [b], seq_len)
            stats = backend.train_step([batch], batch.n_target_tokens)
            if i >= args.warmup:
                lengths += [len(samples.sample(j)[0]) for j in b]
                targets += batch.n_target_tokens
        sync()
        dt = time.perf_counter() - t0
        tokens = sum(lengths)
        out.append(result(backend_name, seq_len, args, counts, lengths, tokens, targets, dt, stats.loss,
                          extra={"rows": args.steps, "packing_efficiency": round(tokens / (args.steps * seq_len), 4)}))
    backend.close()
    return out


def run_hf(args) -> list[dict]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    gpu = torch.cuda.is_available()
    model = build_model(args.shape, max(args.seq_lens), torch.bfloat16 if gpu else torch.float32,
                        "cuda" if gpu else "cpu", False)

    def as_hf(samples, idx):
        rows = []
        for i in idx:
            x, y = samples.sample(i)
            rows.append({"input_ids": x.astype(np.int64), "labels": np.concatenate([[-100], y[:-1]]).astype(np.int64)})
        return rows

    class Timer(TrainerCallback):
        seconds, losses = 0.0, []

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            Timer.seconds += time.perf_counter() - self.t

    out = []
    for seq_len in args.seq_lens:
        samples, bins = make_rows(seq_len, args.warmup + args.steps, SHAPES[args.shape]["vocab_size"], seed=seq_len)
        batch = max(1, 8192 // seq_len) if not args.tiny else 2
        warm = [i for b in bins[:args.warmup] for i in b]
        timed = [i for b in bins[args.warmup:] for i in b]
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        for part, idx in (("warmup", warm), ("timed", timed)):
            Timer.seconds = 0.0
            targs = TrainingArguments(output_dir=str(args.work / "hf"), per_device_train_batch_size=batch,
                                      num_train_epochs=1, learning_rate=1e-5, logging_steps=10**6, save_strategy="no",
                                      report_to=[], use_cpu=not gpu, bf16=gpu, dataloader_num_workers=0,
                                      remove_unused_columns=False, seed=0)
            trainer = Trainer(model=model, args=targs, train_dataset=as_hf(samples, idx), data_collator=pad_collate,
                              callbacks=[Timer()])
            res = trainer.train()
        lengths = [len(samples.sample(i)[0]) for i in timed]
        targets = int(sum((samples.sample(i)[1] != -100).sum() for i in timed))
        out.append(result("hf_trainer", seq_len, args, model_counts(model), lengths, sum(lengths), targets, Timer.seconds,
                          res.training_loss, extra={"batch": batch, "padded": True}))
    return out


def result(name, seq_len, args, counts, lengths, tokens, targets, dt, loss, extra) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    flops = useful_flops(counts, lengths)
    return {"bench": "gpu_train", "trainer": name, "seq_len": seq_len, "model": args.shape,
            "params": counts["params"], "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "precision": "bf16" if gpu else "fp32", "tokens": tokens, "target_tokens": targets,
            "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1), "target_tokens_per_s": round(targets / dt, 1),
            "mfu": round(flops / dt / args.peak_flops, 4) if gpu else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
            "last_loss": round(float(loss), 4), **extra}


def drive(args) -> dict:
    """Each trainer in a subprocess, within --budget-s in all; the table; the ratios."""
    started = time.monotonic()
    rows, failures = [], {}
    for name in args.trainers:
        left = args.budget_s - (time.monotonic() - started)
        if left < 20:
            failures[name] = "not run: budget spent"
            continue
        cmd = [sys.executable, __file__, "--run", name, "--work", str(args.work), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--seq-lens", ",".join(map(str, args.seq_lens)),
               "--peak-flops", str(args.peak_flops)] + (["--tiny"] if args.tiny else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            failures[name] = f"timed out after {left:.0f} s"
            continue
        sys.stderr.write(proc.stderr[-4000:])
        got = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"bench"')]
        rows += got
        if proc.returncode != 0:
            failures[name] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    print("| trainer | seq_len | tokens/s | target tok/s | MFU | peak GB | loss |", file=sys.stderr)
    print("|---|---:|---:|---:|---:|---:|---:|", file=sys.stderr)
    for r in rows:
        print(f"| {r['trainer']} | {r['seq_len']} | {r['tokens_per_s']:.0f} | {r['target_tokens_per_s']:.0f} | "
              f"{r['mfu'] if r['mfu'] is not None else '-'} | {r['peak_mem_gb'] or '-'} | {r['last_loss']} |",
              file=sys.stderr)
    by = {(r["trainer"], r["seq_len"]): r for r in rows}
    ratios = {f"{t}/hf_trainer@{s}": round(by[(t, s)]["target_tokens_per_s"] / by[("hf_trainer", s)]["target_tokens_per_s"], 3)
              for (t, s) in by if t != "hf_trainer" and ("hf_trainer", s) in by}
    return {"bench": "gpu_train_summary", "rows": rows, "ratios_target_tok_s": ratios, "failures": failures,
            "seconds": round(time.monotonic() - started, 1), "pass": not failures}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal sizes")
    p.add_argument("--run", choices=["deepspeed", "megatron", "hf"], help="(internal) one trainer in this process")
    p.add_argument("--trainers", default="deepspeed,hf,megatron")
    p.add_argument("--seq-lens", default=None, help="comma-separated (default 4096,16384; --tiny 256,512)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed rows per length (default 3; --tiny 2)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="H100/H200 dense bf16")
    p.add_argument("--budget-s", type=float, default=170.0, help="the driver's time for all trainers")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "distill-bench-gpu-train")
    args = p.parse_args()
    args.shape = "tiny" if args.tiny else "qwen2-1.5b"
    args.seq_lens = [int(x) for x in (args.seq_lens or ("256,512" if args.tiny else "4096,16384")).split(",")]
    args.steps = args.steps or (2 if args.tiny else 3)
    args.trainers = args.trainers.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.run:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(os.cpu_count() or 1)
        rows = run_hf(args) if args.run == "hf" else run_distill(args.run, args)
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    summary = drive(args)
    print(json.dumps(summary), flush=True)
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
