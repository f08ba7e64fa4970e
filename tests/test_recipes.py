"""Every shipped recipe validates, and resolves to a config whose engine and stages exist."""

from pathlib import Path

import pytest

from conftest import REPO
from distill.config import load_config
from distill.stages import STAGE_RUNNERS
from distill.teachers import ENGINES

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "teacher_openai.yaml", "teacher_vllm.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path: Path):
    text = path.read_text()
    assert text.startswith("#"), "a recipe opens with a comment: the hardware it is for and what it produces"
    cfg = load_config(path)
    assert cfg.generate.engine in ENGINES
    assert all(s in STAGE_RUNNERS for s in cfg.run.stages)


def test_every_stage_is_registered_and_vice_versa():
    import importlib

    from distill.config import CURATE_STAGES, STAGES

    assert set(STAGES) == set(STAGE_RUNNERS) and set(CURATE_STAGES) <= set(STAGES)
    for name in STAGES:  # each stage module defines what the registries expect of it
        module = importlib.import_module(f"distill.stages.{name}")
        assert callable(module.run) and callable(module.resources), name
    modules = {p.stem for p in (REPO / "distill" / "stages").glob("*.py")} - {"__init__", "derived"}
    assert modules == set(STAGES), "a stage module no config can name, or a name without a module"


def test_every_filter_a_config_can_name_is_registered():
    from distill.curate.filters import FILTERS, FilterConfig

    configurable = {name for name, f in FilterConfig.model_fields.items() if name != "order"}
    assert configurable == set(FILTERS)


def test_every_train_backend_a_config_can_name_is_registered():
    from distill.train.backends import BACKENDS
    from distill.train.config import BACKEND_NAMES

    assert set(BACKEND_NAMES) == set(BACKENDS)
