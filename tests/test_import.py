"""The `import` stage: existing teacher outputs curated like generated ones.

Pure parts first (rows -> samples, the mix's quotas and thresholds), then real runs: the column
check before any work, a `kill -9` of the driver's process group mid-import with a weighted mix
of a list-valued JSONL set and a Parquet set (every sample exactly once, the same samples as an
uninterrupted run, the mix on its targets), and GSM8K's training solutions curated as traces
through verify ... sft with the set's own flags compared in the report.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, REPO, distill_cmd, kill_group_when
from distill.config import ConfigError, TraceSource, build_config
from distill.mixing import MixError, mix_hash, quotas, threshold
from distill.traces import UNKNOWN_FINISH, Origin, row_samples

# Stages run in this process connect an embedded Ray; each test leaves none behind.
pytestmark = pytest.mark.usefixtures("ray_shutdown_after")

ORIGIN = Origin("set", "/data/set.jsonl", "v1", "abc", "r1", "h")


def _source(**columns) -> TraceSource:
    return TraceSource(path="/data/set.jsonl", columns=columns)


# --------------------------------------------------------------------------- rows -> samples


def test_list_valued_generations_give_one_sample_per_item_with_aligned_flags_and_finish():
    src = _source(completion="generations", correct="ok", finish_reason="finish")
    row = {"id": "q1", "problem": "2+2?", "answer": "4",
           "generations": ["<think>add</think>It is 4.", "", 7, "I think 5.", "broken \ud800 text"],
           "ok": [True, False, True, False, True], "finish": ["stop", "stop", "stop", "length", "stop"]}
    samples, rejected = row_samples(row, "/data/set.jsonl:3", "set.jsonl:3", src, ORIGIN)
    assert [s["sample_idx"] for s in samples] == [0, 3]
    assert [s["key"] for s in samples] == ["set/set.jsonl:3#0", "set/set.jsonl:3#3"]
    first, second = samples
    assert (first["reasoning"], first["response"]) == ("add", "It is 4.")
    assert (second["reasoning"], second["response"]) == (None, "I think 5.")
    assert [s["origin_correct"] for s in samples] == [True, False]
    assert [s["finish_reason"] for s in samples] == ["stop", "length"]
    assert first["origin_row"] == "/data/set.jsonl:3" and first["origin_sha256"] == "abc"
    assert first["teacher"] == "r1" and first["id"] == "q1" and first["n_tokens"] is None
    reasons = {r["key"]: r["reason"].split(":")[0] for r in rejected}
    assert reasons == {"set/set.jsonl:3#1": "empty_completion", "set/set.jsonl:3#2": "bad_type",
                       "set/set.jsonl:3#4": "not_utf8"}
    assert all(r["location"] == "/data/set.jsonl:3" for r in rejected)


def test_messages_form_and_unknown_finish_reason():
    src = _source(messages="messages", problem="problem", answer=None)
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 3*3?"},
                        {"role": "assistant", "content": "</think>9"}]}
    samples, rejected = row_samples(row, "f:1", "f:1", src, ORIGIN)
    assert rejected == []
    (s,) = samples
    assert s["problem"] == "What is 3*3?" and s["response"] == "9" and s["reasoning"] == ""
    assert s["finish_reason"] == UNKNOWN_FINISH and s["origin_correct"] is None
    assert s["id"].startswith("q-")  # no id column: the problem's hash, as for questions

    no_reply = {"messages": [{"role": "user", "content": "hi?"}]}
    assert row_samples(no_reply, "f:2", "f:2", src, ORIGIN)[1][0]["reason"].startswith("malformed_completion")


def test_rows_without_a_usable_completion_are_rejected_with_the_reason():
    src = _source(completion="gen", answer=None)
    cases = {"missing_completion": {"problem": "p"}, "empty_problem": {"problem": " ", "gen": "x"},
             "bad_type": {"problem": "p", "gen": {"text": "x"}}}
    for code, row in cases.items():
        samples, rejected = row_samples(row, "f:9", "f:9", src, ORIGIN)
        assert samples == [] and len(rejected) == 1 and rejected[0]["reason"].startswith(code), (code, rejected)
    # A misaligned flag list is not trusted for any item.
    row = {"problem": "p", "gen": ["a", "b"], "ok": [True]}
    samples, _ = row_samples(row, "f:1", "f:1", _source(completion="gen", correct="ok", answer=None), ORIGIN)
    assert [s["origin_correct"] for s in samples] == [None, None]


# --------------------------------------------------------------------------- mixing


def test_quotas_follow_the_weights_exactly_and_refuse_to_repeat():
    assert quotas([1000, 100], [0.5, 0.5]) == [100, 100]
    assert quotas([1000, 300], [3, 1]) == [900, 300]
    q = quotas([500, 500, 500], [1, 1, 1], total=100)
    assert sum(q) == 100 and max(q) - min(q) <= 1
    with pytest.raises(MixError, match="'b' needs 50 but holds 10"):
        quotas([100, 10], [1, 1], total=100, names=["a", "b"])


def test_threshold_keeps_exactly_the_quota_and_the_seed_decides_which():
    keys = [f"k{i}" for i in range(5000)]
    kept = {}
    for seed in (0, 1):
        h = np.array([mix_hash(seed, k) for k in keys], dtype=np.uint64)
        t = threshold(h, 1234)
        kept[seed] = {k for k, x in zip(keys, h) if int(x) <= t}
        assert len(kept[seed]) == 1234
    again = np.array([mix_hash(0, k) for k in reversed(keys)], dtype=np.uint64)
    assert {k for k, x in zip(reversed(keys), again) if int(x) <= threshold(again, 1234)} == kept[0]
    assert len(kept[0] & kept[1]) < 0.4 * 1234  # another seed, another (independent) sample
    assert threshold(np.zeros(3, np.uint64), 0) == -1


# --------------------------------------------------------------------------- config and preflight


def test_a_mapping_error_names_the_key_and_the_columns_the_file_has_before_any_work(tmp_path, gsm8k_train):
    from distill.pipeline import run_pipeline

    run = tmp_path / "run"
    cfg = build_config({"run": {"dir": str(run), "stages": ["import", "verify"]},
                        "traces": {"sources": [{"path": str(gsm8k_train), "columns": {"completion": "solutions"}}]}})
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg)
    assert "traces.sources[0].columns.completion: no column 'solutions'" in str(e.value)
    assert "its columns: id, problem, answer, solution, source" in str(e.value)
    assert not run.exists()

    with pytest.raises(ConfigError, match=r"traces.sources\[1\].columns: name exactly one of completion"):
        build_config({"traces": {"sources": [{"path": "a.jsonl", "columns": {"completion": "c"}},
                                             {"path": "b.jsonl", "columns": {"completion": "c", "messages": "m"}}]}})
    with pytest.raises(ConfigError, match="set weight on every source or on none"):
        build_config({"traces": {"sources": [{"path": "a.jsonl", "weight": 1, "columns": {"completion": "c"}},
                                             {"path": "b.jsonl", "columns": {"completion": "c"}}]}})


# --------------------------------------------------------------------------- real runs


def _write_sets(root: Path) -> tuple[Path, Path, int, int]:
    """A JSONL set with 2-8 generations per row (and two malformed lines), a Parquet set with one."""
    rng = random.Random(7)
    lines, n_jsonl = [], 0
    for i in range(400):
        k = rng.randint(2, 8)
        n_jsonl += k
        lines.append(json.dumps({"id": f"j{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i),
                                 "generations": [f"<think>{i}+{i}</think>The answer is {2 * i + (g % 3 == 2)}."
                                                 for g in range(k)],
                                 "flags": [g % 3 != 2 for g in range(k)]}))
        if i in (100, 300):
            lines.append('{"id": "broken", "problem": ')
    jsonl = root / "gens.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    n_parquet = 1500
    table = pa.table({"problem": [f"Compute {i} * 3." for i in range(n_parquet)],
                      "answer": [str(3 * i) for i in range(n_parquet)],
                      "output": [f"{i} times 3 is {3 * i}. The answer is {3 * i}." for i in range(n_parquet)]})
    parquet = root / "single.parquet"
    pq.write_table(table, parquet, row_group_size=200)
    return jsonl, parquet, n_jsonl, n_parquet


def _mix_config(root: Path, run: Path, jsonl: Path, parquet: Path) -> Path:
    cfg = {"run": {"dir": str(run), "stages": ["import"], "progress": False}, "ray": {"num_cpus": 2},
           "curate": {"workers": 1},
           "traces": {"seed": 3, "chunk_mb": 0.004, "total": 1500, "sources": [
               {"path": str(jsonl), "name": "gens", "teacher": "r1", "weight": 0.6, "max_bad_fraction": 0.05,
                "columns": {"completion": "generations", "correct": "flags"}},
               {"path": str(parquet), "name": "single", "weight": 0.4, "columns": {"completion": "output"}}]}}
    path = root / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(stage_dir: Path, rejected: bool = False) -> list[dict]:
    base = stage_dir / "rejected" if rejected else stage_dir
    return [r for p in sorted(base.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.mark.slow
def test_weighted_import_killed_mid_stage_resumes_exactly_once_on_target(tmp_path):
    jsonl, parquet, n_jsonl, n_parquet = _write_sets(tmp_path)
    run, ref = tmp_path / "run", tmp_path / "ref"
    cfg, ref_cfg = _mix_config(tmp_path, run, jsonl, parquet), _mix_config(tmp_path, ref, jsonl, parquet)

    full = subprocess.run(distill_cmd("run", str(ref_cfg)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr[-3000:]
    n_units = len(list((ref / "import").glob("part-*.parquet")))
    assert n_units >= 8

    kill_group_when(distill_cmd("run", str(cfg)), lambda: len(list((run / "import").glob("part-*.parquet"))) >= 3,
                    "import")
    committed = len(list((run / "import").glob("part-*.parquet")))
    assert 3 <= committed < n_units, "the kill must land mid-stage"

    again = subprocess.run(distill_cmd("run", str(cfg)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert f"{n_units - committed} to do" in again.stdout, again.stdout

    got, want = _rows(run / "import"), _rows(ref / "import")
    counts = Counter(r["key"] for r in got)
    assert set(counts.values()) == {1}, "a sample was written twice"
    strip = lambda rows: sorted(json.dumps(r, sort_keys=True) for r in rows)  # noqa: E731
    assert strip(got) == strip(want), "the resumed run kept other samples than the uninterrupted one"
    assert strip(_rows(run / "import", True)) == strip(_rows(ref / "import", True))

    # The mix: 1500 samples, 60% / 40%, exactly (to one sample of rounding).
    by = Counter(r["origin"] for r in got)
    assert sum(by.values()) == 1500 and abs(by["gens"] / 1500 - 0.6) <= 0.01 and abs(by["single"] / 1500 - 0.4) <= 0.01
    # One sample per list item, indices stable: a kept gens sample is item sample_idx of its row.
    for r in got:
        if r["origin"] == "gens":
            line = int(r["origin_row"].rsplit(":", 1)[1])
            assert r["key"] == f"gens/gens.jsonl:{line}#{r['sample_idx']}"
            assert r["origin_correct"] == (r["sample_idx"] % 3 != 2)
        assert r["n_tokens"] > 0 and r["finish_reason"] == UNKNOWN_FINISH
    rejected = _rows(run / "import", True)
    assert sorted(r["reason"].split(":")[0] for r in rejected) == ["invalid_json", "invalid_json"]
    manifest = json.loads((run / "import" / "_manifest.json").read_text())
    mix = manifest["summary"]["mix"] if manifest["summary"]["mix"] else json.loads((run / "import" / "mix.json").read_text())["mix"]
    assert mix["gens"]["candidates"] == n_jsonl and mix["single"]["candidates"] == n_parquet


@pytest.mark.slow
def test_gsm8k_solutions_curated_as_traces_with_flags_in_the_report(tmp_path, gsm8k_train):
    """GSM8K's reference solutions stand in for teacher traces; every fifth one is corrupted (the
    final answer changed) and every seventh carries a wrong flag, so the report's agreement
    numbers are known in advance."""
    rows = [json.loads(line) for line in gsm8k_train.open().readlines()[:120]]
    for i, r in enumerate(rows):
        if i % 5 == 0:
            r["solution"] = r["solution"].rsplit("####", 1)[0] + f"#### {int(r['answer']) + 1}"
        r["is_correct"] = (i % 5 != 0) != (i % 7 == 0)
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cfg = build_config({
        "run": {"dir": str(run), "stages": ["import", "verify", "filter", "dedup", "decontam", "sft"],
                "progress": False},
        "ray": {"num_cpus": 2},
        "traces": {"sources": [{"path": str(data), "name": "gsm8k_solutions",
                                "columns": {"completion": "solution", "correct": "is_correct"}}]},
        "curate": {"workers": 1, "verify": {"workers": 1},
                   "decontam": {"benchmarks": [{"name": "gsm8k", "path": str(DATA / "benchmarks" / "gsm8k.jsonl")}]}},
    })
    from distill.pipeline import run_pipeline
    from distill.report import build_report

    run_pipeline(cfg)
    verified = _rows(run / "verify")
    assert len(verified) == 120
    assert sum(not r["correct"] for r in verified) == 24  # the corrupted fifth
    report = build_report(run)
    flags = report["imported_flags"]["gsm8k_solutions"]
    wrong_flag = sum(1 for i in range(120) if i % 7 == 0)
    assert flags["flagged"] == 120 and flags["agree"] == 120 - wrong_flag
    assert flags["set_says_right_verifier_wrong"] == sum(1 for i in range(120) if i % 7 == 0 and i % 5 == 0)
    assert report["funnel"][0]["stage"] == "import" and report["funnel"][0]["kept"] == 120
    assert report["imported_yield"]["gsm8k_solutions"]["filter"] == 96  # wrong answers dropped there
    sft = _rows(run / "sft")
    assert len(sft) == 96 and report["funnel"][-1]["kept"] == 96


@pytest.mark.slow
def test_malformed_rows_over_the_budget_fail_the_stage_after_keeping_everything(tmp_path):
    from distill.pipeline import run_pipeline
    from distill.sources import SourceError

    lines = [json.dumps({"problem": f"p{i}", "gen": ["ok", ""]}) for i in range(60)]
    lines[10] = "{not json"
    lines[20] = json.dumps({"problem": "no completion here"})
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    cfg = {"run": {"dir": str(run), "stages": ["import"], "progress": False}, "ray": {"num_cpus": 2},
           "curate": {"workers": 1},
           "traces": {"chunk_mb": 0.0005, "sources": [{"path": str(data), "max_bad_fraction": 0.02,
                                                       "columns": {"completion": "gen", "answer": None}}]}}
    with pytest.raises(SourceError, match=r"2 of 60 input rows are malformed \(3.3% > max_bad_fraction=0.02\)"
                                          r".*First: .*set.jsonl:11: invalid_json"):
        run_pipeline(build_config(cfg))
    manifest = json.loads((run / "import" / "_manifest.json").read_text())
    assert manifest["status"] == "failed"
    rejected = _rows(run / "import", True)
    # The 60 empty items are rejected too (reason kept), but they do not count against the budget.
    assert Counter(r["reason"].split(":")[0] for r in rejected) == {
        "empty_completion": 58, "invalid_json": 1, "missing_completion": 1}
    assert len(_rows(run / "import")) == 58
    shards = {p.name: p.stat().st_mtime_ns for p in (run / "import").glob("part-*.parquet")}
    cfg["traces"]["sources"][0]["max_bad_fraction"] = 0.05  # within budget: the same shards now pass
    run_pipeline(build_config(cfg))
    assert json.loads((run / "import" / "_manifest.json").read_text())["status"] == "complete"
    assert {p.name: p.stat().st_mtime_ns for p in (run / "import").glob("part-*.parquet")} == shards


@pytest.mark.slow
def test_generated_and_imported_sets_mix_at_their_weights(tmp_path):
    """A run's own generate/ output (written here by hand) mixed 1:3 with an imported JSONL set:
    generated samples keep their keys, teacher and settings; the mix is on target."""
    from distill.generation import GEN_REJECTED_SCHEMA, GENERATED_SCHEMA
    from distill.pipeline import run_pipeline
    from distill.store import ShardStore

    run = tmp_path / "run"
    store = ShardStore(run / "generate", stage="generate", fingerprint="hand", settings={},
                       schema=GENERATED_SCHEMA, rejected_schema=GEN_REJECTED_SCHEMA).open()
    generated = [{"key": f"g{i}#0#h", "id": f"g{i}", "problem": f"What is {i}?", "answer": str(i), "source": "seed",
                  "sample_idx": 0, "seed": i, "teacher": "hf:teacher", "params_hash": "h",
                  "completion": f"It is {i}.", "reasoning": None, "response": f"It is {i}.",
                  "finish_reason": "stop", "prompt_tokens": 5, "n_tokens": 4} for i in range(200)]
    store.commit(0, generated[:120])
    store.commit(1, generated[120:])
    store.finish({})
    data = tmp_path / "bought.jsonl"
    data.write_text("".join(json.dumps({"problem": f"Add {i} and 1.", "answer": str(i + 1),
                                        "text": f"{i} + 1 = {i + 1}"}) + "\n" for i in range(900)))
    import datasets

    chats = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"Double {i}?"},
                                                      {"role": "assistant", "content": f"<think>2*{i}</think>{2 * i}"}]}
                                        for i in range(100)])
    chats.save_to_disk(str(tmp_path / "chats"))
    cfg = build_config({
        "run": {"dir": str(run), "stages": ["import"], "progress": False}, "ray": {"num_cpus": 2},
        "curate": {"workers": 1},
        "traces": {"seed": 11, "sources": [{"stage": "generate", "weight": 1},
                                           {"path": str(data), "name": "bought", "weight": 3,
                                            "columns": {"completion": "text", "id": None}},
                                           {"path": str(tmp_path / "chats"), "weight": 0.5,
                                            "columns": {"messages": "messages", "answer": None, "id": None}}]}})
    run_pipeline(cfg)
    rows = _rows(run / "import")
    by = Counter(r["origin"] for r in rows)
    # Shares 1 : 3 : 0.5 of 4.5; generate (200 = 2/9 of 900) and chats (100 = 1/9) set the size.
    assert by == {"generate": 200, "bought": 600, "chats": 100}
    chat = sorted((r for r in rows if r["origin"] == "chats"), key=lambda r: r["origin_row"])
    assert chat[0]["reasoning"] == "2*0" and chat[0]["response"] == "0" and chat[0]["problem"] == "Double 0?"
    assert chat[0]["origin_row"].endswith(":row 1") and chat[0]["origin_sha256"]
    gen = [r for r in rows if r["origin"] == "generate"]
    assert {r["key"] for r in gen} == {g["key"] for g in generated}
    assert all(r["teacher"] == "hf:teacher" and r["n_tokens"] == 4 and r["finish_reason"] == "stop" for r in gen)
    bought = [r for r in rows if r["origin"] == "bought"]
    assert all(r["finish_reason"] == UNKNOWN_FINISH and r["id"].startswith("q-") for r in bought)
