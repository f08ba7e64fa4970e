"""The quickstart as a Ray job on a real two-node cluster: `cluster/submit.sh` -> `ray job submit`.

Each node lives in its own network namespace with its own address (10.231.0.1 head, 10.231.0.2
worker, joined by a veth pair, as ../shared/DESIGN.md "Network" describes) and its own PID namespace, so `ray stop`
inside it stops that node and nothing else on the machine (other test clusters included). Every
Ray command runs with token authentication, the token shared through a file both nodes read.

Each node offers 1 CPU, and the run asks for 2 teacher replicas, 2 curation actors and 2 training
ranks of 1 CPU each, so no node can hold all of a stage: the work has to spread, and the Ray
State API shows where it ran. The training ranks form one gloo process group across the veth.
The quickstart is shrunk (8 questions x 2 samples, 2 training steps, 2 eval questions per
benchmark) but runs every stage it lists.

Needs root (network namespaces); skipped with the reason otherwise (a failure under CI=true). About 5 minutes on an idle
2-core machine (measured 4.3 min for the job before the quickstart gained its eval stage; 9-10 min
with the cores shared with other work).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distill.stages import CURATE_STAGES
from distill.store import Manifest, read_records

pytestmark = pytest.mark.slow

HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"
GCS_PORT, DASHBOARD_PORT = 6379, 8265
IFNAME = "dn0"  # the veth end's name inside each namespace (the same in both, so one GLOO_SOCKET_IFNAME fits)
N_QUESTIONS, N_SAMPLES, SHARD = 8, 2, 4
JOB_TIMEOUT_S = 1500  # ~5 min on an idle 2-core machine; 9 min measured with the cores shared


@dataclass
class Node:
    netns: str
    ip: str
    temp_dir: str
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def init_pid(self) -> int | None:
        """PID (in the test's namespace) of the node's PID-namespace init: `ray start --block`."""
        if self.proc is None:
            return None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None


@dataclass
class Cluster:
    head: Node
    worker: Node
    env: dict

    @property
    def address(self) -> str:
        return f"http://{HEAD_IP}:{DASHBOARD_PORT}"

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """A Ray CLI command run inside the head's network namespace (where the head is reachable)."""
        out = subprocess.run(["ip", "netns", "exec", self.head.netns, "ray", *args], env=self.env, cwd=REPO,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def state(self, kind: str) -> list[dict]:
        out = self.ray("list", kind, "--address", self.address, "--detail", "--format", "json", "--limit", "10000")
        return json.loads(out.stdout)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def _start_node(node: Node, env: dict, *ray_args: str) -> None:
    cmd = ["ip", "netns", "exec", node.netns,
           # Own PID namespace: `ray stop` in it sees only this node's processes, and killing its
           # init (`ray start --block`) makes the kernel kill everything left in it.
           "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
           "ray", "start", *ray_args, f"--node-ip-address={node.ip}", "--num-cpus=1",
           "--object-store-memory=300000000", f"--temp-dir={node.temp_dir}", "--block"]
    node.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=node.log.open("w"), stderr=subprocess.STDOUT)


def _stop_node(node: Node, env: dict) -> None:
    init = node.init_pid()
    if init is not None:
        # Graceful first (raylet, GCS and workers clean up), then SIGKILL the namespace's init:
        # whatever `ray stop` left behind dies with it.
        subprocess.run(["nsenter", "-t", str(init), "-p", "-m", "-n", "ray", "stop"], env=env,
                       capture_output=True, timeout=90)
        try:
            os.kill(init, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if node.proc is not None:
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(timeout=10)


def _wait_for_nodes(cluster: Cluster, n: int, deadline_s: float) -> list[dict]:
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        for node in (cluster.head, cluster.worker):
            if node.proc is not None and node.proc.poll() is not None:
                raise AssertionError(f"ray start in {node.netns} exited {node.proc.returncode}:\n"
                                     f"{node.log.read_text()[-3000:]}")
        out = cluster.ray("list", "nodes", "--address", cluster.address, "--format", "json", check=False, timeout=60)
        try:  # before the head registers itself the CLI prints "No resource in the cluster", not JSON
            alive = [x for x in json.loads(out.stdout) if x["state"] == "ALIVE"] if out.returncode == 0 else []
        except ValueError:
            alive = []
        if len(alive) >= n:
            return alive
        last = (out.stdout + out.stderr)[-500:]
        time.sleep(2)
    raise AssertionError(f"{n} nodes did not come up in {deadline_s}s; last error: {last}")


@pytest.fixture
def cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: the two nodes live in network namespaces (`ip netns add`)")
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (apt-get install iproute2 util-linux)")
    tag = f"dn{os.getpid() % 100000}"
    # Ray's temp dirs hold unix sockets, whose paths must stay under 108 bytes: short names in /tmp.
    head = Node(f"{tag}h", HEAD_IP, tempfile.mkdtemp(prefix=f"{tag}h", dir="/tmp"), log=tmp_path / "head.log")
    worker = Node(f"{tag}w", WORKER_IP, tempfile.mkdtemp(prefix=f"{tag}w", dir="/tmp"), log=tmp_path / "worker.log")
    probe = _ip("netns", "add", head.netns, check=False)
    if probe.returncode != 0:
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        shutil.rmtree(worker.temp_dir, ignore_errors=True)
        pytest.skip(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")

    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # No inherited RAY_* setting: conftest's RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback-only
    # single-node clusters) would make the worker refuse to join, and a RAY_ADDRESS would redirect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        # The venv's `ray` and `python` on every node, as a cluster image would have them.
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": IFNAME,
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    })
    c = Cluster(head, worker, env)
    try:
        _ip("netns", "add", worker.netns)
        _ip("link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b")
        for node, end in ((head, f"{tag}a"), (worker, f"{tag}b")):
            _ip("link", "set", end, "netns", node.netns)
            _ip("-n", node.netns, "link", "set", end, "name", IFNAME)
            _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", IFNAME)
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("-n", node.netns, "link", "set", IFNAME, "up")
        _start_node(head, env, "--head", f"--port={GCS_PORT}", f"--dashboard-host={HEAD_IP}",
                    f"--dashboard-port={DASHBOARD_PORT}")
        _wait_for_nodes(c, 1, 120)
        _start_node(worker, env, f"--address={HEAD_IP}:{GCS_PORT}")
        _wait_for_nodes(c, 2, 120)
        yield c
    finally:
        for node in (worker, head):
            _stop_node(node, env)
        for node in (head, worker):
            _ip("netns", "del", node.netns, check=False)  # deletes the veth pair with it
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        leftovers = subprocess.run(["pgrep", "-f", "--", f"--temp-dir=/tmp/{tag}"], capture_output=True, text=True)
        assert not leftovers.stdout.strip(), f"processes of the test cluster survived teardown: {leftovers.stdout}"
        assert head.netns not in _ip("netns", "list").stdout


def _on_cluster(path: str) -> str:
    """A path as the job must see it: the driver runs in the uploaded working directory, where the
    checkout's relative paths (`../shared/data/...`) do not exist."""
    return path if Path(path).is_absolute() else str((REPO / path).resolve())


def _overrides(quickstart: dict, run_dir: Path) -> list[str]:
    """The quickstart, smaller, with its data paths made absolute, and work that must spread: two
    1-CPU teacher replicas, curation actors and training ranks on two 1-CPU nodes."""
    out = [
        f"run.dir={run_dir}", "run.progress=false",
        f"source.path={_on_cluster(quickstart['source']['path'])}", f"source.limit={N_QUESTIONS}",
        f"generate.n_samples={N_SAMPLES}", f"generate.shard_size={SHARD}", "generate.replicas=2",
        "generate.cpus_per_replica=1",
        "curate.shard_size=2", "curate.workers=2", "curate.verify.workers=1",
        "train.max_steps=2", "train.grad_accum=1", "train.schedule.warmup_steps=1", "train.checkpoint.every_steps=2",
        "train.launch.num_workers=2", "train.launch.cpus_per_worker=1",
    ]
    if "eval" in quickstart["run"]["stages"]:
        # One CPU per node: a 2-CPU evaluation task could never be placed. 2 questions per
        # benchmark keep it a smoke test of the stage, as in the quickstart.
        out += ["eval.cpus=1", "eval.limit=2"]
    sections = {"curate.decontam.benchmarks": quickstart["curate"]["decontam"]["benchmarks"],
                "eval.benchmarks": (quickstart.get("eval") or {}).get("benchmarks")}
    for key, refs in sections.items():
        if refs:  # JSON is YAML: the override keeps every field of each benchmark, with its path absolute
            out.append(f"{key}={json.dumps([{**r, 'path': _on_cluster(r['path'])} for r in refs])}")
    return out


def _runtime_env_without_pip(tmp_path: Path) -> Path:
    """cluster/runtime_env.yaml minus `pip:`. These nodes already have every dependency (they run
    the test's venv), and Ray would clone that 2.3 GB venv on each node to layer pip packages on it."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env.pop("pip")["packages"], "runtime_env.yaml lists the pip packages a stock Ray image lacks"
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


def _wait_for_job(cluster: Cluster, job_id: str) -> tuple[str, float]:
    start, status = time.monotonic(), "PENDING"
    while time.monotonic() - start < JOB_TIMEOUT_S:
        out = cluster.ray("job", "status", "--address", cluster.address, job_id, check=False)
        text = out.stdout + out.stderr
        # Running: "Status for job 'ID': RUNNING"; finished: "Job 'ID' succeeded" / "failed" / "was stopped".
        if m := re.search(rf"Status for job '{job_id}': (\w+)", text):
            status = m.group(1)
        if m := re.search(rf"Job '{job_id}' (?:was )?(succeeded|failed|stopped)", text):
            status = m.group(1).upper()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(10)  # each `ray` CLI call costs ~2 s of CPU: poll gently on a 2-core machine
    return status, time.monotonic() - start


def test_quickstart_as_a_ray_job_on_two_nodes(cluster, tmp_path):
    quickstart = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    stages = quickstart["run"]["stages"]
    run_dir = tmp_path / "run"
    job_id = f"distill-two-node-{os.getpid()}"

    submit = subprocess.run(
        ["ip", "netns", "exec", cluster.head.netns, "cluster/submit.sh", "--address", cluster.address, "--no-wait",
         "--submission-id", job_id, "--", "configs/quickstart.yaml", *_overrides(quickstart, run_dir)],
        env={**cluster.env, "DISTILL_RUNTIME_ENV": str(_runtime_env_without_pip(tmp_path))}, cwd=REPO,
        capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert f"Job '{job_id}' submitted successfully" in submit.stdout + submit.stderr

    status, seconds = _wait_for_job(cluster, job_id)
    logs = cluster.ray("job", "logs", "--address", cluster.address, job_id).stdout
    (tmp_path / "job.log").write_text(logs)
    print(f"two-node job {status} after {seconds:.0f}s; its log: {tmp_path / 'job.log'}")
    if status != "SUCCEEDED":
        cluster.ray("job", "stop", "--address", cluster.address, job_id, check=False)
    assert status == "SUCCEEDED", f"job {status} after {seconds:.0f}s; log tail:\n{logs[-6000:]}"

    # `ray job logs` shows the run's progress, stage by stage, through to the exported model.
    assert f"ray: cluster {HEAD_IP}:{GCS_PORT}" in logs
    assert f"stages: {', '.join(stages)}" in logs
    assert f"generate: {N_QUESTIONS} questions x {N_SAMPLES} samples" in logs and "generate: done." in logs
    # Not anchored at a line start: an actor's unterminated progress bar can share the driver's line.
    curation = [s for s in stages if s in CURATE_STAGES]
    missing = [s for s in curation if not re.search(rf"(?<![\w.]){s}: \d+ kept, \d+ rejected", logs)]
    assert not missing, f"no summary line of {missing} in the job's log (see {tmp_path / 'job.log'})"
    assert "train: step 2/2" in logs and "train: model written to" in logs and "distill: finished" in logs
    if "eval" in stages:
        assert "eval: results in" in logs

    # Work ran on both nodes: the State API records the node of every actor the job started.
    ip_of = {n["node_id"]: n["node_ip"] for n in cluster.state("nodes")}
    assert set(ip_of.values()) == {HEAD_IP, WORKER_IP}
    placed: dict[str, Counter] = {}
    for actor in cluster.state("actors"):
        if actor["node_id"] is None:  # created, then killed before it was ever placed
            continue
        placed.setdefault(actor["class_name"], Counter())[ip_of[actor["node_id"]]] += 1
    for cls in ("TeacherReplica", "StageWorker", "RayTrainWorker"):
        assert set(placed.get(cls, {})) == {HEAD_IP, WORKER_IP}, f"{cls} ran on {dict(placed.get(cls, {}))}"
    assert placed["RayTrainWorker"] == Counter({HEAD_IP: 1, WORKER_IP: 1})  # one gloo group across the veth

    # The outputs are complete: every sample generated exactly once, every stage's manifest closed,
    # both training steps logged, and a loadable model.
    gen = read_records(run_dir / "generate")
    keys = Counter((r["id"], r["sample_idx"]) for r in gen)
    assert len(keys) == N_QUESTIONS * N_SAMPLES and set(keys.values()) == {1}
    assert all(r["completion"] and r["n_tokens"] > 0 for r in gen)
    assert Manifest.read(run_dir / "generate").counts["shards"] == N_QUESTIONS * N_SAMPLES // SHARD
    for stage in ["generate", *curation]:
        assert Manifest.read(run_dir / stage).status == "complete", stage
    assert len(read_records(run_dir / "verify")) == N_QUESTIONS * N_SAMPLES
    assert read_records(run_dir / "sft"), "nothing reached the SFT set"
    steps = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), steps
    from transformers import AutoConfig

    model_dir = run_dir / "model"
    assert AutoConfig.from_pretrained(model_dir).model_type == "llama"
    assert list(model_dir.glob("*.safetensors"))
    if "eval" in stages:
        results = json.loads((run_dir / "eval" / "results.json").read_text())
        assert {"teacher", "student_after"} <= set(results["models"])
        assert all(b["n_questions"] == 2 for b in results["benchmarks"].values())
