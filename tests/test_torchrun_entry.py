"""`torchrun --nproc-per-node N -m distill.train.torchrun CONFIG [overrides]`: the entry for
clusters without Ray (Slurm), as the README tells users to run it. Two ranks on gloo, a relative
run.dir (both ranks resolve it in the same working directory), the token cache built by whichever
rank takes the lock first, training, then rank 0's export, which transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_probe import PROBE_IDS, make_tiny_model, tiny_train_config, write_sft_jsonl

pytestmark = pytest.mark.slow


def test_torchrun_entry_trains_and_exports(tmp_path, gsm8k_train):
    import torch
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(tmp_path / "tiny")
    data = write_sft_jsonl(gsm8k_train, tmp_path / "sft.jsonl", 24)
    train = tiny_train_config(model, data, max_steps=3, **{"checkpoint.every_steps": 3})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"run": {"dir": "runs/slurm"}, "train": train}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "distill.train.torchrun", "cfg.yaml", "train.optimizer.lr=1e-3"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run = tmp_path / "runs" / "slurm"
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "train" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(losses) == [1, 2, 3]
    # The override reached the ranks (the lr column is the schedule's value, at most the peak).
    lrs = [json.loads(line)["lr"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert max(lrs) == pytest.approx(1e-3, rel=1e-6)
    assert len(list((run / "train" / "token_cache").glob("*/_manifest.json"))) == 1  # built once
    assert "train: model written to" in proc.stdout and "runs/slurm/model" in proc.stdout, proc.stdout[-2000:]

    exported = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor(PROBE_IDS)).logits
    assert torch.isfinite(logits).all()
    untrained = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        before = untrained(input_ids=torch.tensor(PROBE_IDS)).logits
    assert (logits - before).abs().max() > 1e-3  # the export holds the trained weights, not the start
