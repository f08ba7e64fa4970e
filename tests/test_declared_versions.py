"""pyproject.toml states the versions the code is tested on: every installed requirement (core,
`train`, `megatron`, `dev`) satisfies its declared range, the interpreter satisfies
requires-python, and the Makefile installs exactly what the pinned extras declare."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TESTED_EXTRAS = ("train", "megatron", "dev")  # gpu and vllm need CUDA: not installed by `make venv`


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in TESTED_EXTRAS:
        reqs += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_installed_versions_satisfy_the_declared_ranges(req):
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        pytest.fail(f"{req.name} is declared but not installed: run `make venv`")
    assert req.specifier.contains(installed, prereleases=True), \
        f"pyproject.toml declares {req}, the environment has {req.name} {installed}"


def test_interpreter_satisfies_requires_python():
    here = ".".join(map(str, sys.version_info[:3]))
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(here)
    assert not SpecifierSet(PYPROJECT["requires-python"]).contains("3.10.14")  # hashlib.file_digest is 3.11+


def test_makefile_installs_what_the_pinned_extras_declare():
    """deepspeed and megatron-core are installed by the Makefile outside `pip install -e .` (no
    build isolation; a wheel for this Python): the two places must name one version."""
    makefile = (REPO / "Makefile").read_text()
    for extra, name in (("train", "deepspeed"), ("megatron", "megatron-core")):
        (declared,) = [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]
                       if Requirement(r).name == name]
        (installed_spec,) = re.findall(rf'pip install [^\n]*"{re.escape(name)}([^"]*)"', makefile)
        assert str(declared.specifier) == installed_spec, (extra, str(declared.specifier), installed_spec)
        assert str(declared.specifier).startswith("=="), f"{name} must be pinned (see pyproject.toml)"


def test_the_ray_floor_has_what_the_launcher_passes():
    """launch._launch_ray gives ScalingConfig a label_selector (straggler exclusion), which Ray
    Train has from 2.53.0; the declared floor must not be below it."""
    import inspect

    import ray.train

    (ray_req,) = [r for r in _requirements() if r.name == "ray"]
    assert not ray_req.specifier.contains("2.52.1") and ray_req.specifier.contains("2.53.0")
    assert "label_selector" in inspect.signature(ray.train.ScalingConfig).parameters
