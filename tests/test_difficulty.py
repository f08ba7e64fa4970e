"""Stage `difficulty`: pass@k, the pseudo-label, the unanimity rule and the band, then a real run.

The pure parts are checked against brute force (pass@k over all subsets) and hand-made samples.
The real run asks the fault server, whose answer to a prompt is a number fixed by (prompt, seed):
the test computes each question's samples itself (`respond`, the seeds the stage derives), so it
knows which samples are correct, when the unanimity rule must stop, and what the band decides;
the server's counters say which samples were asked, each exactly once.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from xml.etree import ElementTree

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import DATA, distill_cmd, kill_group_when
from distill.curate.difficulty import DifficultyConfig, Outcome, assess_questions, coverage_curve, decide, pass_at_k
from distill.curate.verify import Verifier, VerifyConfig, majority_vote

# Stages run in this process connect an embedded Ray; each test leaves none behind.
pytestmark = pytest.mark.usefixtures("ray_shutdown_after")


def test_pass_at_k_equals_brute_force_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)
    # Large n: no overflow, and the known closed form for c = 1 (k / n).
    assert pass_at_k(10_000, 1, 100) == pytest.approx(100 / 10_000)
    assert pass_at_k(4, 0, 8) == 0.0 and pass_at_k(4, 4, 8) == 1.0  # an early stop counts at every k
    assert coverage_curve([(4, 1), (4, 0)], 2) == [pytest.approx(0.125), pytest.approx(0.25)]


def _texts(answers):
    return [(None, "context_length_exceeded") if a == "FAIL" else
            (f"<think>work</think> The answer is \\boxed{{{a}}}." if a is not None else "<think>cut off", None)
            for a in answers]


def _assess(questions, answers, **cfg):
    """assess_questions with a solver that answers `answers[id][j]` and records what it was asked."""
    asked = Counter()

    def solve(tasks):
        out = []
        for q, j in tasks:
            asked[(q["id"], j)] += 1
            out += _texts([answers[q["id"]][j]])
        return out

    with Verifier(VerifyConfig()) as verifier:
        kept, rejected, stats = assess_questions(questions, DifficultyConfig(**cfg), solve, verifier, VerifyConfig())
    return kept, rejected, stats, asked


def test_unanimity_rule_band_and_pseudo_label():
    qs = [{"id": "easy", "problem": "p", "answer": "7"}, {"id": "hard", "problem": "p", "answer": "7"},
          {"id": "mixed", "problem": "p", "answer": "7"}, {"id": "late", "problem": "p", "answer": "7"},
          {"id": "vote", "problem": "p", "answer": None}, {"id": "cut", "problem": "p", "answer": "7"},
          {"id": "down", "problem": "p", "answer": "7"}]
    answers = {"easy": ["7"] * 8, "hard": ["1"] * 8, "mixed": ["7", "1", "7", "2", "7", "7", "1", "7"],
               "late": ["1", "2", "3", "4", "7", "7", "7", "7"],  # the rule's cost: stopped as unsolved
               "vote": ["\\frac{1}{2}", "0.5", "3", "1/2", "0.5", "2", "0.5", "0.5"], "cut": [None] * 8,
               "down": ["FAIL"] * 8}
    kept, rejected, stats, asked = _assess(qs, answers, band=(0.1, 0.9))
    why = {r["id"]: r["reason"] for r in rejected}
    assert [r["id"] for r in kept] == ["mixed", "vote"]
    assert why["easy"] == "too_easy: pass rate 1.00 over 4 samples (band [0.10, 0.90])"
    assert why["hard"].startswith("too_hard: pass rate 0.00 over 4 samples")
    assert why["late"].startswith("too_hard: pass rate 0.00 over 4 samples")
    assert why["cut"] == "no_answer: no sample had an extractable answer (4 samples)"
    assert why["down"].startswith("solver_failed: all 4 solver requests failed (context_length_exceeded)")
    mixed, vote = kept
    assert (mixed["solver_samples"], mixed["solver_correct"], mixed["solver_pass_rate"]) == (8, 5, 0.625)
    assert (mixed["solver_label"], mixed["solver_agreement"]) == ("7", 0.625)
    # Without a reference the label is the majority of answers the verifier groups (1/2 = 0.5).
    assert vote["solver_label"] == "0.5" and vote["solver_agreement"] == 0.75 and vote["solver_correct"] == 6
    # Only the undecided questions got samples 4..7, each sample asked once.
    assert set(asked.values()) == {1}
    assert {q for (q, j) in asked if j >= 4} == {"mixed", "vote"}
    assert stats == {"solver_requests": 7 * 4 + 2 * 4, "stopped_early": 5}
    # min_samples = samples: no adaptive stop, every question sampled 8 times.
    _, _, stats, asked = _assess(qs, answers, min_samples=8)
    assert len(asked) == 7 * 8 and stats["stopped_early"] == 0


def test_decide_keeps_the_band_inclusive_and_names_low_agreement():
    cfg = DifficultyConfig(band=(0.25, 0.75))
    o = dict(samples=8, answered=8, failed=0, label="3", agreement=0.25, has_reference=False)
    assert decide(Outcome(correct=2, **o), cfg, 0.5) is None and decide(Outcome(correct=6, **o), cfg, 0.5) is None
    assert decide(Outcome(correct=7, **o), cfg, 0.5).startswith("too_easy: pass rate 0.88")
    assert decide(Outcome(correct=0, **o), cfg, 0.5).endswith("no reference and majority agreement 0.25 below 0.50")
    assert decide(Outcome(correct=0, **o), DifficultyConfig(), 0.5) is None  # the default band keeps everything
    with pytest.raises(ValueError, match="band"):
        DifficultyConfig(band=(0.6, 0.4))
    with pytest.raises(ValueError, match="min_samples"):
        DifficultyConfig(samples=4, min_samples=5)


def test_solver_engine_settings_are_checked_before_the_run():
    from distill.config import ConfigError, build_config
    from distill.stages import get_stage
    from distill.stages.difficulty import solver_engine

    base = {"run": {"dir": "/tmp/unused", "stages": ["validate", "difficulty", "generate"]}, "source": {"path": "x"},
            "generate": {"engine": "openai", "openai": {"base_url": "http://127.0.0.1:1/v1", "model": "big"}}}
    cfg = build_config({**base, "questions": {"difficulty": {"engine_settings": {"model": "small", "concurrency": 3}}}})
    name, section = solver_engine(cfg)
    assert (name, section.model, section.base_url, section.concurrency) == ("openai", "small", "http://127.0.0.1:1/v1", 3)
    assert get_stage("difficulty").input_name(cfg) == "validate" and get_stage("generate").input_name(cfg) == "difficulty"
    for settings, message in (({"modle": "x"}, "engine_settings.modle: not a setting"),
                              ({"concurrency": 0}, "engine_settings.concurrency: Input should be greater than or equal to 1")):
        bad = build_config({**base, "questions": {"difficulty": {"engine_settings": settings}}})
        with pytest.raises(ConfigError, match=message):
            get_stage("difficulty").preflight(bad)
    bad = build_config({**base, "questions": {"difficulty": {"engine": "vllm"}}})
    with pytest.raises(ConfigError, match="engine_settings.model is required"):
        solver_engine(bad)


# --------------------------------------------------------------------------- a real run

SEED, N, M, MAX_TOKENS, MIN_AGREEMENT = 3, 8, 4, 40, 0.2
BAND = (0.1, 0.2)


def _answers(qid: str, problem: str) -> list[str | None]:
    """What the fault server answers to the stage's 8 samples of a question (None: cut off)."""
    from distill.teachers.base import derive_seed
    from distill.testing.fault_server import respond

    out = []
    for j in range(N):
        text, finish, _ = respond(problem, derive_seed(SEED, "difficulty", qid, j), MAX_TOKENS)
        m = re.search(r"\\boxed\{(\d+)\}", text)
        out.append(m.group(1) if finish == "stop" and m else None)
    return out


def _expected(ref: str | None, answers: list[str | None]) -> tuple[str | None, int, int]:
    """(rejection code or None, samples asked, correct), by hand: the unanimity rule after M
    samples, then the band."""
    def correct(sample):
        if ref is not None:
            return sum(a == ref for a in sample)
        label, agreement = majority_vote(sample)
        return sum(a == label for a in sample) if label is not None and agreement >= MIN_AGREEMENT else 0

    s = answers[:M]
    if 0 < correct(s) < M:
        s = answers
    c = correct(s)
    if all(a is None for a in s):
        return "no_answer", len(s), c
    return ("too_hard" if c / len(s) < BAND[0] else "too_easy" if c / len(s) > BAND[1] else None), len(s), c


def _questions() -> list[dict]:
    """Short problems (the server's answer fits in MAX_TOKENS words, mostly) with references
    chosen from the server's answers, so every decision occurs; long GSM8K ones are always cut."""
    qs, colliding = [], []
    for v in itertools.count():
        qid, problem = f"q{v}", f"What is {v} plus one? Show the steps."
        a = _answers(qid, problem)
        pair = [x for x, n in Counter(x for x in a if x).items() if n >= 2 and x in a[:M]]
        if pair and len(colliding) < 3:
            colliding.append((qid, problem, pair[0]))
        elif v < 14:
            # Answer of sample 0 (one correct in the first round: sampled to the end), of sample 5
            # (none in the first round: stopped as unsolved), no reference (vote), a wrong one.
            ref = {0: a[0], 1: a[5], 2: None}.get(v % 4, "-1") if (a[0] and a[5]) else "-1"
            qs.append({"id": qid, "problem": problem, "answer": ref})
        if len(colliding) == 3 and v >= 14:
            break
    # Two samples give the same answer: as reference or as majority, pass rate 2/8 > 0.2.
    qs += [{"id": i, "problem": p, "answer": ref if k else None} for k, (i, p, ref) in enumerate(colliding)]
    with open(DATA / "train" / "gsm8k_train.jsonl") as f:
        qs += [{k: r[k] for k in ("id", "problem", "answer")} for r in map(json.loads, itertools.islice(f, 3))]
    return qs


def _read(root):
    return [x for f in sorted(root.glob("part-*.parquet")) for x in pq.read_table(f).to_pylist()]


def _config(run, base_url, **difficulty) -> dict:
    return {
        "run": {"dir": str(run), "stages": ["validate", "difficulty", "generate"], "progress": False},
        "ray": {"num_cpus": 2}, "source": {"path": str(run.parent / "seeds.jsonl")},
        "curate": {"workers": 1, "shard_size": 4, "verify": {"min_agreement": MIN_AGREEMENT}},
        "questions": {"difficulty": {"samples": N, "min_samples": M, "band": list(BAND), "seed": SEED,
                                     "max_new_tokens": MAX_TOKENS, **difficulty}},
        "generate": {"engine": "openai", "n_samples": 1, "shard_size": 16, "cpus_per_replica": 0.5,
                     "sampling": {"temperature": 0.0, "max_new_tokens": MAX_TOKENS, "seed": 1},
                     "openai": {"base_url": base_url, "model": "solver"}}}


@pytest.mark.slow
def test_difficulty_killed_and_resumed_decides_as_computed_and_stops_early(tmp_path):
    """A `distill run` killed with SIGKILL to its process group once difficulty has committed some
    partitions, then resumed: every question decided exactly once, as computed from the server's
    answers; committed partitions never asked again; decided questions asked M samples, not N;
    generate answers the kept questions."""
    from distill.config import build_config
    from distill.pipeline import run_pipeline
    from distill.report import build_report, format_table, render_html
    from distill.stages import get_stage
    from distill.stages.derived import open_partitioned
    from distill.stages.difficulty import solver_inputs
    from distill.teachers.base import derive_seed
    from distill.testing.fault_server import FaultServer

    qs = _questions()
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    run = tmp_path / "run"
    parts = run / "difficulty"
    # Slow answers (0.3 s each) so that the kill lands while difficulty's partitions are in flight.
    with FaultServer(latency_s=0.3) as server:
        cfg_file = tmp_path / "run.yaml"
        cfg_file.write_text(yaml.safe_dump(_config(run, server.base_url)))
        kill_group_when(distill_cmd("run", str(cfg_file)), lambda: bool(list(parts.glob("part-*.parquet"))),
                        "difficulty")
        committed = {p.name for p in parts.glob("part-*.parquet")}
        n_parts = json.loads((parts / "_manifest.json").read_text())["partitions"]
        assert 1 <= len(committed) < n_parts, "the kill must land mid-stage"
        before_resume = Counter(server.completions)
        cfg = build_config(_config(run, server.base_url))
        run_pipeline(cfg)

    expected = {q["id"]: _expected(q["answer"], _answers(q["id"], q["problem"])) for q in qs}
    codes = Counter(code for code, _, _ in expected.values())
    assert {None, "too_hard", "too_easy", "no_answer"} <= set(codes), codes  # every decision occurs
    kept, rejected = _read(parts), _read(parts / "rejected")
    got = Counter(r["id"] for r in kept + rejected)
    assert sorted(got) == sorted(expected) and set(got.values()) == {1}  # each question exactly once
    got = {r["id"]: (None, r["solver_samples"], r["solver_correct"]) for r in kept}
    got |= {r["id"]: (r["reason"].split(":")[0], r["solver_samples"], r["solver_correct"]) for r in rejected}
    assert got == expected
    # The samples asked are exactly those the unanimity rule calls for: decided questions M, not N.
    key = lambda q, j: (q["problem"], derive_seed(SEED, "difficulty", q["id"], j))  # noqa: E731
    asked = {key(q, j) for q in qs for j in range(expected[q["id"]][1])}
    solver = {k for k in server.completions if k in {key(q, j) for q in qs for j in range(N)}}
    assert solver == asked and len(asked) < N * len(qs)
    # generate answered the kept questions only (one sample each), not the rejected ones.
    assert sorted(r["id"] for r in _read(run / "generate")) == sorted(r["id"] for r in kept)
    assert len(set(server.completions) - solver) == len(kept)
    assert any(n == M for _, n, _ in expected.values()) and any(n == N for _, n, _ in expected.values())
    # A committed partition's questions were not asked again by the resumed run.
    done = {r["id"] for name in committed for f in (parts / name, parts / "rejected" / name) if f.exists()
            for r in pq.read_table(f).to_pylist()}
    assert done and all(server.completions[key(q, j)] == before_resume[key(q, j)] == 1
                        for q in qs if q["id"] in done for j in range(expected[q["id"]][1]))
    vote = next(r for r in kept + rejected if r["answer"] is None and r["solver_correct"] == 2)
    answered = [a for a in _answers(vote["id"], vote["problem"]) if a is not None]
    assert vote["solver_label"] is not None and vote["solver_agreement"] == pytest.approx(2 / len(answered))

    # The report: a pass-rate histogram and the coverage curve over every question.
    report = build_report(run)
    d = report["difficulty"]
    assert d["questions"] == len(qs) and sum(d["pass_rate_histogram"]["counts"]) == len(qs)
    curve = d["coverage"]
    assert len(curve) == N and curve == sorted(curve) and curve[0] == pytest.approx(
        sum(c / n for _, n, c in expected.values()) / len(qs))
    assert "difficulty:" in format_table(report)
    page = render_html(report)
    assert '<a href="#sec-difficulty">' in page
    for plot in ("plot-difficulty", "plot-coverage"):  # well-formed SVG that draws something
        svg = ElementTree.fromstring(re.search(f'<svg id="{plot}".*?</svg>', page, re.S).group(0))
        assert svg.findall(".//{http://www.w3.org/2000/svg}polyline") or \
            svg.findall(".//{http://www.w3.org/2000/svg}rect"), plot

    # A new solver concurrency keeps everything; a new band recomputes difficulty, never validate.
    stage, validated = get_stage("difficulty"), sorted((run / "validate").glob("part-*.parquet"))
    stamp = [p.stat().st_mtime_ns for p in validated]
    same = build_config(_config(run, "http://127.0.0.1:1/v1", engine_settings={"concurrency": 3}))
    _, units = open_partitioned(run, stage, same, solver_inputs(same))
    assert units == [] and {p.name for p in parts.glob("part-*.parquet")} == {f"part-{i:05d}.parquet" for i in range(n_parts)}
    for changed in ({"band": [0.0, 1.0]}, {"engine_settings": {"model": "other"}}):
        new = build_config(_config(run, server.base_url, **changed))
        _, units = open_partitioned(run, stage, new, solver_inputs(new))
        assert len(units) == n_parts, changed
    assert [p.stat().st_mtime_ns for p in validated] == stamp
