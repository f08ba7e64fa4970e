"""The command line as a user meets it: exit codes, messages on stderr, nothing run on errors."""

import subprocess

import yaml

from conftest import REPO, distill_cmd


def run(*args, cwd=REPO):
    return subprocess.run(distill_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_config_show_resolves_overrides_and_defaults():
    out = run("config", "show", "configs/quickstart.yaml", "generate.n_samples=5", "run.dir=runs/x")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["generate"]["n_samples"] == 5 and cfg["run"]["dir"] == "runs/x"
    assert cfg["generate"]["openai"]["concurrency"] == 32  # a default, filled in


def test_bad_config_exits_2_before_any_work(tmp_path):
    out = run("run", "configs/quickstart.yaml", f"run.dir={tmp_path / 'never'}", "generate.n_sampels=3",
              "generate.sampling.top_p=2")
    assert out.returncode == 2
    assert "generate.n_sampels: unknown key (did you mean 'generate.n_samples'?)" in out.stderr
    assert "generate.sampling.top_p: input should be less than or equal to 1" in out.stderr
    assert not (tmp_path / "never").exists()
    missing = run("run", "configs/nope.yaml")
    assert missing.returncode == 2 and "configs/nope.yaml' does not exist" in missing.stderr


def test_dry_run_validates_without_running(tmp_path):
    out = run("run", "configs/quickstart.yaml", f"run.dir={tmp_path / 'dry'}", "--dry-run")
    assert out.returncode == 0 and "n_samples: 2" in out.stdout
    assert not (tmp_path / "dry").exists()


def test_explain_lists_keys_with_docs():
    out = run("config", "explain", "generate.sampling")
    assert out.returncode == 0
    assert "generate.sampling.temperature  (float; default 0.7)" in out.stdout
    assert "greedy" in out.stdout
    assert run("config", "explain", "nothing.here").returncode == 2


def test_source_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"problem": "ok?", "answer": "1"}\nnot json\n')
    out = run("generate", "configs/quickstart.yaml", f"source.path={bad}", f"run.dir={tmp_path / 'r'}",
              "source.max_bad_fraction=0.1")
    assert out.returncode == 1
    assert f"{bad}:2: invalid_json" in out.stderr and "Traceback" not in out.stderr


def test_inputs_of_later_stages_are_checked_before_any_work(tmp_path):
    """A bad benchmark path or an impossible seq_len fails at once, not after generation."""
    out = run("run", "configs/quickstart.yaml", f"run.dir={tmp_path / 'r'}",
              "curate.decontam.benchmarks=[{name: aime24, path: /nowhere/aime24.jsonl}]")
    assert out.returncode == 1
    assert "/nowhere/aime24.jsonl" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()
    out = run("run", "configs/quickstart.yaml", f"run.dir={tmp_path / 'r'}", "train.seq_len=100000")
    assert out.returncode == 2 and "train.seq_len=100000 exceeds the context" in out.stderr
    assert not (tmp_path / "r").exists()


def test_train_and_curate_configs_need_no_source_section(tmp_path):
    """`distill train` never generates: a config with only run + train is complete. `distill run`
    of the same file (whose default stages include generate) still asks for the seed questions."""
    cfg = tmp_path / "train_only.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")},
                                   "train": {"data": {"paths": [str(tmp_path / "missing.jsonl")]}}}))
    train = run("train", str(cfg), "--dry-run")
    assert "source" not in train.stderr, train.stderr
    assert train.returncode == 1 and "train.data.paths[0]=" in train.stdout + train.stderr  # the plan ran
    full = run("run", str(cfg), "--dry-run")
    assert full.returncode == 2 and "source: required key is missing" in full.stderr
