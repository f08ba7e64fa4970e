"""The README's first command, minus the install: `distill run configs/quickstart.yaml`, end to
end on the real SmolLM2 model and the real GSM8K seeds (generate, curate, train, export, eval), then
again to show it resumes with nothing left to do.

Shrunk by command-line overrides to fit CI's time budget (half of each size: 16 questions, 4
training steps with a checkpoint every 2, 2 eval questions per benchmark): every stage, setting
and check is the quickstart's, only fewer of each. The full-size quickstart's time is measured
with `make quickstart` (README)."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import pytest
import yaml

from conftest import REPO, distill_cmd
from distill.store import Manifest, read_records

# Two runs: 1,219 s measured with the 2 cores shared (load average 5-15), over the suite's 900 s
# default; the limits below are hang guards, not budgets.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
# Half the quickstart's sizes: its first 16 questions (the full run's first two generation shards).
SHRINK = {"source.limit": 16, "train.max_steps": 4, "train.checkpoint.every_steps": 2, "eval.limit": 2}


def test_quickstart_end_to_end_then_nothing_left_to_do(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    for key, value in SHRINK.items():  # the config the run sees, for the checks below
        *path, leaf = key.split(".")
        section = cfg
        for part in path:
            section = section[part]
        assert leaf in section and value < section[leaf], key  # a real key, made smaller
        section[leaf] = value
    run_dir = tmp_path / "quickstart"
    # A relative run.dir, as the README's user has (runs/quickstart): Ray workers do not share the
    # driver's working directory, so every path they read must be made absolute by the driver.
    args = ["run", "configs/quickstart.yaml", f"run.dir={os.path.relpath(run_dir, REPO)}", "run.progress=false",
            *(f"{k}={v}" for k, v in SHRINK.items())]
    first = subprocess.run(distill_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=1600)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]

    n_q, n_s = cfg["source"]["limit"], cfg["generate"]["n_samples"]
    recs = read_records(run_dir / "generate")
    assert Counter(Counter((r["id"], r["sample_idx"]) for r in recs).values()) == Counter({1: n_q * n_s})
    assert {r["teacher"] for r in recs} == {"hf:smollm2-135m-instruct"}
    assert all(r["n_tokens"] > 0 and r["completion"] for r in recs)
    assert {r["finish_reason"] for r in recs} <= {"stop", "length"}
    lengths = [r["n_tokens"] for r in recs if r["finish_reason"] == "length"]
    assert all(n == cfg["generate"]["sampling"]["max_new_tokens"] for n in lengths)
    m = Manifest.read(run_dir / "generate")
    assert m.status == "complete" and m.counts["records"] == n_q * n_s
    assert "generate: done." in first.stdout and "samples/s" in first.stdout
    assert (run_dir / "config.yaml").exists()
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(run_dir / "generate" / "part-*.parquet"), split="train")
    assert ds.num_rows == n_q * n_s and set(ds.column_names) >= {"id", "sample_idx", "completion", "reasoning", "n_tokens"}

    # Curation: every generated sample got a verdict; the SFT set is what survived, as chat.
    verified = read_records(run_dir / "verify")
    assert len(verified) == n_q * n_s and {r["verdict"] for r in verified} <= {
        "equal", "not_equal", "no_answer", "timeout", "parse_error"}
    # The quickstart keeps wrong answers (its tiny teacher is rarely right) but every other
    # filter applies: nothing truncated reaches the SFT set.
    sft = read_records(run_dir / "sft")
    kept = {r["key"]: r for r in read_records(run_dir / "filter")}
    assert sft and {r["key"] for r in sft} <= set(kept)
    assert all(kept[r["key"]]["finish_reason"] == "stop" and kept[r["key"]]["pred_answer"] for r in sft)
    assert all(m[-1]["role"] == "assistant" for m in (r["messages"] for r in sft))
    decontam = Manifest.read(run_dir / "decontam")
    assert set(decontam.summary["benchmarks"]) == {"gsm8k", "math500"}

    # Training ran, and the exported model loads with plain transformers and answers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == cfg["train"]["max_steps"] and all(0 < x < 20 for x in losses), metrics  # finite, sane
    assert "train: model written to" in first.stdout and "from_pretrained" in first.stdout
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    # Eval: the teacher (== the student before training: evaluated once) and the trained student,
    # on the configured slices of GSM8K and MATH-500; the scores are the records' own aggregates.
    from distill.fsio import sha256_file
    from distill.evaluate import pass_at_k

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    models = results["models"]
    assert list(models) == ["teacher", "student_before", "student_after"]
    assert models["student_before"]["same_as"] == "teacher" and models["student_after"]["same_as"] is None
    assert models["student_after"]["model"] == str((run_dir / "model").resolve())
    ev = cfg["eval"]
    for b in ev["benchmarks"]:
        assert results["benchmarks"][b["name"]]["sha256"] == sha256_file(REPO / b["path"])
    for role in ("teacher", "student_after"):
        recs = [json.loads(x) for x in (run_dir / "eval" / models[role]["records"]).read_text().splitlines()]
        assert len(recs) == len(ev["benchmarks"]) * ev["limit"] * (1 + ev["samples"])
        for name, scores in models[role]["benchmarks"].items():
            mine = [r for r in recs if r["benchmark"] == name]
            greedy = [r["correct"] for r in mine if r["mode"] == "greedy"]
            assert scores["n_questions"] == ev["limit"] and scores["greedy_acc"] == sum(greedy) / len(greedy)
            per_q = Counter(r["id"] for r in mine if r["mode"] == "sample" and r["correct"])
            expect = sum(pass_at_k(ev["samples"], per_q[q], 2) for q in {r["id"] for r in mine}) / ev["limit"]
            assert scores["pass@k"]["2"] == pytest.approx(expect) and set(scores["maj@k"]) == {"1", "2"}
            assert all(r["n_tokens"] <= ev["sampling"]["max_new_tokens"] for r in mine)
    assert "eval: student_before is the same model with the same settings as teacher" in first.stdout
    rep = subprocess.run(distill_cmd("report", str(run_dir)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    page = (run_dir / "report.html").read_text()
    assert 'id="eval-table"' in page and 'id="plot-loss"' in page and "(= teacher)" in page

    second = subprocess.run(distill_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"source: {n_q} questions (unchanged, reused)" in second.stdout
    assert f"0 to generate in 0 shards ({n_q * n_s} already done)" in second.stdout
    assert len(read_records(run_dir / "generate")) == n_q * n_s
    # Training reached train.max_steps the first time: the rerun only re-exports.
    assert "train: step" not in second.stdout and "train: model written to" in second.stdout
    # The re-exported model has the same weights: nothing is evaluated again.
    assert "eval: teacher (hf:smollm2-135m-instruct) already evaluated with these settings; reused" in second.stdout
    assert "eval: student_after (hf:" in second.stdout and "eval: greedy" not in second.stdout
