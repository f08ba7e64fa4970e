"""Checkpoint directory protocol (atomic commit, `latest`, keep-last-K), RNG states in JSON,
resume compatibility and the metrics log: pure, no training process."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from distill.fsio import read_jsonl
from distill.train import checkpoint as ck
from distill.train.loop import plan_signature, planned_steps, resume_problems
from distill.train.config import TrainConfig
from distill.train.metrics import mfu, truncate_jsonl


def _save(root, step, keep=2):
    def parts(tmp):
        (tmp / "ds").mkdir()
        (tmp / "ds" / "weights").write_text(f"step {step}")

    return ck.save_checkpoint(root, step, {"world_size": 1}, rank=0, keep_last=keep, write_parts=parts,
                              barrier=lambda: None)


def test_commit_latest_and_keep_last(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        final = _save(tmp_path, step)
    assert final.name == "step-00000006"
    assert ck.latest_checkpoint(tmp_path) == final
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    assert ck.read_state(final) == {"step": 6, "world_size": 1}
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_killed_save_leaves_the_previous_checkpoint_current(tmp_path):
    _save(tmp_path, 2)
    # A save that died after writing part of its files: only a temporary directory exists.
    ck.begin(tmp_path, 4)
    (tmp_path / ".tmp-step-00000004" / "ds").mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "step-00000002"
    # The next save cleans the leftover and commits.
    assert _save(tmp_path, 4).name == "step-00000004"
    assert not list(tmp_path.glob(".tmp-*"))


def test_latest_pointing_at_a_missing_directory_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step-00000009\n")
    with pytest.raises(FileNotFoundError, match="step-00000009"):
        ck.latest_checkpoint(tmp_path)


def test_rng_state_round_trips_through_json(tmp_path):
    import torch

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(ck.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_resume_refuses_a_different_data_plan():
    cfg = TrainConfig()
    saved = plan_signature(cfg, "abc", 2)
    assert resume_problems(saved, plan_signature(cfg, "abc", 2)) == []
    problems = resume_problems(saved, plan_signature(TrainConfig(grad_accum=4), "abd", 4))
    text = "; ".join(problems)
    assert "token cache" in text and "train.grad_accum" in text and "train.launch.num_workers" in text
    # A backend that reshards (Megatron) may split the same global batch differently...
    resplit = plan_signature(TrainConfig(grad_accum=2), "abc", 1)
    assert resume_problems(saved, resplit, resplit=True) == []
    assert "train.launch.num_workers" in "; ".join(resume_problems(saved, resplit))
    # ...but not change it, nor anything else of the plan.
    problems = resume_problems(saved, plan_signature(TrainConfig(grad_accum=4, seed=1), "abc", 1), resplit=True)
    assert len(problems) == 2 and "global batch changed from 2 to 4 rows" in problems[1] and "train.seed" in problems[0]
    assert planned_steps(TrainConfig(max_steps=50), 100) == 50 and planned_steps(TrainConfig(), 7) == 7


def test_metrics_jsonl_truncated_on_resume_and_mfu(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    truncate_jsonl(path, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert mfu(100, 10, 2.0, None, 1) is None
    assert mfu(1_000_000, 1000, 1.0, 1e12, 2) == pytest.approx(6e9 / 2e12)
