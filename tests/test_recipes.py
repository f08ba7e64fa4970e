"""Every shipped recipe validates, and resolves to a config whose engine and stages exist."""

from pathlib import Path

import pytest

from conftest import REPO
from distill.config import load_config
from distill.config import STAGES
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
    assert all(s in STAGES for s in cfg.run.stages)


def test_every_stage_is_registered_and_vice_versa():
    from distill.config import CURATE_STAGES, RunConfig
    from distill.stages import Stage, get_stage

    assert set(CURATE_STAGES) <= set(STAGES)
    cfg = RunConfig()
    for name in STAGES:  # each stage module defines one Stage, with everything the registry promises
        stage = get_stage(name)
        assert isinstance(stage, Stage) and callable(stage.run) and callable(stage.resources), name
        stage.config(cfg)  # its section exists in the config
        # A shard stage names the stage it reads; import reads files outside the run (or generate/,
        # when a source says so), so it names none.
        assert stage.shards == (stage.reads is not None or name == "import"), name
        if stage.reads not in (None, "source"):
            assert STAGES.index(stage.reads) < STAGES.index(name), f"{name} reads a later stage"
    modules = {p.stem for p in (REPO / "distill" / "stages").glob("*.py")} - {"__init__", "derived"}
    assert modules == set(STAGES), "a stage module no config can name, or a name without a module"
