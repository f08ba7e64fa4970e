"""Evaluation: the estimators against brute-force enumeration of every k-subset, benchmark
loading from the shared data, and `evaluate` end to end (a scripted engine whose answers are known,
then the real SmolLM2 through the hf engine)."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from conftest import DATA
from distill.config import EvalBenchmarkRef, HFEngineConfig, PromptConfig, SamplingConfig
from distill.curate.benchmarks import BenchmarkError
from distill.curate.verify import VerifyConfig
from distill.evaluate import (
    EvalRun, ModelSpec, QuestionScore, evaluate, load_eval_set, maj_at_k, model_fingerprint, pass_at_k,
    resolve_benchmark, score_questions,
)
from distill.fsio import sha256_file
from distill.teachers.base import Completion, Result

BENCH = DATA / "benchmarks"


# --------------------------------------------------------------------------- brute force


def brute_pass(correct: list[bool], k: int) -> Fraction:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return Fraction(sum(any(correct[i] for i in s) for s in subsets), len(subsets))


def brute_maj(votes: list[tuple[str | None, bool]], k: int) -> Fraction:
    """The definition, literally: every k-subset, its vote counts, ties split evenly."""
    subsets = list(itertools.combinations(range(len(votes)), k))
    total = Fraction(0)
    for s in subsets:
        counts = Counter(votes[i] for i in s if votes[i][0] is not None)
        if not counts:
            continue
        top = max(counts.values())
        winners = [v for v, c in counts.items() if c == top]
        total += Fraction(sum(ok for _, ok in winners), len(winners))
    return total / len(subsets)


def test_pass_at_k_equals_enumeration_of_every_subset():
    rng = random.Random(0)
    checked = 0
    for n in range(1, 11):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            rng.shuffle(correct)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass(correct, k)), abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 11))


def test_pass_at_k_is_stable_where_the_binomials_overflow_a_float():
    # C(400, 200) ~ 1e119 is representable, but C(2000, 1000) is not; the product form never forms it.
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))
    exact = 1 - Fraction(math.comb(2000 - 3, 1000), math.comb(2000, 1000))
    assert pass_at_k(2000, 3, 1000) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(2000, 0, 1000) == 0.0 and pass_at_k(2000, 1001, 1000) == 1.0
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_maj_at_k_equals_enumeration_of_every_subset():
    rng = random.Random(1)
    cases = 0
    for _ in range(150):
        n = rng.randint(1, 9)
        n_keys = rng.randint(1, 4)
        votes = []
        for _ in range(n):
            if rng.random() < 0.2:
                votes.append((None, False))  # no answer: abstains
            else:
                key = f"a{rng.randrange(n_keys)}"
                # Key a0 is the right answer; once in a while the verifier disagrees within a key.
                votes.append((key, key == "a0" if rng.random() > 0.1 else key != "a0"))
        for k in range(1, n + 1):
            assert maj_at_k(votes, k) == pytest.approx(float(brute_maj(votes, k)), abs=1e-12), (votes, k)
            cases += 1
    assert cases > 500


def test_maj_at_k_small_cases_by_hand():
    v = [("1", True), ("1", True), ("2", False), ("2", False), ("3", False)]
    # All five: 1 and 2 tie at two votes each -> half credit.
    assert maj_at_k(v, 5) == pytest.approx(0.5)
    # One sample: correct exactly when that sample is.
    assert maj_at_k(v, 1) == pytest.approx(2 / 5)
    assert maj_at_k([(None, False)] * 3, 2) == 0.0
    # A correct answer outvoted by a single wrong one when both others abstain.
    assert maj_at_k([("7", True), ("8", False), ("8", False)], 3) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(v, 6)


def test_maj_at_k_is_fast_for_64_samples():
    import time

    rng = random.Random(2)
    votes = [(k, k == "0") for k in (str(rng.randrange(12)) for _ in range(64))]
    t = time.perf_counter()
    value = maj_at_k(votes, 32)
    assert time.perf_counter() - t < 5.0
    # 32 of 64 samples: the majority is the population's majority most of the time.
    top = Counter(k for k, _ in votes).most_common(1)[0][0]
    assert (value > 0.5) == (top == "0")


def test_score_questions_averages_per_question_estimates():
    qs = [QuestionScore(greedy=True, votes=[("1", True), ("2", False), ("1", True)]),
          QuestionScore(greedy=False, votes=[("5", False), (None, False), ("6", True)])]
    s = score_questions(qs, [1, 3])
    assert s["n_questions"] == 2 and s["greedy_acc"] == 0.5 and s["samples"] == 3
    assert s["pass@k"]["1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert s["pass@k"]["3"] == pytest.approx(1.0)
    assert s["maj@k"]["3"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="same number of samples"):
        score_questions([QuestionScore(votes=[("1", True)]), QuestionScore(votes=[])], [1])


# --------------------------------------------------------------------------- benchmarks


def test_benchmark_names_resolve_to_local_copies_paths_and_hub_ids(tmp_path):
    ref = resolve_benchmark("gsm8k", BENCH)
    assert ref.name == "gsm8k" and ref.path == str(BENCH / "gsm8k.jsonl")
    assert resolve_benchmark("math500").path == "HuggingFaceH4/MATH-500"  # no local dir: the Hub copy
    hub = resolve_benchmark("gsm8k")
    assert (hub.path, hub.hub_config, hub.answer_extract) == ("openai/gsm8k", "main", "gsm8k")
    assert resolve_benchmark(str(BENCH / "aime24.jsonl")).name == "aime24"
    named = resolve_benchmark(f"mine={BENCH / 'amc23.jsonl'}")
    assert (named.name, named.path) == ("mine", str(BENCH / "amc23.jsonl"))
    assert resolve_benchmark("someone/some-bench").name == "some-bench"


def test_load_eval_set_reads_problems_answers_and_hashes_of_the_shared_copy():
    s = load_eval_set(resolve_benchmark("math500", BENCH), limit=5)
    rows = [json.loads(line) for line in (BENCH / "math500.jsonl").read_text().splitlines()[:5]]
    assert [i[0] for i in s.items] == [r["id"] for r in rows]
    assert [i[1:] for i in s.items] == [(r["problem"], r["answer"]) for r in rows]
    assert s.total == 500 and s.sha256 == sha256_file(BENCH / "math500.jsonl")


def test_load_eval_set_extracts_gsm8k_style_answers_and_names_a_missing_answer(tmp_path):
    f = tmp_path / "hub_style.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "one and one\n#### 2"}) + "\n")
    ref = EvalBenchmarkRef(name="g", path=str(f), column="question", id_column=None, answer_extract="gsm8k")
    assert load_eval_set(ref).items == [("g-0", "1+1?", "2")]
    f.write_text(json.dumps({"question": "1+1?", "answer": "no marker"}) + "\n")
    with pytest.raises(BenchmarkError, match="no answer"):
        load_eval_set(ref)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_eval_set(EvalBenchmarkRef(name="x", path=str(tmp_path / "nope.jsonl")))


def test_model_fingerprint_changes_with_the_weights(tmp_path):
    assert model_fingerprint("smollm2-135m-instruct") is None
    (tmp_path / "model.safetensors").write_bytes(b"a")
    (tmp_path / "config.json").write_text("{}")
    first = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"b")
    assert model_fingerprint(tmp_path) != first


# --------------------------------------------------------------------------- evaluate


class ScriptedEngine:
    """A TeacherEngine whose answers are fixed per prompt: greedy answers the reference for the
    first question only; the s-th sample of a question answers the reference when s is even, else 999."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.seen: Counter = Counter()
        self.calls = []

    def generate(self, requests, params):
        self.calls.append((len(requests), params.temperature))
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            problem, ref = next((p, a) for p, a in self.answers.items() if p in text)
            if params.temperature == 0:
                ans = ref if problem == next(iter(self.answers)) else "999"
            else:
                ans = ref if self.seen[problem] % 2 == 0 else "999"
                self.seen[problem] += 1
            out.append(Result([Completion(f"Some steps.\nThe answer is $\\boxed{{{ans}}}$.", "stop", 10, 12)]))
        return out

    def stats(self):
        return {}

    def close(self):
        pass


def test_evaluate_scores_known_answers_exactly(tmp_path):
    s = load_eval_set(resolve_benchmark("gsm8k", BENCH), limit=3)
    engine = ScriptedEngine({p: a for _, p, a in s.items})
    run = EvalRun(prompt=PromptConfig(), sampling=SamplingConfig(temperature=0.7, max_new_tokens=32),
                  greedy=True, samples=4, ks=[1, 2, 4], verify=VerifyConfig(workers=1))
    result, records = evaluate(ModelSpec("hf", HFEngineConfig()), [s], run, engine=engine,
                               log=lambda m: None)
    b = result["benchmarks"]["gsm8k"]
    assert b["n_questions"] == 3 and b["greedy_acc"] == pytest.approx(1 / 3)
    # Two of four samples right per question: pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6.
    assert b["pass@k"] == pytest.approx({"1": 0.5, "2": 5 / 6, "4": 1.0})
    # maj@4: 2 right vs 2 x "999" -> tie, half credit; maj@2 = P(both right) + P(one each)/2.
    assert b["maj@k"]["4"] == pytest.approx(0.5) and b["maj@k"]["2"] == pytest.approx(1 / 6 + (4 / 6) / 2)
    assert b["sha256"] == sha256_file(BENCH / "gsm8k.jsonl") and b["no_answer_rate"] == 0
    assert len(records) == 3 * 5 and Counter(r["mode"] for r in records) == {"greedy": 3, "sample": 12}
    assert all(r["verdict"] in ("equal", "not_equal") and r["correct"] == (r["pred_answer"] == r["answer"])
               for r in records)
    assert engine.calls == [(3, 0.0), (12, 0.7)]


def test_evaluate_with_the_real_hf_engine_on_two_questions(tmp_path):
    """SmolLM2-135M through the registry: the numbers must be the records' own aggregates."""
    s = load_eval_set(resolve_benchmark("gsm8k", BENCH), limit=2)
    run = EvalRun(prompt=PromptConfig(template="{problem}\nPut the final answer in \\boxed{}."),
                  sampling=SamplingConfig(temperature=0.8, max_new_tokens=24, seed=3), greedy=True, samples=2,
                  ks=[1, 2], verify=VerifyConfig(workers=1))
    result, records = evaluate(ModelSpec("hf", HFEngineConfig(model="smollm2-135m-instruct")), [s], run,
                               log=lambda m: None)
    b = result["benchmarks"]["gsm8k"]
    assert result["model"] == "smollm2-135m-instruct" and result["engine"] == "hf"
    assert len(records) == 2 * 3 and all(r["completion"] for r in records)
    assert all(r["n_tokens"] <= 24 for r in records)
    greedy = [r for r in records if r["mode"] == "greedy"]
    assert b["greedy_acc"] == pytest.approx(sum(r["correct"] for r in greedy) / 2)
    per_q = Counter(r["id"] for r in records if r["mode"] == "sample" and r["correct"])
    assert b["pass@k"]["1"] == pytest.approx(sum(per_q.values()) / 4)
    assert b["truncated_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in records) / 6)


def test_maj_at_k_votes_symbolically_equal_answers_together():
    """Samples `\\sqrt{4}`, `2`, `3` of a question whose answer is 2: the majority is 2 (two votes
    to one), so maj@3 is 1; by canonical form alone three answers tie and maj@3 would be 2/3."""
    from distill.curate.verify import Verifier
    from distill.evaluate import EvalSet, score_set

    s = EvalSet(name="t", items=[("q", "What is 1+1?", "2")], files={}, total=1)
    records = [
        {"benchmark": "t", "id": "q", "mode": "sample", "sample_idx": i, "answer": "2",
         "completion": f"\\boxed{{{a}}}", "reasoning": None, "response": f"\\boxed{{{a}}}",
         "finish_reason": "stop", "n_tokens": 5, "rejected": None}
        for i, a in enumerate(["\\sqrt{4}", "2", "3"])
    ]

    def scores(max_distinct):
        run = EvalRun(prompt=PromptConfig(), sampling=SamplingConfig(), greedy=False, samples=3, ks=[1, 3],
                      verify=VerifyConfig(workers=1, vote_max_distinct=max_distinct))
        with Verifier(run.verify) as v:
            return score_set(s, [dict(r) for r in records], run, v)

    merged = scores(8)
    assert merged["maj@k"] == pytest.approx({"1": 2 / 3, "3": 1.0})
    assert brute_maj([("2", True), ("2", True), ("3", False)], 3) == 1
    assert scores(0)["maj@k"]["3"] == pytest.approx(2 / 3)
