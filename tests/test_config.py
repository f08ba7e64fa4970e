import pytest
import yaml
from pydantic import BaseModel

from distill.config import ConfigError, RunConfig, explain, load_config, output_fields
from distill.stages import get_stage
from distill.config import STAGES
from distill.teachers import ENGINES, engine_class
from distill.generation import settings_hash


def write(tmp_path, tree) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tree))
    return str(p)


BASE = {"source": {"path": "data.jsonl"}}


def problems(tmp_path, tree, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, tree), list(overrides))
    return e.value.problems


def test_unknown_key_names_path_and_suggests(tmp_path):
    (msg,) = problems(tmp_path, {**BASE, "generate": {"n_sample": 4}})
    assert msg.startswith("generate.n_sample: unknown key")
    assert "did you mean 'generate.n_samples'" in msg


def test_unknown_nested_key_and_bad_type_reported_together(tmp_path):
    tree = {**BASE, "generate": {"sampling": {"temprature": 0.5, "max_new_tokens": "many"}}}
    msgs = problems(tmp_path, tree)
    assert any(m.startswith("generate.sampling.temprature: unknown key") and "'generate.sampling.temperature'" in m for m in msgs)
    assert any(m.startswith("generate.sampling.max_new_tokens:") and "'many'" in m for m in msgs)
    assert len(msgs) == 2


def test_unknown_section_and_engine_typo(tmp_path):
    msgs = problems(tmp_path, {**BASE, "genrate": {}, "generate": {"engine": "vlm"}})
    assert any(m.startswith("genrate: unknown key") and "'generate'" in m for m in msgs)
    assert any(m.startswith("generate.engine:") and "did you mean 'vllm'" in m for m in msgs)


def test_impossible_combinations(tmp_path):
    msgs = problems(tmp_path, {**BASE, "generate": {"n_samples": 4, "sampling": {"temperature": 0}, "engine": "openai"}})
    assert any("generate.n_samples=4 with generate.sampling.temperature=0" in m for m in msgs)
    assert any(m.startswith("generate.openai.base_url is required") for m in msgs)
    msgs = problems(tmp_path, {"source": {"path": "x", "answer_extract": "gsm8k", "columns": {"answer": None}}})
    assert any("source.answer_extract='gsm8k' needs source.columns.answer" in m for m in msgs)


def test_missing_required_and_ranges(tmp_path):
    msgs = problems(tmp_path, {"generate": {"n_samples": 0}})
    assert any(m.startswith("source: required key is missing") for m in msgs)
    assert any(m.startswith("generate.n_samples:") and "greater than or equal to 1" in m for m in msgs)


def test_dotted_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["generate.n_samples=8", "generate.sampling.stop=[a, b]",
                                              "generate.sampling.seed=null", "run.dir=/tmp/x"])
    assert cfg.generate.n_samples == 8
    assert cfg.generate.sampling.stop == ["a", "b"]
    assert cfg.generate.sampling.seed is None
    assert str(cfg.run.dir) == "/tmp/x"
    assert any("generate.n_samplez: unknown key" in m for m in problems(tmp_path, BASE, ["generate.n_samplez=3"]))
    assert any("an override is KEY.PATH=VALUE" in m for m in problems(tmp_path, BASE, ["generate.n_samples"]))


def test_prompt_template_needs_placeholder(tmp_path):
    msgs = problems(tmp_path, {**BASE, "generate": {"prompt": {"template": "Solve it"}}})
    assert msgs == ["generate.prompt.template: must contain the placeholder {problem}"]


def test_unknown_stage(tmp_path):
    msgs = problems(tmp_path, {**BASE, "run": {"stages": ["generat"]}})
    assert any("unknown stage 'generat'" in m and "did you mean 'generate'" in m for m in msgs)


def test_volatile_fields_do_not_change_the_generation_fingerprint(tmp_path):
    a = load_config(write(tmp_path, BASE))
    b = load_config(write(tmp_path, BASE), ["generate.n_samples=16", "generate.hf.batch_size=2",
                                            "generate.replicas=3", "generate.shard_size=7"])
    c = load_config(write(tmp_path, BASE), ["generate.sampling.temperature=0.9"])
    assert settings_hash(a.generate) == settings_hash(b.generate)
    assert settings_hash(a.generate) != settings_hash(c.generate)
    assert "n_samples" not in output_fields(a.generate)


def _sections(cls):
    yield cls
    for f in cls.model_fields.values():
        for t in (f.annotation, *getattr(f.annotation, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _sections(t)


def test_every_field_is_documented():
    missing = [f"{cls.__name__}.{name}" for cls in _sections(RunConfig)
               for name, f in cls.model_fields.items() if not (f.description or "").strip()]
    assert not missing
    text = "\n".join(explain())
    assert "generate.openai.api_key_env" in text and "never logged" in text


def test_registries_cover_every_name_a_config_may_use():
    for stage in STAGES:
        assert get_stage(stage).name == stage and callable(get_stage(stage).run)
    with pytest.raises(KeyError, match="unknown stage 'dedupe'"):
        get_stage("dedupe")
    for name in ENGINES:
        assert isinstance(engine_class(name), type)
