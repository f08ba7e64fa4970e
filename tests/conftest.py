"""Shared fixtures. Tests use the real benchmark and seed data in ../shared/data (never copied)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The gpu marker's skip and CI's rule that no other skip passes (see ci_guard's docstring).
from ci_guard import (  # noqa: F401  (pytest finds the hooks by name in this module)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_make_collect_report,
    pytest_runtest_makereport,
)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
GSM8K_TRAIN = DATA / "train" / "gsm8k_train.jsonl"

# Single-node test clusters bind to loopback with this set: Ray on Linux otherwise registers the
# machine's interface address as its node IP, even with --node-ip-address=127.0.0.1. (The
# project's design notes, ../shared/DESIGN.md "Network", say so; that file is beside the repo.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# No hub is reachable from tests; offline mode makes a Hub lookup fail at once instead of
# retrying the network for ~20 s. Set before `datasets` / `huggingface_hub` are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    if not GSM8K_TRAIN.exists():
        pytest.fail(f"{GSM8K_TRAIN} is missing: the tests read ../shared/data beside the repository")
    return GSM8K_TRAIN


def distill_cmd(*args: str) -> list[str]:
    """The `distill` console script of the interpreter running the tests."""
    return [sys.executable, "-m", "distill.cli", *args]


@pytest.fixture
def ray_shutdown_after():
    """For tests that run stages in this process (`run_pipeline` connects an embedded Ray and keeps
    it): shut it down afterwards, so a later test starts from no Ray connection."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def kill_group_when(cmd: list[str], ready, what: str, timeout_s: float = 300) -> None:
    """Start `cmd` in its own session (so the kill reaches the driver and the Ray processes it
    starts), wait until `ready()` is true, then SIGKILL the whole process group: a `kill -9` of a
    run mid-stage. Fails if the process ends first or `ready()` is not true within `timeout_s`."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, f"{what} made no progress"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers and Ray heads tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
