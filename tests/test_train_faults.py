"""Training under injected faults, end to end on CPU (tiny llama, 2 ranks, gloo, DeepSpeed ZeRO-2):

- a clean run flags no straggler; a rank slowed 2x is flagged within 20 steps (torchrun);
- a truncated shard in the newest checkpoint: the next run resumes from the one before (torchrun);
- torchrun restarts the group after a Python error and continues with the same losses;
- on Ray Train: one rank SIGKILLed at step 3, then (in the restarted group) one rank blocked in a
  collective at step 6: the run finishes on its own, its losses equal the uninterrupted run's,
  the hang left stack dumps naming the stuck frames, goodput.json prices both failures;
- on a 3-node local Ray cluster: a slowed rank with policy restart_without restarts the group
  without its node, and training continues from the checkpoint with the same losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train_probe import make_assets, make_job, read_losses

pytestmark = pytest.mark.slow
STEPS = 8
# Same schedule for every run, so step N's loss is comparable across runs of any length.
COMMON = {"schedule.total_steps": 12, "epochs": 4, "checkpoint.every_steps": 2, "fault.straggler.window": 3,
          "fault.straggler.windows": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gsm8k_train):
    return make_assets(tmp_path_factory.mktemp("faults"), gsm8k_train, rows=64)


def _job(assets, name: str, **overrides):
    return make_job(assets, name, **{**COMMON, **overrides})


def _read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()] if Path(path).is_file() else []


def _launch_torchrun(job):
    from distill.train.launch import launch

    return launch(job)


@pytest.fixture(scope="module")
def baseline(assets):
    job = _job(assets, "clean", max_steps=STEPS)
    _launch_torchrun(job)
    return job


def test_clean_run_flags_no_straggler(baseline):
    out = Path(baseline.out_dir)
    assert sorted(read_losses(baseline)) == list(range(1, STEPS + 1))
    assert not (out / "stragglers.jsonl").exists()
    records = {r: _read(out / "step_times" / f"rank-{r:05d}.jsonl") for r in (0, 1)}
    for rank, recs in records.items():
        assert [x["step"] for x in recs] == list(range(1, STEPS + 1))
        for x in recs:
            assert set(x) == {"step", "rank", "node", "attempt", "data_s", "compute_s", "comm_s", "step_s", "time"}
            assert x["rank"] == rank and x["attempt"] == 0
            assert x["compute_s"] > 0 and x["comm_s"] > 0
            # The parts fit in the step (the rest is batching, the stop vote, bookkeeping).
            assert x["data_s"] + x["compute_s"] + x["comm_s"] <= x["step_s"] * 1.001
    good = json.loads((out / "goodput.json").read_text())
    assert good["restarts"] == 0 and good["failures"] == [] and good["lost_s"] == 0
    assert 0 < good["productive_s"] < good["wall_s"]
    assert good["productive_s"] == pytest.approx(sum(x["step_s"] for x in records[0]), abs=0.01)
    last = _read(out / "metrics.jsonl")[-1]
    assert last["goodput/goodput"] == good["goodput"] and last["goodput/restarts"] == 0


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(assets, baseline, capfd):
    import shutil

    job = _job(assets, "corrupt", max_steps=STEPS)
    out, done = Path(job.out_dir), Path(baseline.out_dir)
    shutil.copytree(done / "checkpoints", out / "checkpoints")
    shutil.copy(done / "metrics.jsonl", out / "metrics.jsonl")
    latest = out / "checkpoints" / f"step-{STEPS:08d}"
    shard = next((latest / "ds").rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capfd.readouterr()
    _launch_torchrun(job)
    printed = capfd.readouterr().out
    assert f"{latest} is unusable" in printed and shard.name in printed and "truncated" in printed
    starts = [r for r in _read(out / "attempts.jsonl") if r["event"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [STEPS - 2]
    assert read_losses(job) == read_losses(baseline)  # steps 7-8 retrained from step 6, identically


def test_rank_slowed_twice_is_flagged_within_20_steps(assets, baseline):
    job = _job(assets, "slow", max_steps=10, **{"fault.inject": ["sleep:rank=1:factor=2"]})
    _launch_torchrun(job)
    flags = _read(Path(job.out_dir) / "stragglers.jsonl")
    assert flags, "the slowed rank was not flagged"
    assert {f["rank"] for f in flags} == {1}
    first = flags[0]
    assert first["step"] <= 20 and first["windows"] == 2 and first["policy"] == "warn" and first["action"] == "warned"
    assert 1.5 < first["ratio"] < 3.0
    slow = _read(Path(job.out_dir) / "step_times" / "rank-00001.jsonl")
    fast = _read(Path(job.out_dir) / "step_times" / "rank-00000.jsonl")
    # The injected sleep lands in rank 1's data phase; rank 0 waits for it in the sync point.
    assert sum(r["data_s"] for r in slow[3:]) > 5 * sum(r["data_s"] for r in fast[3:])
    assert sum(r["comm_s"] for r in fast[3:]) > sum(r["comm_s"] for r in slow[3:])
    # Slowing a rank down changes no number.
    base = read_losses(baseline)
    assert {s: v for s, v in read_losses(job).items() if s in base} == base


def test_torchrun_restarts_after_an_error(assets, baseline):
    job = _job(assets, "torchrun-restart", max_steps=4, **{"fault.inject": ["raise:rank=0:step=3"]})
    _launch_torchrun(job)
    base = read_losses(baseline)
    assert read_losses(job) == {s: base[s] for s in range(1, 5)}
    good = json.loads((Path(job.out_dir) / "goodput.json").read_text())
    assert good["restarts"] == 1
    assert good["failures"][0]["cause"] == "error on rank 0: RuntimeError: injected failure (rank 0, step 3)"
    assert good["failures"][0]["resumed_from_step"] == 2


@pytest.fixture(scope="module")
def chaos(assets, baseline):
    """One Ray Train run that is killed once and hangs once, restarting from checkpoints."""
    import ray

    from distill.train.launch import launch

    job = _job(assets, "chaos", max_steps=STEPS, **{
        "launch.launcher": "ray", "fault.max_failures": 2, "fault.hang_min_timeout_s": 4.0,
        "fault.inject": ["kill:rank=1:step=3", "hang:rank=1:step=6:attempt=1"]})
    ray.init(num_cpus=2, include_dashboard=True, address="local")
    try:
        launch(job)
    finally:
        ray.shutdown()
    return job


def test_killed_and_hung_ranks_restart_and_match_the_uninterrupted_run(chaos, baseline):
    assert read_losses(chaos) == read_losses(baseline)  # identical values, every step
    out = Path(chaos.out_dir)
    starts = [r for r in _read(out / "attempts.jsonl") if r["event"] == "start"]
    assert [(s["attempt"], s["resumed_from_step"]) for s in starts] == [(0, 0), (1, 2), (2, 4)]
    ran = {(r["attempt"], r["step"]) for r in _read(out / "step_times" / "rank-00000.jsonl")}
    assert ran == {(0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 5), (2, 6), (2, 7), (2, 8)}


def test_hang_dumps_name_the_stuck_frames(chaos):
    dumps = Path(chaos.out_dir) / "hang-dumps" / "attempt-1"
    stuck, waiting = (dumps / "rank-1.txt").read_text(), (dumps / "rank-0.txt").read_text()
    assert "hang: step 6 made no progress" in stuck
    # The blocked rank is inside the injected collective...
    assert "in _block_in_collective" in stuck and "in barrier" in stuck
    # ...and its peer waits for it in the step's sync point.
    assert "in sync" in waiting and "in barrier" in waiting


def test_goodput_prices_the_kill_and_the_hang(chaos):
    out = Path(chaos.out_dir)
    good = json.loads((out / "goodput.json").read_text())
    assert good["restarts"] == 2
    kill, hang = good["failures"]
    assert "injected kill (rank 1, step 3)" in kill["cause"]
    assert (kill["failed_at_step"], kill["resumed_from_step"]) == (2, 2)
    assert hang["cause"].startswith("hang: step 6")
    assert (hang["failed_at_step"], hang["resumed_from_step"]) == (5, 4)
    # Detecting a hang takes at least its timeout (in the dump header) before the restart begins.
    timeout = float((out / "hang-dumps" / "attempt-1" / "rank-1.txt").read_text().split("(timeout ")[1].split("s)")[0])
    assert hang["recover_s"] >= timeout
    # Step 5 ran twice (attempt 1 then 2): the first run is lost, so lost > recover there.
    assert hang["lost_s"] > hang["recover_s"] > 0 and kill["lost_s"] >= kill["recover_s"] > 0
    assert good["lost_s"] == pytest.approx(kill["lost_s"] + hang["lost_s"], abs=0.01)
    assert good["productive_s"] + good["lost_s"] < good["wall_s"]
    assert good["goodput"] == pytest.approx(good["productive_s"] / good["wall_s"], abs=1e-3)


def test_restart_without_moves_the_group_off_the_slow_node(assets, baseline):
    import ray
    from ray.cluster_utils import Cluster

    from distill.train.launch import launch

    job = _job(assets, "exclude", max_steps=STEPS, **{
        "launch.launcher": "ray", "fault.straggler.policy": "restart_without",
        "fault.inject": ["sleep:rank=1:factor=2"]})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address)
    try:
        launch(job)
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = Path(job.out_dir)
    flags = _read(out / "stragglers.jsonl")
    assert len(flags) == 1 and flags[0]["rank"] == 1 and flags[0]["action"] == "restart_without_node"
    slow_node = flags[0]["node"]
    assert slow_node in {w.node_id for w in workers}
    starts = [r for r in _read(out / "attempts.jsonl") if r["event"] == "start"]
    assert len(starts) == 2 and slow_node in starts[0]["nodes"] and slow_node not in starts[1]["nodes"]
    assert starts[1]["resumed_from_step"] == flags[0]["step"]
    for rank in (0, 1):
        later = [r for r in _read(out / "step_times" / f"rank-{rank:05d}.jsonl") if r["attempt"] == 1]
        assert later and all(r["node"] != slow_node for r in later)
    assert read_losses(job) == read_losses(baseline)
    good = json.loads((out / "goodput.json").read_text())
    assert good["restarts"] == 1 and "straggler: restart without node" in good["failures"][0]["cause"]
