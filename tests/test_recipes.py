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
