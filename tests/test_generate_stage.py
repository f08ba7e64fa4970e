"""The generate stage end to end: `distill` subprocesses, an embedded Ray cluster, the openai
engine against a real loopback server that injects faults. Exactly-once is checked against the
server's deterministic answers, after raising n_samples, after `kill -9` of the driver, and
after a replica is killed mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import distill_cmd, free_port
from distill.generation import build_messages
from distill.config import PromptConfig
from distill.store import Manifest, read_records
from distill.teachers.base import derive_seed
from distill.testing.fault_server import FaultPlan, FaultServer, respond

pytestmark = pytest.mark.slow

PROMPT = PromptConfig(template="Q: {problem}")


def write_config(tmp_path: Path, server: FaultServer, source: Path, **gen) -> Path:
    cfg = {
        "run": {"dir": str(tmp_path / "run"), "progress": False},
        "ray": {"num_cpus": 2},
        "source": {"path": str(source)},
        "generate": {
            "engine": "openai", "n_samples": 2, "shard_size": 8, "replicas": 2, "cpus_per_replica": 0.5,
            "prompt": {"template": PROMPT.template},
            "sampling": {"temperature": 0.8, "max_new_tokens": 40, "seed": 7},
            "openai": {"base_url": server.base_url, "model": "teacher", "concurrency": 8, "timeout_s": 2.0,
                       "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 20},
            **gen,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def seeds_file(tmp_path: Path, gsm8k_train: Path, n: int, extra: list[dict] = ()) -> Path:
    with open(gsm8k_train) as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return path


def run_distill(cfg: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(distill_cmd("generate", str(cfg), *overrides), capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"distill failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def assert_exactly_once(run_dir: Path, questions: list[dict], n_samples: int, max_new_tokens: int = 40) -> list[dict]:
    recs = read_records(run_dir / "generate")
    pairs = Counter((r["id"], r["sample_idx"]) for r in recs)
    assert all(c == 1 for c in pairs.values()), [p for p, c in pairs.items() if c > 1][:5]
    assert set(pairs) == {(q["id"], s) for q in questions for s in range(n_samples)}
    for r in recs:  # every record is the server's answer to exactly that (question, sample)
        prompt = build_messages(r["problem"], PROMPT)[-1]["content"]
        assert r["seed"] == derive_seed(7, r["id"], r["sample_idx"])
        text, finish, n = respond(prompt, r["seed"], max_new_tokens)
        assert (r["completion"], r["finish_reason"], r["n_tokens"]) == (text, finish, n)
    return recs


def test_generate_with_faults_then_more_samples_then_refuse_changed_settings(tmp_path, gsm8k_train):
    source = seeds_file(tmp_path, gsm8k_train, 24, extra=[{"id": "long-1", "problem": "TOO_LONG " * 50, "answer": "1"}])
    questions = [json.loads(line) for line in source.read_text().splitlines()][:24]
    with FaultServer(faults=FaultPlan.uniform(0.25, seed=3)) as server:
        cfg = write_config(tmp_path, server, source)
        out = run_distill(cfg)
        assert "25 questions x 2 samples; 50 to generate" in out.stdout, out.stdout
        recs = assert_exactly_once(tmp_path / "run", questions, 2)
        assert {r["reasoning"] is not None for r in recs} == {True}
        rejected = read_records(tmp_path / "run" / "generate", rejected=True)
        assert sorted((r["id"], r["sample_idx"]) for r in rejected) == [("long-1", 0), ("long-1", 1)]
        assert all(r["reason"].startswith("http_400") for r in rejected)
        m = Manifest.read(tmp_path / "run" / "generate")
        assert m.status == "complete" and m.counts["records"] == 48 and m.counts["rejected"] == 2
        retries = {k: v for k, v in m.summary["engine"].items() if k.startswith("retries_")}
        assert sum(retries.values()) > 0, m.summary
        first_requests = server.requests

        # Raising n_samples generates only the new samples: the old ones are not asked for again.
        out = run_distill(cfg, "generate.n_samples=4")
        assert "25 questions x 4 samples; 50 to generate" in out.stdout, out.stdout
        assert "(50 already done)" in out.stdout, out.stdout
        assert_exactly_once(tmp_path / "run", questions, 4)
        for q in questions:
            prompt = build_messages(q["problem"], PROMPT)[-1]["content"]
            for s in (0, 1):
                assert server.completions[(prompt, derive_seed(7, q["id"], s))] == 1
        assert server.requests > first_requests

        # A third run has nothing to do and sends nothing.
        before = server.requests
        out = run_distill(cfg, "generate.n_samples=4", "generate.replicas=1")
        assert "0 to generate" in out.stdout and server.requests == before

        # Changing what a sample *is* would make the shards wrong: refused, nothing touched.
        out = run_distill(cfg, "generate.n_samples=4", "generate.sampling.temperature=1.0", check=False)
        assert out.returncode == 1
        assert "sampling.temperature: 0.8 -> 1.0" in out.stderr and "run.dir=" in out.stderr
        assert server.requests == before
        assert len(read_records(tmp_path / "run" / "generate")) == 96

        # A question whose text changed under the same id is refused too.
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        rows[3]["problem"] += " (edited)"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = run_distill(cfg, "generate.n_samples=4", check=False)
        assert out.returncode == 1 and "problem text has changed" in out.stderr and rows[3]["id"] in out.stderr
        assert server.requests == before


def _committed(run_dir: Path) -> int:
    return len(list((run_dir / "generate").glob("part-*.parquet")))


def test_kill_9_of_the_driver_then_resume_gives_every_sample_exactly_once(tmp_path, gsm8k_train):
    source = seeds_file(tmp_path, gsm8k_train, 32)
    questions = [json.loads(line) for line in source.read_text().splitlines()]
    with FaultServer(latency_s=0.15, faults=FaultPlan.uniform(0.1, seed=5)) as server:
        cfg = write_config(tmp_path, server, source, shard_size=4)
        cfg_args = ["generate.openai.concurrency=2"]
        driver = subprocess.Popen(distill_cmd("generate", str(cfg), *cfg_args), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while _committed(tmp_path / "run") < 4:
                assert driver.poll() is None, driver.stdout.read()
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.05)
        finally:
            os.kill(driver.pid, signal.SIGKILL)  # the driver only: Ray's own processes must cope
            driver.wait()
        done_before = _committed(tmp_path / "run")
        assert 4 <= done_before < 16, "the kill must land mid-stage"
        assert Manifest.read(tmp_path / "run" / "generate").status == "running"

        out = run_distill(cfg, *cfg_args)
        assert f"{64 - done_before * 4} to generate" in out.stdout, out.stdout
        assert_exactly_once(tmp_path / "run", questions, 2)
        assert Manifest.read(tmp_path / "run" / "generate").status == "complete"


def _descendants(root: int) -> set[int]:
    """PIDs below `root` (the embedded Ray cluster's processes are the driver's children), so
    the test never touches another session's Ray workers on the same machine."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - out
        out |= frontier
    return out


def _replica_pids(driver: int) -> list[int]:
    mine = _descendants(driver)
    pids = []
    for pid in mine:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::TeacherReplica"):
                pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def test_killed_replicas_are_replaced_and_their_shards_retried(tmp_path, gsm8k_train):
    source = seeds_file(tmp_path, gsm8k_train, 24)
    questions = [json.loads(line) for line in source.read_text().splitlines()]
    with FaultServer(latency_s=0.1) as server:
        cfg = write_config(tmp_path, server, source, shard_size=4)
        driver = subprocess.Popen(distill_cmd("generate", str(cfg), "generate.openai.concurrency=2"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed: list[int] = []
        deadline = time.monotonic() + 180
        while driver.poll() is None and time.monotonic() < deadline:
            pids = _replica_pids(driver.pid)
            if not killed and pids and _committed(tmp_path / "run") >= 1:
                # Every replica, not one: a replica that Ray is still starting has no work yet, and
                # killing only that one tests start-up failure (CI hit exactly that). The replica
                # that committed a shard has started and holds queued shards, so its death must
                # show up as `replica_died` with those shards retried elsewhere.
                killed = pids
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        out = driver.communicate(timeout=60)[0]
        assert driver.returncode == 0, out
        assert killed, "the stage finished before a replica could be killed"
        assert_exactly_once(tmp_path / "run", questions, 2)
        m = Manifest.read(tmp_path / "run" / "generate")
        assert m.summary["shard_retries"].get("replica_died", 0) >= 1, m.summary


def test_with_ray_address_the_same_command_runs_on_an_existing_cluster(tmp_path, gsm8k_train):
    """`ray job submit` and `RAY_ADDRESS=...` both mean: join that cluster, do not start one."""
    source = seeds_file(tmp_path, gsm8k_train, 8)
    questions = [json.loads(line) for line in source.read_text().splitlines()]
    port = free_port()
    # Ray 2.60 enables token auth for `ray start` clusters; every process must then say so.
    ray_env = {**os.environ, "RAY_AUTH_MODE": "token"}
    # --block keeps the head in the foreground of its own process group, so the test can stop
    # exactly this cluster (`ray stop` would stop every Ray cluster of the user on the machine).
    # Its own temp dir (short: Ray's socket paths must fit in 107 bytes), so the address file
    # that `ray start` leaves behind cannot steer any other test's or user's `ray.init`.
    temp_dir = tempfile.mkdtemp(prefix="dray-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         f"--temp-dir={temp_dir}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ray_env)
    try:
        started = []
        for line in head.stdout:  # wait until the head is up; its log says so
            started.append(line)
            if "Ray runtime started" in line:
                break
        assert any("Ray runtime started" in line for line in started), "".join(started)
        with FaultServer(latency_s=0.05) as server:
            cfg = write_config(tmp_path, server, source, shard_size=4, replicas=1)
            env = {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
            driver = subprocess.Popen(distill_cmd("generate", str(cfg), "generate.openai.concurrency=1"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            seen_under_head = False
            while driver.poll() is None:
                if _replica_pids(head.pid):
                    seen_under_head = True  # the replica is a worker of the existing cluster
                time.sleep(0.05)
            out = driver.communicate()[0]
            assert driver.returncode == 0, out
        assert f"ray: cluster 127.0.0.1:{port}" in out, out
        assert seen_under_head, "the replica did not run on the existing cluster"
        assert_exactly_once(tmp_path / "run", questions, 2)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
