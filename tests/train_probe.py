"""Test helpers for the trainer: a tiny student on disk, SFT data from GSM8K, and (run under
torchrun as a script) train one job then save the trained weights' logits on a fixed batch
(rank 0), so tests can compare them with an exported model's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROBE_IDS = [[1, 520, 3012, 42, 7, 9001, 314, 15, 2, 88, 1000, 12, 5, 777, 31, 64]]


def make_tiny_model(out: Path) -> Path:
    """A 2-layer random-weight llama with SmolLM2's tokenizer and chat template, saved."""
    from transformers import AutoTokenizer

    from distill.teachers.models import resolve_model
    from distill.train.model import tiny_student

    tok_dir = resolve_model("smollm2-135m-instruct")
    tiny_student(tok_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


def write_sft_jsonl(gsm8k: Path, out: Path, n: int) -> Path:
    rows = [json.loads(line) for line in Path(gsm8k).read_text().splitlines()[:n]]
    with open(out, "w") as f:
        for r in rows:
            reply = r.get("solution") or f"The answer is {r['answer']}."
            f.write(json.dumps({"messages": [{"role": "user", "content": r["problem"]},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    return out


def tiny_train_config(model_dir: Path, data: Path, **overrides) -> dict:
    cfg = {"data": {"paths": [str(data)]}, "student": {"model": str(model_dir)}, "seq_len": 256,
           "micro_batch": 1, "grad_accum": 2, "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 1},
           "metrics": {"tensorboard": False}, "launch": {"launcher": "torchrun", "num_workers": 2}}
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def main() -> None:
    import numpy as np
    import torch

    from distill.train.loop import TrainJob, rank_from_env, train_worker

    job, out = TrainJob.read(Path(sys.argv[1])), Path(sys.argv[2])
    outcome = train_worker(job)
    logits = outcome.backend.logits(torch.tensor(PROBE_IDS))
    if rank_from_env() == 0:
        np.save(out, logits.numpy())
    outcome.backend.close()


if __name__ == "__main__":
    main()
