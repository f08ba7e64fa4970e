"""The Megatron backend on CUDA (one GPU, one process): logits parity with HF, and the bf16
flash-attn varlen path training through the throughput benchmark. Skipped without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.gpu


def test_logits_equal_hf_on_gpu(tmp_path):
    out = tmp_path / "logits.npz"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(REPO / "tests" / "megatron_probe.py"), "logits", "qwen2", "1", "1", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    d = np.load(out)
    np.testing.assert_allclose(d["megatron"], d["hf"], rtol=0, atol=1e-3)


def test_bf16_flash_training_runs():
    from distill.train.attention import flash_attn_available

    if not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    cmd = [sys.executable, str(REPO / "tools" / "bench_megatron.py"), "--seq-len", "4096", "--steps", "2",
           "--warmup", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["flash_attn"] and row["precision"] == "bf16"
    assert all(np.isfinite(row["losses"])) and row["tokens_per_s"] > 0
