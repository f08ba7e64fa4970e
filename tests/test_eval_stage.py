"""The `eval` stage's planning and checks without a model: which models it evaluates, when two
roles are the same model, what invalidates a stored result, and what fails before any stage
runs. (The stage end to end, with Ray and SmolLM2, is in test_quickstart.py.)"""

from __future__ import annotations

import pytest

from conftest import DATA
from distill.config import ConfigError, EvalConfig, RunConfig, build_config
from distill.curate.benchmarks import BenchmarkError
from distill.evaluate import EvalRun
from distill.stages import get_stage
from distill.stages.eval import eval_sets, model_key, plan_models, preflight

BENCH = [{"name": "gsm8k", "path": str(DATA / "benchmarks" / "gsm8k.jsonl")},
         {"name": "math500", "path": str(DATA / "benchmarks" / "math500.jsonl")}]


def _cfg(tmp_path, **eval_cfg) -> RunConfig:
    return build_config({"run": {"dir": str(tmp_path / "run"), "stages": ["train", "eval"]},
                         "eval": {"benchmarks": BENCH, "limit": 3, **eval_cfg}})


def _run(cfg: RunConfig) -> EvalRun:
    ev = cfg.eval
    return EvalRun(prompt=ev.prompt, sampling=ev.sampling, greedy=ev.greedy, samples=ev.samples,
                   ks=ev.k_values(), verify=cfg.curate.verify)


def test_eval_is_a_registered_stage_after_train():
    from distill.config import STAGES

    assert STAGES.index("eval") == STAGES.index("train") + 1
    stage = get_stage("eval")
    assert callable(stage.run) and callable(stage.preflight) and callable(stage.resources)
    assert stage.section == "eval" and not stage.shards


def test_teacher_and_untrained_student_are_one_model_when_their_settings_match(tmp_path):
    cfg = _cfg(tmp_path)
    sets = eval_sets(cfg)
    plan = plan_models(cfg, tmp_path / "run")
    assert [role for role, _, _ in plan] == ["teacher", "student_before", "student_after"]
    keys = {role: model_key(spec, _run(cfg), sets) for role, spec, _ in plan}
    assert keys["teacher"] == keys["student_before"] != keys["student_after"]
    assert plan[2][1].config.model == str(tmp_path / "run" / "model")
    # Another student: no longer the same model.
    other = build_config({"run": {"dir": str(tmp_path / "run"), "stages": ["train", "eval"]},
                          "train": {"student": {"model": "HuggingFaceTB/SmolLM2-360M"}},
                          "eval": {"benchmarks": BENCH, "limit": 3}})
    plan = plan_models(other, tmp_path / "run")
    assert model_key(plan[0][1], _run(other), sets) != model_key(plan[1][1], _run(other), sets)


def test_model_key_changes_with_weights_settings_and_questions(tmp_path):
    cfg = _cfg(tmp_path)
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights v1")
    (model / "config.json").write_text("{}")
    sets = eval_sets(cfg)
    after = plan_models(cfg, tmp_path / "run")[2][1]
    key = model_key(after, _run(cfg), sets)
    assert model_key(after, _run(cfg), sets) == key  # same files, same key (a rerun re-exports them)
    (model / "model.safetensors").write_bytes(b"weights v2")
    assert model_key(after, _run(cfg), sets) != key
    key = model_key(after, _run(cfg), sets)
    assert model_key(after, _run(_cfg(tmp_path, samples=2)), sets) != key
    assert model_key(after, _run(cfg), eval_sets(_cfg(tmp_path, limit=4))) != key
    # Throughput settings do not change what is measured.
    assert model_key(after, _run(_cfg(tmp_path, cpus=4)), sets) == key


def test_preflight_reads_benchmarks_and_needs_a_student_to_evaluate(tmp_path):
    preflight(_cfg(tmp_path))
    bad = build_config({"run": {"dir": str(tmp_path / "r"), "stages": ["eval"]},
                        "eval": {"benchmarks": [{"name": "x", "path": str(tmp_path / "missing.jsonl")}]}})
    with pytest.raises(BenchmarkError, match="missing.jsonl does not exist"):
        preflight(bad)
    no_train = build_config({"run": {"dir": str(tmp_path / "r"), "stages": ["eval"]}, "eval": {"benchmarks": BENCH}})
    with pytest.raises(ConfigError, match="student_after"):
        preflight(no_train)
    only_teacher = build_config({"run": {"dir": str(tmp_path / "r"), "stages": ["eval"]},
                                 "eval": {"benchmarks": BENCH, "models": ["teacher"]}})
    preflight(only_teacher)


@pytest.mark.parametrize("bad,message", [
    ({"samples": 2, "k": [4]}, "eval.k=[4]: every k must be in [1, eval.samples=2]"),
    ({"samples": 4, "sampling": {"temperature": 0}}, "eval.samples=4 with eval.sampling.temperature=0"),
    ({"greedy": False}, "eval.greedy=false with eval.samples=0 evaluates nothing"),
    ({"benchmarks": BENCH + BENCH[:1]}, "eval.benchmarks: names must be unique; repeated: gsm8k"),
    ({"models": ["teacher", "teacher"]}, "each model at most once"),
])
def test_eval_config_errors_name_the_key(bad, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config({"run": {"dir": str(tmp_path)}, "source": {"path": "x.jsonl"}, "eval": bad})
    assert message in str(e.value)


def test_default_k_values():
    assert EvalConfig(samples=0).k_values() == []
    assert EvalConfig(samples=1).k_values() == [1]
    assert EvalConfig(samples=6).k_values() == [1, 2, 4, 6]
    assert EvalConfig(samples=16).k_values() == [1, 2, 4, 8, 16]
    assert EvalConfig(samples=16, k=[8, 1, 8]).k_values() == [1, 8]
