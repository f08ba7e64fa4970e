"""Chaos tests of the generate stage on a multi-node local Ray cluster (issue 6, items 6-7).

One cluster for the module: a head that runs no work (GCS, dashboard, the drivers) and three
worker nodes, all processes of this test (`ray.cluster_utils.Cluster`). `distill generate` and
`distill chaos kill` run as subprocesses that join it through RAY_ADDRESS, as they would on a
user's cluster. The teacher is the deterministic loopback server, so every stored sample can be
checked against the one answer it must be.

The cluster tests are slow (about 3 minutes together); the proxy's unit tests at the end are not.
DISTILL_CHAOS_SECONDS sets how long the sustained endpoint-fault run lasts (default 30).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import distill_cmd, free_port
from distill.chaos import FaultProxy, ProxyFaults, expected_retries, parse_duration, parse_mix
from distill.config import PromptConfig
from distill.generation import build_messages
from distill.store import Manifest, read_records
from distill.teachers.base import derive_seed
from distill.testing.fault_server import FaultServer, respond

PROMPT = PromptConfig(template="Q: {problem}")
SEED = 11
MAX_NEW = 30
# 30 s: ~300 samples, ~12 injections of each fault kind (drawn from one seeded generator in
# arrival order, so the counts hardly vary between runs); longer soaks are an env setting away.
CHAOS_SECONDS = float(os.environ.get("DISTILL_CHAOS_SECONDS", "30"))


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # A short private temp dir (Ray's socket paths must fit in 107 bytes) keeps this cluster's
    # session files apart from any other Ray on the machine; the dashboard serves the State API
    # that `distill chaos kill` lists actors and nodes with.
    temp_dir = tempfile.mkdtemp(prefix="dchaos-", dir="/tmp")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": True, "dashboard_port": free_port()})
    workers = [c.add_node(num_cpus=1) for _ in range(3)]
    c.wait_for_nodes()
    try:
        yield c
    finally:
        for node in workers:
            try:
                c.remove_node(node, allow_graceful=False)
            except Exception:  # noqa: BLE001 - a node the test killed is already gone
                pass
        c.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _env(cluster) -> dict:
    return {**os.environ, "RAY_ADDRESS": cluster.address}


def _seeds(tmp_path: Path, gsm8k_train: Path, n: int) -> tuple[Path, list[dict]]:
    with open(gsm8k_train) as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _config(tmp_path: Path, base_url: str, source: Path, *, n_samples: int, openai: dict | None = None, **gen) -> Path:
    cfg = {
        "run": {"dir": str(tmp_path / "run"), "progress": False},
        "source": {"path": str(source)},
        "generate": {
            "engine": "openai", "n_samples": n_samples, "shard_size": 4, "replicas": 3, "cpus_per_replica": 0.5,
            "max_shard_retries": 10,
            "prompt": {"template": PROMPT.template},
            "sampling": {"temperature": 0.8, "max_new_tokens": MAX_NEW, "seed": SEED},
            "openai": {"base_url": base_url, "model": "teacher", "concurrency": 2, "timeout_s": 5.0,
                       "backoff_base_s": 0.02, "backoff_max_s": 0.2, "max_retries": 20, **(openai or {})},
            **gen,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _exactly_once(run_dir: Path, questions: list[dict], n_samples: int) -> list[dict]:
    """Every (question, sample) once across all shards, each the server's answer to exactly it."""
    recs = read_records(run_dir / "generate")
    assert read_records(run_dir / "generate", rejected=True) == []
    keys = Counter(r["key"] for r in recs)
    dupes = [k for k, c in keys.items() if c > 1]
    assert not dupes, f"{len(dupes)} keys stored more than once, e.g. {dupes[:3]}"
    assert {(r["id"], r["sample_idx"]) for r in recs} == {(q["id"], s) for q in questions for s in range(n_samples)}
    for r in recs:
        prompt = build_messages(r["problem"], PROMPT)[-1]["content"]
        assert r["seed"] == derive_seed(SEED, r["id"], r["sample_idx"])
        assert (r["completion"], r["finish_reason"], r["n_tokens"]) == respond(prompt, r["seed"], MAX_NEW)
    return recs


def _committed(run_dir: Path) -> int:
    return len(list((run_dir / "generate").glob("part-*.parquet")))


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.communicate()[0]


@pytest.mark.slow
def test_actors_and_a_worker_node_killed_while_generating(cluster, tmp_path, gsm8k_train):
    source, questions = _seeds(tmp_path, gsm8k_train, 48)
    with FaultServer(latency_s=1.0) as server:
        cfg = _config(tmp_path, server.base_url, source, n_samples=2)
        driver = subprocess.Popen(distill_cmd("generate", str(cfg)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=_env(cluster))
        killer = subprocess.Popen(
            distill_cmd("chaos", "kill", "--actors", "^TeacherReplica$", "--every", "1.5s", "--count", "4", "--node",
                        "--seed", "3", "--max-wait", "90s"),
            stdout=subprocess.PIPE, stderr=open(tmp_path / "killer.err", "w"), text=True, env=_env(cluster))
        try:
            out = driver.communicate(timeout=300)[0]
            # The killer sleeps --every after its last kill; longer means it was still waiting
            # for victims when the stage ended.
            try:
                killer.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        finally:
            killer_finished = killer.poll() is not None
            kill_log = _stop(killer)
    assert killer_finished, f"the stage finished before the killer was done:\n{kill_log}\n{out[-3000:]}"
    kill_err = (tmp_path / "killer.err").read_text()[-3000:]
    assert driver.returncode == 0, out[-6000:]
    assert killer.returncode == 0, kill_log + kill_err
    assert len(re.findall(r"^chaos kill: actor TeacherReplica", kill_log, re.M)) == 4, kill_log
    assert len(re.findall(r"^chaos kill: node ", kill_log, re.M)) == 1, kill_log

    _exactly_once(tmp_path / "run", questions, 2)
    m = Manifest.read(tmp_path / "run" / "generate")
    assert m.status == "complete" and m.counts["records"] == 96
    # Every kill that caught a replica with work lost that work; it came back as a retry.
    assert m.summary["shard_retries"].get("replica_died", 0) >= 1, m.summary
    assert "replica_died=" in out, out[-3000:]


@pytest.mark.slow
def test_driver_killed_mid_stage_then_resumed_on_the_cluster(cluster, tmp_path, gsm8k_train):
    source, questions = _seeds(tmp_path, gsm8k_train, 32)
    with FaultServer(latency_s=0.3) as server:
        cfg = _config(tmp_path, server.base_url, source, n_samples=2)
        driver = subprocess.Popen(distill_cmd("generate", str(cfg)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=_env(cluster))
        try:
            deadline = time.monotonic() + 180
            while _committed(tmp_path / "run") < 3:
                assert driver.poll() is None, driver.stdout.read()
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.02)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.communicate()
        done = _committed(tmp_path / "run")
        assert 3 <= done < 16, "the kill must land mid-stage"
        assert Manifest.read(tmp_path / "run" / "generate").status == "running"

        out = subprocess.run(distill_cmd("generate", str(cfg)), capture_output=True, text=True, timeout=300,
                             env=_env(cluster))
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    # Only what no committed shard holds is generated again.
    assert f"{64 - done * 4} to generate" in out.stdout, out.stdout
    _exactly_once(tmp_path / "run", questions, 2)
    assert Manifest.read(tmp_path / "run" / "generate").status == "complete"


@pytest.mark.slow
def test_sustained_endpoint_faults_through_the_proxy(cluster, tmp_path, gsm8k_train):
    """20% of requests fail (429, 500, 503, timeout, reset, malformed) for about
    DISTILL_CHAOS_SECONDS: the stage completes, exactly once, and reports the retries by cause
    that the proxy's injections account for."""
    # Sized so that the run lasts about CHAOS_SECONDS: 3 replicas x 2 connections against a
    # server that takes 0.4 s per answer is ~15 answers/s at best, ~10/s with the retries.
    n_questions = max(12, int(CHAOS_SECONDS * 10 / 4))
    source, questions = _seeds(tmp_path, gsm8k_train, n_questions)
    faults = ProxyFaults(rate=0.2, mix=parse_mix("429=1,500=1,503=1,timeout=1,reset=1,malformed=1"), seed=5,
                         hold_s=3.0, retry_after_s=0.2)
    with FaultServer(latency_s=0.4) as server, FaultProxy(server.base_url, faults) as proxy:
        cfg = _config(tmp_path, proxy.base_url, source, n_samples=4, openai={"timeout_s": 2.0})
        t0 = time.monotonic()
        out = subprocess.run(distill_cmd("generate", str(cfg)), capture_output=True, text=True,
                             timeout=max(600, CHAOS_SECONDS * 5), env=_env(cluster))
        elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    _exactly_once(tmp_path / "run", questions, 4)

    injected = proxy.injected
    n = len(questions) * 4
    assert proxy.passed >= n and sum(injected.values()) > 0.1 * proxy.requests, proxy.counts()
    # Each kind is drawn for ~n/30 requests; a quarter of that is far in the tail.
    assert all(injected[k] >= max(1, n // 120) for k in ("429", "500", "503", "timeout", "reset", "malformed")), \
        proxy.counts()
    summary = Manifest.read(tmp_path / "run" / "generate").summary
    got = {k.removeprefix("retries_"): v for k, v in summary["engine"].items() if k.startswith("retries_")}
    want = expected_retries(injected)
    # Each fault is one failed attempt of its cause. 429/5xx/malformed are never anything but
    # injected here; a timeout or a dropped connection can also come from an overloaded host
    # (the cores are shared), so those may exceed the injections, by a little.
    for cause in ("429", "5xx", "malformed"):
        assert got[cause] == want[cause], (cause, got, want)
    for cause in ("timeout", "connection"):
        assert want[cause] <= got[cause] <= want[cause] + max(3, 0.02 * n), (cause, got, want)
    assert summary["shard_retries"] == {}, summary
    # The stage's last line reports them by cause, as the manifest does.
    assert re.search(r"requests .*retries_429=\d+", out.stdout), out.stdout[-2000:]
    print(f"\nchaos proxy run: {elapsed:.1f}s, {n} samples, {proxy.counts()}, client retries {got}")


@pytest.mark.slow
def test_pool_with_more_replicas_than_the_cluster_places_still_finishes(cluster):
    """Replicas the cluster cannot start (too few CPUs, or nodes lost) get no work; one whose
    constructor fails is retried a bounded number of times and then ends the map."""
    import ray

    from distill.raypool import ReplicaPool, ShardFailed

    class Square:
        def __init__(self, fail: bool = False):
            if fail:
                raise RuntimeError("this replica cannot start")

        def run(self, x: int) -> int:
            time.sleep(0.05)
            return x * x

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        pool = ReplicaPool(ray.remote(Square), (), replicas=cpus + 3, options={"num_cpus": 1}, max_retries=1)
        got: list[int] = []
        # On a thread, so that a pool that waits on a replica that never starts fails the test
        # instead of hanging it.
        mapper = threading.Thread(target=lambda: got.extend(pool.map_unordered("run", range(40))), daemon=True)
        mapper.start()
        mapper.join(timeout=90)
        assert not mapper.is_alive(), f"the pool hung with {len(got)} of 40 results"
        assert sorted(got) == [x * x for x in range(40)]
        assert sum(pool._started) <= cpus
        pool.shutdown()

        broken = ReplicaPool(ray.remote(Square), (True,), replicas=2, options={"num_cpus": 0}, max_retries=1)
        with pytest.raises(ShardFailed, match="failed to start 3 times"):
            list(broken.map_unordered("run", range(4)))
        assert broken.retries["replica_start_failed"] == 3
        broken.shutdown()
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- the proxy alone


def test_parse_mix_and_duration():
    assert parse_mix("429=1, 500=2,timeout") == {"429": 1.0, "500": 2.0, "timeout": 1.0}
    for bad, msg in (("429=1,teapot=1", "unknown fault 'teapot'"), ("500=x", "not a number"),
                     ("500=-1", ">= 0"), ("429=0", "no fault")):
        with pytest.raises(ValueError, match=msg):
            parse_mix(bad)
    assert [parse_duration(s) for s in ("5s", "500ms", "2m", "1.5")] == [5.0, 0.5, 120.0, 1.5]
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_fault_draws_follow_rate_and_mix():
    import random

    faults = ProxyFaults(rate=0.2, mix={"429": 1, "reset": 3}, seed=0)
    rng = random.Random(0)
    draws = Counter(faults.draw(rng) for _ in range(20_000))
    # Binomial counts: 4000 +- 57 faults; 1000 +- 29 of them 429s (5 sigma bounds).
    assert abs(draws["429"] + draws["reset"] - 4000) < 5 * 57, draws
    assert abs(draws["429"] - 1000) < 5 * 29, draws
    assert set(draws) == {None, "429", "reset"}


@pytest.mark.parametrize("kind", ["429", "500", "503", "timeout", "reset", "malformed"])
def test_each_proxy_fault_is_one_client_retry_of_its_cause(kind):
    """Through the real engine: every injected fault of `kind` costs exactly one retry of the
    cause `expected_retries` names, nothing else is retried, and every request gets its answer."""
    from distill.config import OpenAIEngineConfig
    from distill.teachers.base import Request, SamplingParams
    from distill.teachers.openai import OpenAIEngine

    with FaultServer() as server, \
            FaultProxy(server.base_url, ProxyFaults(rate=0.4, mix={kind: 1}, seed=1, hold_s=1.0,
                                                    retry_after_s=0)) as proxy:
        cfg = OpenAIEngineConfig(base_url=proxy.base_url, model="m", api_key_env=None, timeout_s=0.4,
                                 backoff_base_s=0.01, backoff_max_s=0.02, max_retries=30, concurrency=8)
        with OpenAIEngine(cfg) as engine:
            requests = [Request([{"role": "user", "content": f"question {i}"}], n=1, seed=i) for i in range(24)]
            results = engine.generate(requests, SamplingParams(temperature=0.5, top_p=1.0, max_new_tokens=20,
                                                               seed=0, stop=()))
            stats = engine.stats()
    assert all(r.ok for r in results)
    assert [r.completions[0].text for r in results] == [respond(f"question {i}", i, 20)[0] for i in range(24)]
    assert proxy.injected[kind] >= 3 and set(proxy.injected) == {kind}, proxy.counts()
    assert proxy.passed == 24 and proxy.requests == 24 + proxy.injected[kind]
    got = {k.removeprefix("retries_"): int(v) for k, v in stats.items() if k.startswith("retries_") and v}
    assert got == dict(expected_retries(proxy.injected)), (got, proxy.counts())
