"""CI's skip guard (tests/ci_guard.py): under CI=true a skip fails unless it is for want of CUDA.

Each case runs pytest in a subprocess on a tiny test file with the guard loaded as a plugin
(`-p ci_guard`), CUDA hidden (CUDA_VISIBLE_DEVICES=""), so the outcome is the same on any machine.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest

from ci_guard import ALLOWED_REASONS, skip_allowed, skip_reason
from conftest import REPO

TESTS = REPO / "tests"


def _pytest(tmp_path, source: str, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_tiny.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=str(TESTS), CUDA_VISIBLE_DEVICES="", **({"CI": "true"} if ci else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "ci_guard", "-p", "no:cacheprovider",
                           "test_tiny.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _summary(out: subprocess.CompletedProcess) -> str:
    return out.stdout.strip().splitlines()[-1]


MISSING_TOOL = """
import pytest

def test_needs_a_tool():
    pytest.skip("libaio is not installed")

def test_fine():
    pass
"""


def test_a_skip_for_a_missing_tool_fails_in_ci(tmp_path):
    out = _pytest(tmp_path, MISSING_TOOL, ci=True)
    assert out.returncode == 1, out.stdout
    assert re.search(r"\b1 failed, 1 passed\b", _summary(out)), out.stdout
    assert "skipped in CI (call): libaio is not installed" in out.stdout


def test_the_same_skip_is_a_skip_outside_ci(tmp_path):
    out = _pytest(tmp_path, MISSING_TOOL, ci=False)
    assert out.returncode == 0, out.stdout
    assert re.search(r"\b1 passed, 1 skipped\b", _summary(out)), out.stdout


def test_skip_marks_and_module_level_importorskip_fail_in_ci(tmp_path):
    marks = """
import pytest

@pytest.mark.skipif(True, reason="needs root")
def test_marked():
    pass
"""
    out = _pytest(tmp_path, marks, ci=True)
    assert out.returncode == 1 and re.search(r"\b1 error\b", _summary(out)), out.stdout
    assert "skipped in CI (setup): needs root" in out.stdout
    module = """
import pytest
pytest.importorskip("a_module_that_is_not_installed_anywhere")

def test_never_collected():
    pass
"""
    out = _pytest(tmp_path, module, ci=True)
    assert out.returncode != 0 and "skipped at collection in CI" in out.stdout, out.stdout
    assert "a_module_that_is_not_installed_anywhere" in out.stdout


def test_no_cuda_is_the_one_accepted_reason(tmp_path):
    src = """
import pytest

@pytest.mark.gpu
def test_gpu_marked():
    pass

def test_says_why():
    pytest.skip("needs CUDA")

def test_runs():
    pass
"""
    out = _pytest(tmp_path, src, ci=True)
    assert out.returncode == 0, out.stdout
    assert re.search(r"\b1 passed, 2 skipped\b", _summary(out)), out.stdout


def test_skip_allowed_only_without_cuda():
    assert ALLOWED_REASONS == {"needs CUDA"}
    assert skip_allowed("needs CUDA", gpu_marked=False, cuda=False)
    assert skip_allowed("flash-attn is not installed", gpu_marked=True, cuda=False)
    assert not skip_allowed("needs CUDA", gpu_marked=True, cuda=True)  # it has CUDA: why skip?
    assert not skip_allowed("needs root", gpu_marked=False, cuda=False)
    assert skip_reason(("t.py", 3, "Skipped: needs root")) == "needs root"


def test_no_test_importorskips_a_dev_dependency():
    """The `dev` extra is what the tests need: its packages are imported, never skipped."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dev = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in pyproject["project"]["optional-dependencies"]["dev"]}
    modules = {mod for mod, dists in importlib.metadata.packages_distributions().items()
               if any(d.lower() in dev for d in dists)}
    assert {"selenium", "wandb", "mlflow"} <= modules, modules
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and str(node.args[0].value).split(".")[0] in modules):
                offenders.append(f"{path.name}:{node.lineno} importorskip({node.args[0].value!r})")
    assert offenders == []


@pytest.mark.parametrize("flag", ["|| echo", "|| true"])
def test_ci_script_does_not_forgive_failed_installs(flag):
    script = (REPO / ".ci" / "run").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert flag not in code
    assert "export CI=" in code
