"""Evaluation: greedy accuracy, pass@k and maj@k of a model on benchmarks, with curation's verifier.

A model's completions go through the same `extract_answer` and `Verifier` as curated samples
(`curate.verify` settings), so "correct" means the same thing for a teacher sample kept in the SFT
set and for an evaluated answer.

Definitions (per question, then averaged over the questions of a benchmark):

- greedy_acc: one greedy completion (temperature 0) is correct.
- pass@k: the unbiased estimator of Chen et al. (2021) from n >= k samples of which c are correct,
  1 - C(n-c, k) / C(n, k): the probability that at least one of k samples drawn without
  replacement from the n is correct.
- maj@k: the probability that the majority answer of k samples drawn without replacement from the
  n is correct, computed exactly over all C(n, k) subsets (not by resampling). Votes are the
  samples' final answers under `vote_keys`, the grouping curation's majority vote uses (`0.5`,
  `1/2` and `50%` are one answer by their canonical form; `\\sqrt{4}` and `2` become one when the
  verifier finds them equal, for questions with at most `verify.vote_max_distinct` distinct
  answers); samples without an answer do not vote. A
  subset in which t answers share the top count, one of them correct, scores 1/t (the expectation
  of a uniformly random tie-break, so the result does not depend on sample order); a subset
  without any answer scores 0. A vote key whose samples the verifier judged differently
  (possible only for symbolic checks) votes as two answers, one correct and one not.

A prompt the engine rejects (too long for the context) counts as a wrong answer: the questions a
model cannot take stay in the denominator.

Pure functions (`pass_at_k`, `maj_at_k`, `score_questions`) need neither a model nor Ray;
`evaluate` generates with an engine from the registry (`distill.teachers.ENGINES`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from distill.config import EvalBenchmarkRef, PromptConfig, SamplingConfig, output_fields
from distill.curate.answers import ANSWER_EXTRACTORS, extract_answer
from distill.curate.benchmarks import BenchmarkError, load_benchmark
from distill.curate.verify import VerifyConfig, vote_keys
from distill.fsio import atomic_write_json, atomic_write_text, fingerprint, sha256_file
from distill.section import Section

# --------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): at least one of k samples (drawn without replacement from n, of
    which c are correct) is correct. Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms
    the binomials (C(200, 100) overflows a float)."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


Vote = tuple[str | None, bool]
"""One sample's (vote key, correct); key None: the sample has no answer and does not vote."""


def _group_counts(votes: Sequence[Vote]) -> tuple[list[tuple[int, bool]], int]:
    """[(count, correct)] per (key, correct) group, and the number of samples that do not vote."""
    groups = Counter((key, bool(ok)) for key, ok in votes if key is not None)
    abstain = sum(1 for key, _ in votes if key is None)
    return [(m, ok) for (_, ok), m in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))], abstain


def maj_at_k(votes: Sequence[Vote], k: int) -> float:
    """Expected correctness of the majority answer of a uniformly random k-subset of `votes` (see
    the module docstring for ties and abstentions). Exact, by counting subsets per group size
    rather than enumerating them: O(groups^2 * k^2 * largest group) integer operations."""
    n = len(votes)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs 1 <= k <= len(votes); got k={k}, {n} votes")
    groups, abstain = _group_counts(votes)
    total = Fraction(0)
    for j, (m_j, ok) in enumerate(groups):
        if not ok:
            continue
        others = [m for i, (m, _) in enumerate(groups) if i != j]
        for t in range(1, min(m_j, k) + 1):
            # ways[s][r]: subsets of size s of the other groups and the abstainers in which every
            # other group has at most t members and exactly r groups have t (tie with group j).
            ways = [[0] * (len(others) + 1) for _ in range(k - t + 1)]
            for s in range(min(abstain, k - t) + 1):
                ways[s][0] = math.comb(abstain, s)
            for m in others:
                nxt = [[0] * (len(others) + 1) for _ in range(k - t + 1)]
                for s in range(k - t + 1):
                    for r, w in enumerate(ways[s]):
                        if w == 0:
                            continue
                        for x in range(min(m, t, k - t - s) + 1):
                            nxt[s + x][r + (x == t)] += w * math.comb(m, x)
                ways = nxt
            pick_j = math.comb(m_j, t)
            total += sum(Fraction(pick_j * w, r + 1) for r, w in enumerate(ways[k - t]) if w)
    return float(total / math.comb(n, k))


def greedy_accuracy(correct: Sequence[bool]) -> float | None:
    """Share of questions whose greedy completion is correct (None for no questions)."""
    return sum(map(bool, correct)) / len(correct) if correct else None


@dataclass
class QuestionScore:
    """What one question contributes to its benchmark's scores."""

    greedy: bool | None = None
    votes: list[Vote] = field(default_factory=list)


def score_questions(questions: Sequence[QuestionScore], ks: Sequence[int]) -> dict:
    """Benchmark-level scores: means over questions of greedy correctness, pass@k and maj@k (each
    question must have the same number of samples, >= max(ks))."""
    out: dict[str, Any] = {"n_questions": len(questions)}
    greedy = [q.greedy for q in questions if q.greedy is not None]
    out["greedy_acc"] = greedy_accuracy(greedy) if greedy else None
    ns = {len(q.votes) for q in questions}
    if ks and questions:
        if len(ns) != 1 or max(ks) > min(ns):
            raise ValueError(f"every question needs the same number of samples >= k={max(ks)}; got {sorted(ns)}")
        n = ns.pop()
        out["samples"] = n
        out["pass@k"] = {str(k): sum(pass_at_k(n, sum(ok for _, ok in q.votes), k) for q in questions)
                         / len(questions) for k in ks}
        out["maj@k"] = {str(k): sum(maj_at_k(q.votes, k) for q in questions) / len(questions) for k in ks}
    else:
        out["samples"], out["pass@k"], out["maj@k"] = 0, {}, {}
    return out


# --------------------------------------------------------------------------- benchmarks

KNOWN_BENCHMARKS: dict[str, dict] = {
    "gsm8k": {"path": "openai/gsm8k", "hub_config": "main", "column": "question", "id_column": None,
              "answer_column": "answer", "answer_extract": "gsm8k"},
    "math500": {"path": "HuggingFaceH4/MATH-500", "column": "problem", "id_column": "unique_id",
                "answer_column": "answer"},
}
"""Short names `distill eval --benchmarks` maps to their Hub datasets when no local copy is given."""


def resolve_benchmark(spec: str, benchmark_dir: str | Path | None = None) -> EvalBenchmarkRef:
    """A `--benchmarks` item as a benchmark reference: `NAME=PATH`, a local file or directory (named
    by its stem), a name with a `NAME.jsonl` / `NAME.parquet` in `benchmark_dir`, a name in
    `KNOWN_BENCHMARKS` (its Hub dataset), or any other Hub id (named by its last part)."""
    spec = spec.strip()
    name, sep, path = spec.partition("=")
    if sep:
        return EvalBenchmarkRef(name=name.strip(), path=path.strip())
    local = Path(spec).expanduser()
    if local.exists():
        return EvalBenchmarkRef(name=local.stem if local.is_file() else local.name, path=spec)
    if benchmark_dir is not None:
        for suffix in (".jsonl", ".parquet", ".json"):
            candidate = Path(benchmark_dir).expanduser() / f"{spec}{suffix}"
            if candidate.is_file():
                return EvalBenchmarkRef(name=spec, path=str(candidate))
    if spec in KNOWN_BENCHMARKS:
        return EvalBenchmarkRef(name=spec, **KNOWN_BENCHMARKS[spec])
    return EvalBenchmarkRef(name=spec.rstrip("/").split("/")[-1], path=spec)


@dataclass
class EvalSet:
    """A loaded benchmark: (id, problem, reference answer) per question, and the copy it came from."""

    name: str
    items: list[tuple[str, str, str]]
    files: dict[str, str]  # file -> sha256
    total: int  # questions in the benchmark before `limit`

    @property
    def sha256(self) -> str:
        """The file's sha256, or for several files the sha256 of their sorted `file sha` lines."""
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        return hashlib.sha256("".join(f"{f} {h}\n" for f, h in sorted(self.files.items())).encode()).hexdigest()


def load_eval_set(ref: EvalBenchmarkRef, limit: int | None = None) -> EvalSet:
    """Problems and answers of one benchmark, read like decontamination's benchmarks (same files,
    same ids, same hashes); raises `BenchmarkError` when it cannot be used."""
    problems = load_benchmark(ref)
    # The answer column through the same reader: same files in the same order, so ids line up.
    answers = load_benchmark(ref.model_copy(update={"column": ref.answer_column}))
    extract = ANSWER_EXTRACTORS[ref.answer_extract]
    items = []
    for (qid, problem), (aid, raw) in zip(problems.items, answers.items):
        if qid != aid:
            raise BenchmarkError(f"benchmark {ref.name!r}: problem and answer rows disagree ({qid!r} vs {aid!r})")
        answer = extract(raw)
        if answer is None:
            raise BenchmarkError(f"benchmark {ref.name!r}: item {qid!r} has no answer in column "
                                 f"{ref.answer_column!r} under answer_extract={ref.answer_extract!r}")
        items.append((qid, problem, answer))
    total = len(items)
    return EvalSet(ref.name, items[:limit] if limit else items, dict(problems.sha256), total)


# --------------------------------------------------------------------------- generation + scoring


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: an engine name from the registry and that engine's config section."""

    engine: str
    config: Section

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.config.model}"

    def settings(self) -> dict:
        return {"engine": self.engine, "model": output_fields(self.config)}


@dataclass
class EvalRun:
    """What to generate per question: a greedy completion, `samples` sampled ones, scored at `ks`."""

    prompt: PromptConfig
    sampling: SamplingConfig
    greedy: bool = True
    samples: int = 0
    ks: list[int] = field(default_factory=list)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def settings(self) -> dict:
        return {"prompt": output_fields(self.prompt), "sampling": output_fields(self.sampling),
                "greedy": self.greedy, "samples": self.samples, "k": list(self.ks),
                "verify": output_fields(self.verify)}


def _requests(sets: Sequence[EvalSet], run: EvalRun, mode: str) -> tuple[list, list[tuple[int, int, int]]]:
    """Engine requests of one mode (`greedy` / `sample`) for every benchmark and, per request,
    (benchmark index, question index, sample index)."""
    from distill.generation import build_messages
    from distill.teachers.base import Request, derive_seed

    requests, where = [], []
    for bi, eval_set in enumerate(sets):
        for qi, (qid, problem, _) in enumerate(eval_set.items):
            messages = build_messages(problem, run.prompt)
            if mode == "greedy":
                requests.append(Request(messages, n=1, seed=None))
                where.append((bi, qi, 0))
                continue
            for s in range(run.samples):
                # One request per sample, each with its own seed (as teacher generation does).
                requests.append(Request(messages, n=1, seed=derive_seed(run.sampling.seed, eval_set.name, qid, s)))
                where.append((bi, qi, s))
    return requests, where


def _params(run: EvalRun, mode: str):
    from distill.teachers.base import SamplingParams

    s = run.sampling
    if mode == "greedy":
        return SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=s.max_new_tokens, seed=s.seed, stop=tuple(s.stop))
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed,
                          stop=tuple(s.stop))


def generate_all(engine, sets: Sequence[EvalSet], run: EvalRun, *, chunk: int = 256,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Every completion the run asks for, as records (benchmark, id, mode, sample_idx, answer,
    completion, reasoning, response, finish_reason, n_tokens, rejected).

    All benchmarks' requests of one mode go to the engine together, `chunk` at a time, so an
    engine that batches (hf, vllm) fills its batches across benchmarks; smaller chunks only show
    progress more often."""
    from distill.teachers.base import split_reasoning

    records: list[dict] = []
    started = time.monotonic()
    modes = (["greedy"] if run.greedy else []) + (["sample"] if run.samples else [])
    for mode in modes:
        requests, where = _requests(sets, run, mode)
        for lo in range(0, len(requests), chunk):
            part = requests[lo : lo + chunk]
            results = engine.generate(part, _params(run, mode))
            if len(results) != len(part):
                raise RuntimeError(f"engine returned {len(results)} results for {len(part)} requests")
            for (bi, qi, s), res in zip(where[lo : lo + chunk], results):
                qid, _, answer = sets[bi].items[qi]
                base = {"benchmark": sets[bi].name, "id": qid, "mode": mode, "sample_idx": s, "answer": answer}
                if not res.ok:
                    records.append({**base, "completion": None, "reasoning": None, "response": None,
                                    "finish_reason": "rejected", "n_tokens": 0, "rejected": res.rejected})
                    continue
                c = res.completions[0]
                reasoning, response = split_reasoning(c.text)
                records.append({**base, "completion": c.text, "reasoning": reasoning, "response": response,
                                "finish_reason": c.finish_reason, "n_tokens": c.completion_tokens, "rejected": None})
            log(f"eval: {mode} {min(lo + chunk, len(requests))}/{len(requests)} completions "
                f"({time.monotonic() - started:.0f}s)")
    return records


def score_set(eval_set: EvalSet, records: list[dict], run: EvalRun, verifier) -> dict:
    """Extract, verify and score one benchmark's completion records (updated in place with
    `pred_answer`, `verdict`, `correct`)."""
    from distill.curate.verify import verify_records

    # Verification groups by `id` for pass rates: one group per (question, mode), so greedy and
    # sampled completions never share a majority vote. Rejected prompts have no answer.
    keyed = [{**r, "id": f"{r['mode']}\x00{r['id']}", "response": r["response"] or ""} for r in records]
    for r, v in zip(records, verify_records(keyed, verifier, run.verify)):
        r.update(pred_answer=v["pred_answer"], verdict=v["verdict"] if r["rejected"] is None else "rejected",
                 correct=bool(v["correct"]) and r["rejected"] is None)
    per_q = [QuestionScore() for _ in eval_set.items]
    index = {qid: qi for qi, (qid, _, _) in enumerate(eval_set.items)}
    sampled: list[list[dict]] = [[] for _ in eval_set.items]
    for r in sorted(records, key=lambda r: (r["mode"], r["sample_idx"])):
        if r["mode"] == "greedy":
            per_q[index[r["id"]]].greedy = r["correct"]
        else:
            sampled[index[r["id"]]].append(r)
    # Vote keys: `canonical`, merged where the verifier finds two answers equal (`\sqrt{4}`, `2`).
    answers = [[r["pred_answer"] for r in rs] for rs in sampled]
    same = verifier.equal_answer_pairs(answers, run.verify.vote_max_distinct)
    for q, rs, ans, pairs in zip(per_q, sampled, answers, same):
        q.votes = [(key, r["correct"]) for r, key in zip(rs, vote_keys(ans, pairs))]
    scores = score_questions(per_q, [k for k in run.ks if k <= run.samples])
    done = [r for r in records if r["rejected"] is None]
    scores.update(
        no_answer_rate=sum(r["pred_answer"] is None for r in records) / len(records) if records else None,
        truncated_rate=sum(r["finish_reason"] == "length" for r in done) / len(done) if done else None,
        mean_tokens=sum(r["n_tokens"] for r in done) / len(done) if done else None,
        rejected=len(records) - len(done),
    )
    return scores


def evaluate(model: ModelSpec, sets: Sequence[EvalSet], run: EvalRun, *, engine=None,
             log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Scores of `model` on every benchmark in `sets`, and all completions with their verdicts.

    Builds the engine from the registry unless a built one is passed (it is then not closed).
    The result is the results-JSON object: {model, engine, settings, eval, benchmarks: {name:
    {n_questions, greedy_acc, pass@k: {k: v}, maj@k: {k: v}, sha256, files, ...}}, seconds}."""
    from distill.curate.verify import Verifier
    from distill.teachers import build_engine

    started = time.monotonic()
    own = engine is None
    if own:
        engine = build_engine(model.engine, model.config)
    try:
        records = generate_all(engine, sets, run, log=log)
    finally:
        if own:
            engine.close()
    generate_s = time.monotonic() - started
    out: dict[str, Any] = {"model": model.config.model, "engine": model.engine, "settings": model.settings(),
                           "eval": run.settings(), "benchmarks": {}}
    with Verifier(run.verify) as verifier:
        for s in sets:
            scores = score_set(s, [r for r in records if r["benchmark"] == s.name], run, verifier)
            scores.update(sha256=s.sha256, files=dict(s.files), total_questions=s.total)
            out["benchmarks"][s.name] = scores
            log(f"eval: {model.name} on {s.name}: " + format_scores(scores))
    out["generate_s"] = round(generate_s, 2)
    out["seconds"] = round(time.monotonic() - started, 2)
    return out, records


def format_scores(scores: dict) -> str:
    parts = [f"{scores['n_questions']} questions"]
    if scores.get("greedy_acc") is not None:
        parts.append(f"greedy {scores['greedy_acc']:.1%}")
    parts += [f"pass@{k} {v:.1%}" for k, v in scores.get("pass@k", {}).items()]
    parts += [f"maj@{k} {v:.1%}" for k, v in scores.get("maj@k", {}).items()]
    return ", ".join(parts)


# --------------------------------------------------------------------------- files


def write_records(path: Path, records: Sequence[dict]) -> Path:
    """Per-completion records as JSON Lines (one object a line), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, indent=2, ensure_ascii=False)
    return path


def model_fingerprint(path: str | Path) -> str | None:
    """sha256 over a local model directory's weights and config (None for a Hub id or packaged
    name, whose content the name pins). An exported model is rewritten on every rerun with the same
    bytes, so this, not the files' times, says whether it changed (~1 s per GB)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name == "config.json"))
    return fingerprint({f.name: sha256_file(f) for f in files})
