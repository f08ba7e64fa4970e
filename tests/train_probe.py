"""Test helpers for the trainer: a tiny student on disk, SFT data from GSM8K, the assets and jobs
of an end-to-end training test, and (run under torchrun as a script) train one job then save the
trained weights' logits on a fixed batch (rank 0), so tests can compare them with an exported
model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from distill.train.loop import TrainJob

PROBE_IDS = [[1, 520, 3012, 42, 7, 9001, 314, 15, 2, 88, 1000, 12, 5, 777, 31, 64]]


def make_tiny_model(out: Path, num_hidden_layers: int = 2) -> Path:
    """A random-weight llama (2 layers unless told) with SmolLM2's tokenizer and chat template, saved."""
    from transformers import AutoTokenizer

    from distill.teachers.models import resolve_model
    from distill.train.model import tiny_student

    tok_dir = resolve_model("smollm2-135m-instruct")
    tiny_student(tok_dir, num_hidden_layers=num_hidden_layers).save_pretrained(out)
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


@dataclass(frozen=True)
class TrainAssets:
    """What every job of one end-to-end training test module shares."""

    root: Path
    """Folder the jobs' output folders go under."""
    model: Path
    """The tiny student (make_tiny_model)."""
    data: Path
    """SFT chats (write_sft_jsonl)."""
    cache: str
    """The token cache built once by `prepare`; every job reuses it instead of tokenising again."""
    base: dict
    """Overrides every job starts from (and `prepare` validated), e.g. the backend and its degrees."""


def make_assets(root: Path, gsm8k: Path, *, rows: int, num_hidden_layers: int = 2, **base) -> TrainAssets:
    """A tiny student, `rows` GSM8K chats and their token cache under `root`."""
    from distill.train.config import TrainConfig
    from distill.train.launch import prepare

    model = make_tiny_model(root / "tiny", num_hidden_layers)
    data = write_sft_jsonl(gsm8k, root / "sft.jsonl", rows)
    job = prepare(TrainConfig.model_validate(tiny_train_config(model, data, **base)), root / "base")
    return TrainAssets(root=root, model=model, data=data, cache=job.cache_path, base=base)


def make_job(assets: TrainAssets, name: str, **overrides) -> TrainJob:
    """A job writing under ROOT/name/train (made here, as `prepare` does in a real run); the same
    name twice continues the same run (resume)."""
    from distill.train.config import TrainConfig
    from distill.train.loop import TrainJob

    cfg = TrainConfig.model_validate(tiny_train_config(assets.model, assets.data, **{**assets.base, **overrides}))
    out = assets.root / name / "train"
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(train=cfg.model_dump(mode="json"), model_path=str(assets.model), cache_path=assets.cache,
                    out_dir=str(out), checkpoint_dir=str(out / "checkpoints"))


def run_probe(job: TrainJob, world: int = 2) -> np.ndarray:
    """Train `job` under torchrun in fresh processes (this file as the script); the trained
    weights' logits on PROBE_IDS."""
    import numpy as np

    out = Path(job.out_dir)
    job_file = job.write(out / "job.json")
    logits = out / f"logits-{len(list(out.glob('logits-*')))}.npy"
    here = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(here), str(job_file), str(logits)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return np.load(logits)


def read_losses(job: TrainJob) -> dict[int, float]:
    """step -> loss from the job's metrics.jsonl."""
    from distill.fsio import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(Path(job.out_dir) / "metrics.jsonl")}


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
