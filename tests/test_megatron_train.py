"""The Megatron backend end to end on CPU (gloo, 2 processes), through the trainer's own loop:

- TP=2: N steps, stop, resume for N more -> the same losses and weights as 2N steps straight,
  and the loss goes down;
- `distill export` of that checkpoint: transformers loads it, logits equal the trained weights';
- PP=2 through the project's torchrun launcher (`distill.train.launch.launch`): trains (1F1B
  schedule with a tied embedding split over the stages) and checkpoints.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import distill_cmd
from train_probe import PROBE_IDS, make_assets, make_job, read_losses, run_probe

pytestmark = pytest.mark.slow
N = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gsm8k_train):
    # 4 layers so that PP=2 has two per stage.
    return make_assets(tmp_path_factory.mktemp("mg"), gsm8k_train, rows=48, num_hidden_layers=4,
                       backend="megatron", **{"megatron.tensor_parallel": 2})


@pytest.fixture(scope="module")
def resumed(assets):
    common = {"schedule.total_steps": 2 * N, "checkpoint.every_steps": N}
    straight = make_job(assets, "straight", max_steps=2 * N, **common)
    straight_logits = run_probe(straight)
    first = make_job(assets, "resumed", max_steps=N, **common)
    run_probe(first)
    assert sorted(read_losses(first)) == list(range(1, N + 1))
    second = make_job(assets, "resumed", max_steps=2 * N, **common)
    return straight, straight_logits, second, run_probe(second)


def test_resume_gives_identical_losses(resumed):
    straight, straight_logits, second, resumed_logits = resumed
    a, b = read_losses(straight), read_losses(second)
    assert sorted(a) == sorted(b) == list(range(1, 2 * N + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a, b)
    assert a[2 * N] < a[1]
    np.testing.assert_allclose(resumed_logits, straight_logits, rtol=0, atol=1e-5)
    ckpt = Path(second.checkpoint_dir) / "step-00000004" / "megatron"
    assert sorted(p.name for p in ckpt.glob("model-*.pt")) == ["model-tp00-pp00.pt", "model-tp01-pp00.pt"]


def test_distill_export_loads_in_transformers(resumed, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _, _, job, trained_logits = resumed
    out = tmp_path / "model"
    proc = subprocess.run(distill_cmd("export", job.checkpoint_dir, str(out), "--max-shard-size-mb", "1"),
                          capture_output=True, text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_IDS)).logits.numpy()
    np.testing.assert_allclose(logits, trained_logits, rtol=0, atol=1e-5)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_pipeline_parallel_trains_through_the_torchrun_launcher(assets):
    from distill.train.launch import launch

    job = make_job(assets, "pp2", max_steps=3, **{"megatron.tensor_parallel": 1, "megatron.pipeline_parallel": 2,
                                                 "schedule.total_steps": 3, "checkpoint.every_steps": 3})
    final = launch(job)
    assert final.name == "step-00000003"
    assert sorted(p.name for p in (final / "megatron").glob("model-*.pt")) == ["model-tp00-pp00.pt",
                                                                                "model-tp00-pp01.pt"]
    losses = read_losses(job)
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1]


def test_data_parallel_and_sharded_optimizer(assets):
    """2 data ranks x 2 micro-batches, optimizer state sharded over them or replicated: identical
    losses (sharding moves the AdamW update, not its arithmetic). 1 data rank of a TP=2 group x 4
    micro-batches sees the same global batches: the same losses up to float reordering (TP splits
    the matmuls; Adam amplifies the last bits of near-zero gradients, hence rel 2e-4 by step 4,
    where a wrong data split differs by ~1e-2)."""
    common = {"schedule.total_steps": 2 * N, "checkpoint.every_steps": 2 * N, "max_steps": 2 * N,
              "megatron.tensor_parallel": 1}
    sharded = make_job(assets, "dp2-sharded", **{**common, "megatron.distributed_optimizer": True})
    replicated = make_job(assets, "dp2-replicated", **{**common, "megatron.distributed_optimizer": False})
    tp2 = make_job(assets, "tp2-ga4", grad_accum=4, **{**common, "megatron.tensor_parallel": 2})
    for job in (sharded, replicated, tp2):
        run_probe(job)
    a, b, c = read_losses(sharded), read_losses(replicated), read_losses(tp2)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 2 * N + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6), (step, a, b)
        assert a[step] == pytest.approx(c[step], rel=2e-4), (step, a, c)
    assert a[2 * N] < a[1]
    assert len(list((Path(sharded.checkpoint_dir) / "step-00000004" / "megatron").glob("optim-*-dp*.pt"))) == 2
