"""The curation stages end to end on Ray, through the CLI, on teacher output written by hand.

The seed questions are real GSM8K-train items; the teacher samples are constructed so that each
kind of problem the stages must catch is present exactly where we put it: wrong answers, a
truncated sample, a repetition loop, a duplicate question, a copy of a GSM8K *test* item, and a
pathological answer that must time out without hurting anything else. Every count asserted below
follows from that construction, and the funnel report must reproduce it from the files.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, REPO, distill_cmd

pytestmark = pytest.mark.slow

BENCH = DATA / "benchmarks"


def _completion(answer: str, steps: str = "") -> tuple[str, str, str]:
    reasoning = (steps or "Let me work through the quantities one at a time and add them up carefully.")
    response = f"Adding everything up gives the total.\n\nThe final answer is $\\boxed{{{answer}}}$."
    return f"<think>\n{reasoning}\n</think>\n\n{response}", reasoning, response


def _write_run(tmp_path, questions: list[dict], samples: dict[str, list[tuple[str, str]]]):
    """A run directory whose source/ and generate/ look like a finished generation."""
    from distill.config import SourceConfig
    from distill.generation import GEN_REJECTED_SCHEMA, GENERATED_SCHEMA
    from distill.sources import ingest
    from distill.store import ShardStore

    run = tmp_path / "run"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(q) + "\n" for q in questions))
    ingest(SourceConfig(path=str(seeds)), run / "source")
    store = ShardStore(run / "generate", stage="generate", fingerprint="test", settings={},
                       schema=GENERATED_SCHEMA, rejected_schema=GEN_REJECTED_SCHEMA).open()
    records = []
    for q in questions:
        for i, (kind, ans) in enumerate(samples[q["id"]]):
            completion, reasoning, response = _completion(ans)
            finish = "stop"
            if kind == "truncated":
                completion, reasoning, response, finish = "<think>\nFirst, the eggs per day are", \
                    "First, the eggs per day are", "", "length"
            if kind == "loop":
                loop = "so the answer is the number of eggs times two " * 60
                completion, reasoning, response = _completion(ans, loop)
            records.append({
                "key": f"{q['id']}#{i}#h", "id": q["id"], "problem": q["problem"], "answer": q["answer"],
                "source": "test", "sample_idx": i, "seed": i, "teacher": "hand", "params_hash": "h",
                "completion": completion, "reasoning": reasoning, "response": response,
                "finish_reason": finish, "prompt_tokens": 50, "n_tokens": len(completion.split()),
            })
    store.commit(0, records[: len(records) // 2])
    store.commit(1, records[len(records) // 2:])
    store.finish({})
    return run


def test_curate_funnel_end_to_end(tmp_path):
    train = [json.loads(line) for line in open(DATA / "train" / "gsm8k_train.jsonl").readlines()[:12]]
    test_item = json.loads(open(BENCH / "gsm8k.jsonl").readline())
    contaminated = {"id": "contam", "problem": test_item["problem"], "answer": test_item["answer"]}
    duplicate = {"id": "dup", "problem": train[0]["problem"].upper() + "  ", "answer": train[0]["answer"]}
    questions = [{k: q[k] for k in ("id", "problem", "answer")} for q in train] + [contaminated, duplicate]

    samples = {q["id"]: [("ok", q["answer"]), ("ok", q["answer"])] for q in questions}
    samples[train[1]["id"]] = [("ok", train[1]["answer"]), ("ok", str(int(train[1]["answer"]) + 1))]  # one wrong
    samples[train[2]["id"]] = [("truncated", ""), ("ok", train[2]["answer"])]
    samples[train[3]["id"]] = [("loop", train[3]["answer"]), ("ok", train[3]["answer"])]
    samples[train[4]["id"]] = [("ok", "2^{2^{2^{2^{2^{2^{100}}}}}}"), ("ok", train[4]["answer"])]  # pathological
    samples[train[5]["id"]] = [("ok", "1"), ("ok", "2")]  # all wrong: per-sample wrong_answer drops both
    run = _write_run(tmp_path, questions, samples)

    cfg = {
        "run": {"dir": str(run), "stages": ["verify", "filter", "dedup", "decontam", "sft"], "progress": False},
        "ray": {"num_cpus": 2},
        "curate": {
            "shard_size": 4,
            "verify": {"timeout_s": 3},
            "filters": {"max_per_question": {"enabled": True, "k": 1, "strategy": "shortest"}},
            "decontam": {"benchmarks": [{"name": "gsm8k", "path": str(BENCH / "gsm8k.jsonl")},
                                        {"name": "math500", "path": str(BENCH / "math500.jsonl")}]},
            "sft": {"system": "You are a careful math tutor."},
        },
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(distill_cmd("curate", str(cfg_path)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr

    verify = [r for p in sorted((run / "verify").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    by_key = {r["key"]: r for r in verify}
    assert len(verify) == 2 * len(questions)
    assert by_key[f"{train[4]['id']}#0#h"]["verdict"] == "timeout"
    assert by_key[f"{train[4]['id']}#1#h"]["verdict"] == "equal"
    assert by_key[f"{train[1]['id']}#1#h"]["verdict"] == "not_equal"
    assert by_key[f"{train[1]['id']}#0#h"]["pass_rate"] == pytest.approx(0.5)
    assert by_key[f"{train[2]['id']}#0#h"]["verdict"] == "no_answer"

    def rejected(stage):
        return [r for p in sorted((run / stage / "rejected").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]

    filt = {r["key"]: r["reason"].split(":")[0] for r in rejected("filter")}
    assert filt[f"{train[2]['id']}#0#h"] == "truncated"
    assert filt[f"{train[3]['id']}#0#h"] == "repetition"
    assert filt[f"{train[1]['id']}#1#h"] == "wrong_answer"
    # Per-sample filters run before per-question ones and the first failing one names the
    # reason: wrong_answer, never the difficulty band.
    assert [filt[f"{train[5]['id']}#{i}#h"] for i in (0, 1)] == ["wrong_answer", "wrong_answer"]

    dedup = rejected("dedup")
    assert {r["id"] for r in dedup} == {"dup"} and dedup[0]["dup_of"] == train[0]["id"]
    contam = rejected("decontam")
    assert {r["id"] for r in contam} == {"contam"}
    assert contam[0]["bench"] == "gsm8k" and contam[0]["bench_id"] == test_item["id"]

    sft = [r for p in sorted((run / "sft").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    # max_per_question k=1: one sample per surviving question.
    surviving = {q["id"] for q in questions} - {train[5]["id"], "dup", "contam"}
    assert sorted(r["id"] for r in sft) == sorted(surviving)
    first = sft[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[2]["content"].startswith("<think>\n") and "\\boxed{" in first[2]["content"]

    manifest = json.loads((run / "decontam" / "_manifest.json").read_text())
    # The sha256 of the benchmark file read, computed here from its bytes.
    recorded = manifest["summary"]["benchmarks"]["gsm8k"]["sha256"]
    assert {str(Path(f).resolve()): h for f, h in recorded.items()} == {
        str((BENCH / "gsm8k.jsonl").resolve()): hashlib.sha256((BENCH / "gsm8k.jsonl").read_bytes()).hexdigest()}

    rep = subprocess.run(distill_cmd("report", str(run)), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    report = json.loads((run / "report.json").read_text())
    funnel = {f["stage"]: f for f in report["funnel"]}
    assert funnel["generate"]["kept"] == 2 * len(questions)
    assert funnel["filter"]["rejected"] == len(filt)
    # max_per_question (k=1) already left one sample per question before dedup and decontam.
    assert funnel["dedup"]["reasons"] == {"duplicate": 1}
    assert funnel["decontam"]["reasons"] == {"contaminated": 1}
    assert funnel["sft"]["kept"] == len(surviving)
    assert report["decontam"]["questions_removed_by_benchmark"] == {"gsm8k": 1}
    assert "wrong_answer" in rep.stdout and "decontam" in rep.stdout
    page = (run / "report.html").read_text()
    # The plots this run has data for: the funnel and its rejection reasons, completion lengths,
    # pass rate (verify ran) and decontamination hits. No retries (generation was written by
    # hand), no training, no eval: those sections say what is missing instead of plotting.
    plots = re.findall(r'<svg id="([^"]+)"', page)
    assert plots == ["plot-funnel", "plot-reasons", "plot-lengths", "plot-passrate", "plot-decontam"], plots
    assert page.count("<svg") == len(plots) and "Decontamination" in page

    # The columns each stage's shards carry on disk, accepted and rejected, written out by hand:
    # what a downstream reader (the trainer, a user's notebook) relies on.
    def names(stage, rejected=False):
        shards = sorted((run / stage / ("rejected" if rejected else "")).glob("part-*.parquet"))
        assert shards, (stage, rejected)
        found = {tuple(pq.read_schema(p).names) for p in shards}
        assert len(found) == 1, (stage, found)  # every shard of a stage has the same columns
        return list(found.pop())

    generated = names("generate")
    verified = generated + ["pred_answer", "label", "agreement", "verdict", "verdict_detail", "correct",
                            "pass_rate", "n_samples"]
    assert names("verify") == names("filter") == names("dedup") == names("decontam") == verified
    assert names("filter", rejected=True) == verified + ["reason"]
    assert names("dedup", rejected=True) == verified + ["reason", "dup_of", "dup_method", "dup_score"]
    assert names("decontam", rejected=True)[:len(verified) + 3] == verified + ["reason", "bench", "bench_id"]
    assert names("sft") == ["key", "messages", "id", "source", "sample_idx", "teacher", "answer", "pred_answer",
                            "pass_rate", "n_tokens"]

    # Unchanged settings: a second run recomputes nothing. A changed filter recomputes filter and
    # everything after it, and says why.
    again = subprocess.run(distill_cmd("curate", str(cfg_path)), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "recomputing" not in again.stdout
    changed = subprocess.run(distill_cmd("curate", str(cfg_path), "curate.filters.max_per_question.k=2"),
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stderr
    assert "filter: recomputing" in changed.stdout and "verify: recomputing" not in changed.stdout
