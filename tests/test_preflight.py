"""`distill run` refuses a Megatron student whose shape does not fit the parallel degrees before
its first stage, not hours later in the train launcher: the checks that need only the config and
the student's HF config live in one function (`launch.student_problems`), which the train stage's
preflight, the launcher's `prepare` and the dry run all call."""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, distill_cmd
from distill.config import ConfigError, load_config

# SmolLM2-135M (the packaged student) has 9 attention heads and 3 key/value heads: TP 2 divides
# neither. The config alone is valid (2 workers = tp 2), so only the student's config can refuse it.
MEGATRON_TP2 = ["train.backend=megatron", "train.launch.launcher=torchrun", "train.launch.num_workers=2",
                "train.megatron.tensor_parallel=2"]
EXPECTED = ["train.megatron.tensor_parallel=2: the model's 9 attention heads do not divide by it",
            "train.megatron.tensor_parallel=2: the model's 3 key/value heads do not divide by it"]


def test_distill_run_refuses_megatron_shapes_before_generate(tmp_path):
    run_dir = tmp_path / "run"
    # Without the preflight this run would generate (minutes on CPU) before the launcher refused
    # it; the timeout makes that a failure too.
    proc = subprocess.run(distill_cmd("run", "configs/quickstart.yaml", "run.stages=[generate,train]",
                                      f"run.dir={run_dir}", *MEGATRON_TP2),
                          cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    for line in EXPECTED:
        assert line in proc.stderr, proc.stderr
    assert not (run_dir / "generate").exists() and not run_dir.exists()
    assert "Traceback" not in proc.stderr


def _problems(call) -> list[str]:
    with pytest.raises(ConfigError) as e:
        call()
    return e.value.problems


def test_preflight_launcher_and_dry_run_report_the_same_problems(tmp_path):
    """One home per check: the same lines from all three callers, the launcher's before it touches
    the data (no token cache)."""
    from distill.plan import train_plan
    from distill.stages.train import preflight
    from distill.train.launch import prepare

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"run.dir={tmp_path / 'run'}", *MEGATRON_TP2,
                                                              "train.seq_len=9000"])
    from_preflight = _problems(lambda: preflight(cfg))
    from_launcher = _problems(lambda: prepare(cfg.train, tmp_path / "run"))
    _, from_plan = train_plan(cfg.train)
    assert from_preflight == from_launcher == from_plan
    assert [p.split(":")[0] for p in from_preflight] == ["train.seq_len=9000 exceeds the context of train.student.model="
                                                         "'smollm2-135m-instruct' (max_position_embeddings=8192)",
                                                         *(e.split(":")[0] for e in EXPECTED)]
    assert all(any(p.startswith(e) for p in from_preflight) for e in EXPECTED)
    assert not (tmp_path / "run").exists()


def test_a_sliding_window_shorter_than_seq_len_is_refused_for_either_backend(tmp_path):
    """The packed attention (both backends) has no sliding window: it raised at the first forward
    pass, after the token cache; now the preflight names train.seq_len."""
    from transformers import MistralConfig

    from distill.stages.train import preflight

    MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, sliding_window=128).save_pretrained(tmp_path / "mistral")
    base = [f"run.dir={tmp_path / 'run'}", f"train.student.model={tmp_path / 'mistral'}"]
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [*base, "train.seq_len=256"])
    (problem,) = _problems(lambda: preflight(cfg))
    assert problem.startswith("train.seq_len=256 exceeds the sliding window of train.student.model=")
    assert "(128 tokens)" in problem and "lower train.seq_len to 128 or less" in problem
    preflight(load_config(REPO / "configs" / "quickstart.yaml", [*base, "train.seq_len=128"]))


def test_training_data_that_will_not_exist_is_refused_before_the_first_stage(tmp_path):
    """No train.data.paths and no sft stage before train (nor RUN/sft/ from an earlier run): the
    train stage would find nothing after generation; a configured file that is missing, likewise."""
    from distill.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    base = ["run.stages=[generate,train]", f"run.dir={run_dir}"]
    (problem,) = _problems(lambda: run_pipeline(load_config(REPO / "configs" / "quickstart.yaml", base)))
    assert problem.startswith(f"train.data.paths is empty and {run_dir / 'sft'} does not exist")
    missing = tmp_path / "nope.jsonl"
    (problem,) = _problems(lambda: run_pipeline(load_config(REPO / "configs" / "quickstart.yaml",
                                                            [*base, f"train.data.paths=[{missing}]"])))
    assert problem == f"train.data.paths[0]={str(missing)!r}: no such file or directory"
    assert not run_dir.exists()
    # `distill train` (only the train stage) of a run whose sft/ an earlier invocation wrote: no data
    # problem, while with `sft` configured but not run by this invocation there is one.
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"run.dir={run_dir}", "train.seq_len=9000"])
    no_data, seq_len = _problems(lambda: run_pipeline(cfg, ["train"]))  # every problem at once
    assert no_data.startswith("train.data.paths is empty") and seq_len.startswith("train.seq_len=9000 exceeds")
    (run_dir / "sft").mkdir(parents=True)
    (problem,) = _problems(lambda: run_pipeline(cfg, ["train"]))
    assert problem.startswith("train.seq_len=9000 exceeds the context")  # past the data check, to the student's
