"""`torchrun --nproc-per-node N -m distill.train.torchrun CONFIG [overrides]`: the entry for
clusters without Ray (Slurm), as the README tells users to run it. Two ranks on gloo, a relative
run.dir (both ranks resolve it in the same working directory), `prepare` (token cache, native ops)
on rank 0 only while rank 1 waits on torchrun's store, training, then rank 0's export, which
transformers loads. The hand-over itself is unit-tested on an in-process store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_probe import PROBE_IDS, make_tiny_model, tiny_train_config, write_sft_jsonl


def _job(tmp_path):
    from distill.train.loop import TrainJob

    return TrainJob(train={"seq_len": 64}, model_path="m", cache_path=str(tmp_path / "c"), out_dir=str(tmp_path),
                    checkpoint_dir=str(tmp_path / "ck"))


def test_rank0_prepares_and_the_others_receive_its_job(tmp_path, monkeypatch):
    from torch.distributed import HashStore

    from distill.train.torchrun import prepare_on_rank0

    store, calls = HashStore(), []
    job = _job(tmp_path)

    def prepare():
        calls.append(1)
        return job

    assert prepare_on_rank0(prepare, 0, store) == job
    assert prepare_on_rank0(prepare, 1, store) == job and prepare_on_rank0(prepare, 2, store) == job
    assert calls == [1]
    # A restarted group (torchrun's next attempt) prepares again; it never reads the old answer.
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert prepare_on_rank0(prepare, 0, store) == job and calls == [1, 1]


def test_a_failed_prepare_on_rank0_fails_the_waiting_ranks_with_its_message(tmp_path):
    from torch.distributed import HashStore

    from distill.config import ConfigError
    from distill.train.torchrun import prepare_on_rank0

    store = HashStore()

    def prepare():
        raise ConfigError(["train.seq_len=9000 exceeds the context"])

    with pytest.raises(ConfigError):
        prepare_on_rank0(prepare, 0, store)
    with pytest.raises(RuntimeError, match="(?s)rank 0 failed to prepare the run: ConfigError: .*train.seq_len=9000"):
        prepare_on_rank0(lambda: pytest.fail("only rank 0 prepares"), 1, store)


HANDOVER_SCRIPT = """
import os, sys, torch.distributed as dist
from distill.train.loop import TrainJob
from distill.train.torchrun import launcher_store, prepare_on_rank0
rank = int(os.environ["RANK"])
store = launcher_store()
def prepare():
    print(f"prepared on rank {rank}", flush=True)
    return TrainJob(train={}, model_path="m", cache_path="c", out_dir=sys.argv[1], checkpoint_dir="k")
job = prepare_on_rank0(prepare, rank, store)
dist.init_process_group("gloo")  # the process group's store must coexist with the one above
dist.barrier()
with open(f"got-{rank}.txt", "w") as f:  # a file per rank: two ranks' prints can interleave on one pipe
    f.write(job.out_dir)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("shared", ["agent store", "rank 0 store"])
def test_handover_under_torchrun_before_the_process_group(tmp_path, shared):
    """Under real torchrun, in both of its store modes (the agent's store, the default; or rank 0's,
    with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as distill's own launcher sets it): the job reaches
    every rank before any process group exists, and the group then forms on the same port."""
    (tmp_path / "handover.py").write_text(HANDOVER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if shared == "rank 0 store":
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "handover.py", "OUT"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("prepared on rank") == 1 and "prepared on rank 0" in proc.stdout
    got = {p.name: p.read_text() for p in tmp_path.glob("got-*.txt")}
    assert got == {"got-0.txt": "OUT", "got-1.txt": "OUT"}, proc.stdout


@pytest.mark.slow
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
    # prepare ran once, on rank 0 (its summary line; each rank that prepared would print one)
    assert proc.stdout.count("train: token cache") == 1, proc.stdout[-3000:]
    assert "train: model written to" in proc.stdout and "runs/slurm/model" in proc.stdout, proc.stdout[-2000:]

    exported = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    with torch.no_grad():
        logits = exported(input_ids=torch.tensor(PROBE_IDS)).logits
    assert torch.isfinite(logits).all()
    untrained = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        before = untrained(input_ids=torch.tensor(PROBE_IDS)).logits
    assert (logits - before).abs().max() > 1e-3  # the export holds the trained weights, not the start
