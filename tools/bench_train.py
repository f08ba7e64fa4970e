"""Training throughput: distill (packed rows, DeepSpeed ZeRO-2, one process) vs Hugging Face
`Trainer` with padded batches (what users would otherwise run), same model, same samples, same
precision (fp32 on CPU), same machine, one run each.

Samples are GSM8K chats whose assistant turn is stretched to a long-CoT-like length drawn
log-uniformly from [--min-len, --max-len] tokens. Both trainers see the same token ids and the
same target tokens; the figure compared is target tokens per second of training-step time
(model loading and tokenisation excluded).

    python tools/bench_train.py                      # SmolLM2-135M, ~10 minutes on 2 cores
    python tools/bench_train.py --model tiny --samples 16   # a smoke run in ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from distill.fsio import read_jsonl
from distill.testing.batches import pad_collate

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "train" / "gsm8k_train.jsonl"


def make_data(path: Path, tokenizer, n: int, min_len: int, max_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = read_jsonl(GSM8K)[:n]
    with open(path, "w") as f:
        for r in rows:
            target = int(np.exp(rng.uniform(np.log(min_len), np.log(max_len))))
            base = (r.get("solution") or r["answer"]) + " "
            reps = max(1, target // max(1, len(tokenizer(base)["input_ids"])))
            reply = (base * reps).strip()
            f.write(json.dumps({"messages": [{"role": "user", "content": r["problem"]},
                                             {"role": "assistant", "content": reply}]}) + "\n")


def bench_distill(model_path: str, data: Path, work: Path, seq_len: int, threads: int) -> dict:
    from distill.train.config import TrainConfig
    from distill.train.launch import launch, prepare

    cfg = TrainConfig.model_validate({
        "data": {"paths": [str(data)]}, "student": {"model": model_path}, "seq_len": seq_len,
        "micro_batch": 1, "grad_accum": 1, "epochs": 1, "schedule": {"warmup_steps": 1},
        "launch": {"launcher": "local", "num_workers": 1, "cpus_per_worker": threads},
        "checkpoint": {"every_steps": 10**6, "keep_last": 1}, "metrics": {"tensorboard": False},
        "deepspeed": {"zero_stage": 2}})
    job = prepare(cfg, work)
    launch(job)
    rows = read_jsonl(Path(job.out_dir) / "metrics.jsonl")
    seconds = sum(r["step_s"] for r in rows)
    targets = sum(r["target_tokens"] for r in rows)
    eff = float(np.mean([r["packing_efficiency"] for r in rows]))
    return {"steps": len(rows), "seconds": seconds, "target_tokens": targets, "target_tok_s": targets / seconds,
            "packing_efficiency": eff, "cache": job.cache_path}


def bench_hf(model_path: str, cache_path: str, work: Path, batch_size: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from distill.train.data import load_token_cache

    torch.set_num_threads(threads)
    cache = load_token_cache(Path(cache_path))
    samples = []
    for i in range(cache.n_samples):
        ids, shifted = cache.sample(i)
        # transformers shifts labels inside the model: give it the unshifted targets.
        labels = np.concatenate([[-100], shifted[:-1]]).astype(np.int64)
        samples.append({"input_ids": ids.astype(np.int64), "labels": labels})

    class Timer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            Timer.seconds += time.perf_counter() - self.t

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=batch_size, num_train_epochs=1,
                             learning_rate=2e-5, warmup_steps=1, logging_steps=10**6, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=pad_collate, callbacks=[Timer()])
    trainer.train()
    targets = int(sum((s["labels"] != -100).sum() for s in samples))
    steps = -(-len(samples) // batch_size)
    return {"steps": steps, "seconds": Timer.seconds, "target_tokens": targets, "target_tok_s": targets / Timer.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="student (or `tiny` for a smoke run)")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--min-len", type=int, default=200)
    p.add_argument("--max-len", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=4096, help="distill's packed row length")
    p.add_argument("--hf-batch", type=int, default=2, help="HF Trainer samples per (padded) batch")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from distill.teachers.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tok_dir = resolve_model("smollm2-135m-instruct")
    if args.model == "tiny":
        from distill.train.model import tiny_student

        model_path = str(work / "tiny")
        tiny_student(tok_dir).save_pretrained(model_path)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(model_path)
    else:
        model_path = resolve_model(args.model)
    data = work / "sft.jsonl"
    make_data(data, AutoTokenizer.from_pretrained(tok_dir), args.samples, args.min_len, args.max_len, seed=0)

    d = bench_distill(model_path, data, work / "distill", args.seq_len, args.threads)
    h = bench_hf(model_path, d["cache"], work, args.hf_batch, args.threads)
    assert d["target_tokens"] <= h["target_tokens"]
    print(f"\nmodel {args.model}, {args.samples} samples of {args.min_len}-{args.max_len} tokens, fp32, "
          f"{args.threads} CPU threads\n")
    print("| trainer | steps | target tokens | step time (s) | target tok/s |")
    print("|---|---|---|---|---|")
    print(f"| distill (packed {args.seq_len}, ZeRO-2) | {d['steps']} | {d['target_tokens']} | {d['seconds']:.1f} | "
          f"{d['target_tok_s']:.1f} |")
    print(f"| HF Trainer (padded, batch {args.hf_batch}) | {h['steps']} | {h['target_tokens']} | {h['seconds']:.1f} | "
          f"{h['target_tok_s']:.1f} |")
    print(f"\nratio distill / HF: {d['target_tok_s'] / h['target_tok_s']:.2f}x; distill packing efficiency "
          f"{d['packing_efficiency']:.1%}")


if __name__ == "__main__":
    main()
