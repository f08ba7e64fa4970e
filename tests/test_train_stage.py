"""The `train` stage end to end under Ray Train (TorchTrainer, 2 CPU workers, gloo): SFT data
from RUN/sft/ Parquet shards, checkpoints + metrics.jsonl + TensorBoard under RUN/train/, the
final model exported to RUN/model/ and loadable by transformers; a second run resumes from the
final checkpoint and only re-exports."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train_probe import make_tiny_model, tiny_train_config, write_sft_jsonl

pytestmark = pytest.mark.slow


def test_train_stage_on_ray(tmp_path, gsm8k_train, capsys):
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from distill.stages.train import run
    from distill.config import RunConfig
    from distill.fsio import read_jsonl

    model = make_tiny_model(tmp_path / "tiny")
    rows = [json.loads(line) for line in write_sft_jsonl(gsm8k_train, tmp_path / "sft.jsonl", 32).read_text().splitlines()]
    run_dir = tmp_path / "run"
    (run_dir / "sft").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "sft" / "part-00000.parquet")
    tree = tiny_train_config(model, tmp_path / "unused", max_steps=3, **{
        "launch.launcher": "ray", "launch.num_workers": 2, "launch.cpus_per_worker": 1,
        "checkpoint.every_steps": 2, "metrics.tensorboard": True})
    tree["data"] = {}  # default: RUN/sft/
    cfg = RunConfig.model_validate({"run": {"dir": str(run_dir), "stages": ["train"]}, "train": tree})

    ray.init(num_cpus=2, include_dashboard=True, address="local")
    try:
        out = run(cfg, run_dir)
        first = capsys.readouterr().out
        assert out == run_dir / "model"
        assert f'AutoModelForCausalLM.from_pretrained("{out}")' in first
        metrics = read_jsonl(run_dir / "train" / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3]
        for m in metrics:
            assert m["loss"] > 0 and m["target_tokens_per_s"] > 0 and 0 < m["packing_efficiency"] <= 1
        assert list((run_dir / "train" / "tensorboard").glob("events.out.tfevents.*"))
        ckpts = sorted(p.name for p in (run_dir / "train" / "checkpoints").glob("step-*"))
        assert ckpts == ["step-00000002", "step-00000003"]
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert loaded.config.num_hidden_layers == 2

        run(cfg, run_dir)  # finished: resumes at the last step, trains nothing, re-exports
        second = capsys.readouterr().out
        assert "resumed from" in second and "step-00000003" in second
        assert [m["step"] for m in read_jsonl(run_dir / "train" / "metrics.jsonl")] == [1, 2, 3]
    finally:
        ray.shutdown()
