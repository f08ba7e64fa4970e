"""Stage `validate`: rule checks and the well-posedness judge on questions, before generation.

The rules are checked on crafted texts (each reason) and on the real seed and benchmark problems
(what they reject there is counted, so a rule that starts rejecting good problems fails). Then a
real run: the source, `validate` with the judge on the fault server's deterministic verdicts, and
`generate` answering exactly the questions validate kept.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from conftest import DATA
from distill.config import build_config
from distill.curate.questions import ValidateConfig, parse_judge_verdict, rule_problem, validate_questions
from distill.testing.fault_server import FaultServer, judge_reply

# Stages run in this process connect an embedded Ray; each test leaves none behind.
pytestmark = pytest.mark.usefixtures("ray_shutdown_after")

CFG = ValidateConfig()
BAD = {
    "too_short": "Compute.",
    "no_question": "The train left the station at noon and kept a steady pace all day long.",
    "answer_in_text": "What is 6 times 7?\nAnswer: 42",
    "several_questions": "What is 2 + 2? And what is 3 + 3?",
    "language": "Сколько будет два плюс два? Ответьте числом.",
}


@pytest.mark.parametrize("code", sorted(BAD))
def test_each_rule_rejects_with_its_reason(code):
    assert (rule_problem(BAD[code], CFG) or "").startswith(code + ":")


def test_rules_keep_real_problems():
    """Of 16,792 GSM8K and MATH problems (train and test), the rules reject 5, all in the train
    sets: a typo'd double question, three multi-part MATH problems and one fill-in-the-blank."""
    counts: Counter = Counter()
    for name in ("train/gsm8k_train.jsonl", "train/math_train.jsonl", "benchmarks/gsm8k.jsonl",
                 "benchmarks/math500.jsonl"):
        for line in open(DATA / name):
            reason = rule_problem(json.loads(line)["problem"], CFG)
            counts[(name.split("/")[0], reason.split(":")[0] if reason else "ok")] += 1
    assert counts[("benchmarks", "ok")] == 1319 + 500
    rejected = sum(n for (where, code), n in counts.items() if code != "ok")
    assert rejected <= 5, counts


def test_judge_replies_are_parsed_or_rejected_as_unparsable():
    assert parse_judge_verdict("OK. Fine.") == (None, "Fine.")
    assert parse_judge_verdict("**MISSING_INFORMATION**: no speed given") == ("missing_information", "no speed given")
    with pytest.raises(ValueError, match="judge_unparsable"):
        parse_judge_verdict("I think it is fine")
    records = [{"id": str(i), "problem": p} for i, p in enumerate(["What is 1 + 1?", "What is 2 + 2?", "Hi."])]
    replies = iter(["AMBIGUOUS: two readings", None])
    kept, rejected = validate_questions(records, CFG, judge=lambda ps: [next(replies) for _ in ps])
    assert kept == [] and [r["reason"].split(":")[0] for r in rejected] == [
        "too_short", "ambiguous", "judge_failed"]


def _expected(problem: str) -> str | None:
    """The reason code validate must give (None: kept): the rules', else the server's verdict."""
    reason = rule_problem(problem, CFG)
    if reason is None:
        try:
            reason = parse_judge_verdict(judge_reply(problem))[0]
        except ValueError as e:
            reason = str(e)
    return reason.split(":")[0] if reason else None


@pytest.mark.slow
def test_validate_then_generate_answers_only_the_kept_questions(tmp_path, gsm8k_train):
    from distill.pipeline import run_pipeline

    rows = [json.loads(line) for line in gsm8k_train.open().readlines()[:60]]
    rows += [{"id": f"bad-{code}", "problem": text, "answer": "1"} for code, text in BAD.items()]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({k: r[k] for k in ("id", "problem", "answer")}) + "\n" for r in rows))
    run = tmp_path / "run"
    with FaultServer() as server:
        cfg = build_config({
            "run": {"dir": str(run), "stages": ["validate", "generate"], "progress": False},
            "ray": {"num_cpus": 2}, "source": {"path": str(seeds)}, "curate": {"workers": 1},
            "questions": {"validation": {"judge": {"enabled": True}}},
            "generate": {"engine": "openai", "n_samples": 1, "shard_size": 16, "cpus_per_replica": 0.5,
                         "sampling": {"temperature": 0.0, "max_new_tokens": 40, "seed": 1},
                         "openai": {"base_url": server.base_url, "model": "teacher", "concurrency": 8}}})
        run_pipeline(cfg)
    expected = {r["id"]: _expected(r["problem"]) for r in rows}
    read = lambda p: [x for f in sorted(p.glob("part-*.parquet")) for x in pq.read_table(f).to_pylist()]  # noqa: E731
    kept = {r["id"] for r in read(run / "validate")}
    rejected = {r["id"]: r["reason"].split(":")[0] for r in read(run / "validate" / "rejected")}
    assert kept == {i for i, why in expected.items() if why is None}
    assert rejected == {i: why for i, why in expected.items() if why is not None}
    assert {f"bad-{c}" for c in BAD} <= set(rejected)
    assert len(set(rejected.values()) - set(BAD)) >= 2  # the judge rejected some real questions too
    generated = read(run / "generate")
    assert {r["id"] for r in generated} == kept and len(generated) == len(kept)


@pytest.mark.slow
def test_questions_deduplicated_and_decontaminated_before_generation(tmp_path, gsm8k_train):
    """The dedup and decontam machinery on questions: a reworded copy and two GSM8K test problems
    in the source are removed before any is sent to the teacher."""
    from distill.pipeline import run_pipeline

    rows = [json.loads(line) for line in gsm8k_train.open().readlines()[:40]]
    rows.append({"id": "copy", "problem": rows[3]["problem"].upper(), "answer": rows[3]["answer"]})
    bench = [json.loads(line) for line in open(DATA / "benchmarks" / "gsm8k.jsonl").readlines()[:2]]
    rows += [{"id": f"test-{i}", "problem": b["problem"], "answer": "1"} for i, b in enumerate(bench)]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({k: r[k] for k in ("id", "problem", "answer")}) + "\n" for r in rows))
    run = tmp_path / "run"
    with FaultServer() as server:
        cfg = build_config({
            "run": {"dir": str(run), "stages": ["question_dedup", "question_decontam", "generate"], "progress": False},
            "ray": {"num_cpus": 2}, "source": {"path": str(seeds)},
            "curate": {"workers": 1, "decontam": {"benchmarks": [{"name": "gsm8k",
                                                                  "path": str(DATA / "benchmarks" / "gsm8k.jsonl")}]}},
            "generate": {"engine": "openai", "n_samples": 1, "shard_size": 16, "cpus_per_replica": 0.5,
                         "sampling": {"temperature": 0.0, "max_new_tokens": 40, "seed": 1},
                         "openai": {"base_url": server.base_url, "model": "teacher", "concurrency": 8}}})
        run_pipeline(cfg)
        asked = set(server.completions)
    read = lambda p: [x for f in sorted(p.glob("part-*.parquet")) for x in pq.read_table(f).to_pylist()]  # noqa: E731
    assert [r["id"] for r in read(run / "question_dedup" / "rejected")] == ["copy"]
    contaminated = read(run / "question_decontam" / "rejected")
    assert sorted(r["id"] for r in contaminated) == ["test-0", "test-1"]
    assert {r["bench"] for r in contaminated} == {"gsm8k"}
    generated = {r["id"] for r in read(run / "generate")}
    assert generated == {r["id"] for r in rows} - {"copy", "test-0", "test-1"}
    assert len(asked) == len(generated)  # the removed questions never reached the teacher


@pytest.mark.slow
def test_validate_killed_mid_stage_resumes_with_each_question_decided_once(tmp_path, gsm8k_train):
    """`kill -9` of the driver's process group once validate committed a partition, then the same
    run again (in-process): every question is decided exactly once, as the rules and the server's
    verdicts say, and the chain after it (question_dedup) completes."""
    import yaml

    from conftest import distill_cmd, kill_group_when
    from distill.pipeline import run_pipeline

    rows = [json.loads(line) for line in gsm8k_train.open().readlines()[:30]]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({k: r[k] for k in ("id", "problem", "answer")}) + "\n" for r in rows))
    run = tmp_path / "run"
    with FaultServer(latency_s=0.3) as server:
        tree = {"run": {"dir": str(run), "stages": ["validate", "question_dedup"], "progress": False},
                "ray": {"num_cpus": 2}, "source": {"path": str(seeds)},
                "curate": {"workers": 1, "shard_size": 5},
                "questions": {"validation": {"judge": {"enabled": True}}},
                "generate": {"engine": "openai", "openai": {"base_url": server.base_url, "model": "teacher",
                                                            "concurrency": 2}}}
        cfg_file = tmp_path / "cfg.yaml"
        cfg_file.write_text(yaml.safe_dump(tree))
        parts = run / "validate"
        kill_group_when(distill_cmd("run", str(cfg_file)), lambda: bool(list(parts.glob("part-*.parquet"))), "validate")
        n_parts = json.loads((parts / "_manifest.json").read_text())["partitions"]
        committed = len(list(parts.glob("part-*.parquet")))
        assert 1 <= committed < n_parts, "the kill must land mid-stage"
        run_pipeline(build_config(tree))
    read = lambda p: [x for f in sorted(p.glob("part-*.parquet")) for x in pq.read_table(f).to_pylist()]  # noqa: E731
    decided = read(parts) + read(parts / "rejected")
    assert sorted(r["id"] for r in decided) == sorted(r["id"] for r in rows)  # each exactly once
    assert {r["id"]: r.get("reason", "").split(":")[0] or None for r in decided} == {
        r["id"]: _expected(r["problem"]) for r in rows}
    assert json.loads((run / "question_dedup" / "_manifest.json").read_text())["status"] == "complete"
    assert len(read(run / "question_dedup")) + len(read(run / "question_dedup" / "rejected")) == len(read(parts))
