"""Training metric sinks for real: TensorBoard (the default), W&B in offline mode (a local run
directory) and MLflow with a file-store tracking URI in tmp. Each logged value is read back from
what the sink wrote. W&B and MLflow are optional for users but in the `dev` extra: their tests need them."""

from __future__ import annotations

import json
import time

import pytest

from distill.train.config import MetricsSection
from distill.train.metrics import MetricsLogger, check_sinks

STEPS = [(1, {"loss": 2.5, "lr": 1e-5, "tokens_per_s": 800.0}),
         (2, {"loss": 2.25, "lr": 2e-5, "tokens_per_s": 820.5}),
         (3, {"loss": 2.0, "lr": 2e-5, "tokens_per_s": 815.0, "mfu": None})]


def _log_all(out_dir, cfg: MetricsSection) -> None:
    logger = MetricsLogger(out_dir, cfg, enabled=True, run_name="sink-test", config={"train": {"seq_len": 128}})
    for step, values in STEPS:
        logger.log(step, values)
    logger.close()


def test_tensorboard_is_the_default_and_holds_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MetricsSection()
    assert cfg.tensorboard and cfg.wandb_project is None and cfg.mlflow_experiment is None
    _log_all(tmp_path, cfg)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/tokens_per_s"}  # None is not a scalar
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.25), (3, 2.0)]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3] and lines[2]["mfu"] is None


def wandb_records(path):
    """Records of an offline `.wandb` file: a 7-byte header (`:W&B`, magic, version), then the
    LevelDB log format (32 KiB blocks; records with crc32, length, type FULL/FIRST/MIDDLE/LAST) of
    `wandb_internal_pb2.Record` protobufs. Read here because wandb 0.31 ships no Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_run_directory_holds_the_logged_metrics(tmp_path, monkeypatch):
    import wandb  # noqa: F401  (in the dev extra: a missing install fails here, it is not skipped)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = MetricsSection(tensorboard=False, wandb_project="distill-test")
    assert check_sinks(cfg) == []
    _log_all(tmp_path / "out", cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (data,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads later
    # wandb.finish() can return before wandb-core has flushed the file: wait for its exit record.
    deadline = time.monotonic() + 60
    while True:
        records = list(wandb_records(data))
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "run" in kinds and kinds[-1] == "exit", kinds
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "distill-test" and run.display_name == "sink-test"
    assert json.loads(dict((i.key, i.value_json) for i in run.config.update)["train"]) == {"seq_len": 128}
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(int(h["_step"]), float(h["train/loss"]), float(h["train/tokens_per_s"])) for h in history] == [
        (1, 2.5, 800.0), (2, 2.25, 820.5), (3, 2.0, 815.0)]
    assert all("train/mfu" not in h for h in history)  # None is not logged


def test_mlflow_file_store_holds_params_and_metric_history(tmp_path, monkeypatch):
    import mlflow  # noqa: F401  (in the dev extra: a missing install fails here, it is not skipped)
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3 puts the file store in maintenance mode and refuses it unless allowed; its
    # replacement (sqlite) needs SQLAlchemy, which mlflow-skinny does not install.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = MetricsSection(tensorboard=False, mlflow_experiment="distill-test")
    assert check_sinks(cfg) == []
    _log_all(tmp_path / "out", cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("distill-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "sink-test" and run.info.status == "FINISHED"
    assert run.data.params == {"train.seq_len": "128"}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.5), (2, 2.25), (3, 2.0)]
    assert "mfu" not in run.data.metrics


def test_a_configured_sink_that_is_not_installed_is_named_before_training(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    problems = check_sinks(MetricsSection(wandb_project="p", mlflow_experiment="e"))
    assert problems == ["train.metrics.wandb_project='p' needs `pip install wandb` (or unset it)",
                        "train.metrics.mlflow_experiment='e' needs `pip install mlflow` (or unset it)"]
