"""The decontamination stage's LLM-judge path with a real teacher engine (SmolLM2 on CPU).

Candidates (scores between a maybe and a sure threshold) are put to the engine; the test does
not predict what the small model answers, but checks the wiring against what it did answer:
every candidate was judged once, a "no" keeps the record, anything else removes it with
`+judge` in its audit trail, and sure matches never reach the judge.
"""

from __future__ import annotations

import json

import pytest

from conftest import DATA

pytestmark = pytest.mark.slow


def test_candidates_go_to_the_judge_and_its_answer_decides():
    from distill.config import HFEngineConfig
    from distill.curate.benchmarks import BenchmarkRef, load_benchmarks
    from distill.curate.decontam import BenchmarkIndex, DecontamConfig, parse_judge
    from distill.stages.decontam import _judge, _process
    from distill.teachers import build_engine

    bench = [json.loads(line) for line in open(DATA / "benchmarks" / "gsm8k.jsonl").readlines()[:3]]
    dc = DecontamConfig(benchmarks=[BenchmarkRef(name="gsm8k", path=str(DATA / "benchmarks" / "gsm8k.jsonl"))],
                        maybe_threshold=0.05, judge={"enabled": True, "max_tokens": 8},
                        policy="overlap")  # the maybe band of the scores; the policies' unsure band: test_decontam.py
    index = BenchmarkIndex(load_benchmarks(dc.benchmarks), dc)
    words = bench[0]["problem"].split()
    partial = " ".join(words[: len(words) // 3]) + " How many apples are left over at the end of the week?"
    records = [
        {"key": "a", "id": "a", "problem": bench[1]["problem"], "response": "x"},   # verbatim: sure match
        {"key": "b", "id": "b", "problem": partial, "response": "x"},               # a third of one: candidate
        {"key": "c", "id": "c", "problem": "Name a prime larger than 7 whose digits sum to 8.", "response": "x"},
    ]
    matches = index.check_many([r["problem"] for r in records])
    assert matches[0] is not None and not matches[0].candidate
    assert matches[1] is not None and matches[1].candidate, matches[1]
    assert matches[2] is None

    engine = build_engine("hf", HFEngineConfig(model="smollm2-135m-instruct", batch_size=4))
    try:
        kept, rejected, stats = _process((dc, index, None, engine), records)
        # What the model answers for the candidate, asked the same way the stage asks it.
        said = _judge(engine, dc, [(partial, matches[1].text)])[0]
    finally:
        engine.close()
    assert sum(v for k, v in stats.items() if k.startswith("candidates_judged_")) == 1
    assert [r["key"] for r in rejected if r["match_method"] == "exact"] == ["a"]
    if said is False:
        assert {r["key"] for r in kept} == {"b", "c"}
    else:
        assert {r["key"] for r in kept} == {"c"}
        b = next(r for r in rejected if r["key"] == "b")
        assert b["match_method"].endswith("+judge") and b["bench"] == "gsm8k"
    assert parse_judge("<think>hmm, yes maybe</think>No.") is False
