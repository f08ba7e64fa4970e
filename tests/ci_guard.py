"""pytest plugin: `gpu` tests skip without CUDA, and in CI no other skip passes silently.

A skipped test is a test that did not run. Outside CI that is the developer's business (no
chromium here, no root there). In CI (env CI=true, as CI services and .ci/run set it) a skip
would leave the run green while the check it names never ran, so every skip becomes a failure
unless it is allowlisted: only "this machine has no CUDA", which a CPU runner cannot change.
Collection-time skips (`pytest.skip(allow_module_level=True)`, a module-level `importorskip`)
fail the collection the same way. tests/conftest.py imports these hooks; tests/test_ci_guard.py
loads this module with `-p ci_guard` to check them.
"""

from __future__ import annotations

import functools
import os

import pytest

# Skip reasons CI accepts, and only on a machine without CUDA: the reason the gpu marker below
# gives (tests that call pytest.skip themselves must use this exact text to be accepted).
ALLOWED_REASONS = frozenset({"needs CUDA"})


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@functools.cache
def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def skip_reason(longrepr) -> str:
    """The reason text of a skipped report (its longrepr is (path, lineno, "Skipped: reason"))."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_allowed(reason: str, gpu_marked: bool, cuda: bool) -> bool:
    """Whether CI may accept a skip: only for want of CUDA, on a machine that has none. A `gpu`
    test on such a machine may skip for any reason (its skip marks are evaluated in an order
    pytest decides; none of them can run without CUDA anyway)."""
    if cuda:
        return False
    return gpu_marked or reason in ALLOWED_REASONS


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and in_ci()) or hasattr(rep, "wasxfail"):
        return
    reason = skip_reason(rep.longrepr)
    if skip_allowed(reason, "gpu" in item.keywords, has_cuda()):
        return
    rep.outcome = "failed"
    rep.longrepr = (f"skipped in CI ({rep.when}): {reason}\n"
                    f"CI=true turns skips into failures except {sorted(ALLOWED_REASONS)} without CUDA: "
                    "install what the test needs (see .ci/run) or fix the test.")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and in_ci()):
        return
    reason = skip_reason(rep.longrepr)
    if skip_allowed(reason, False, has_cuda()):
        return
    rep.outcome = "failed"
    rep.longrepr = f"{collector.nodeid} skipped at collection in CI: {reason}"
