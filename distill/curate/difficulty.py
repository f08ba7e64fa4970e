"""How hard each question is for a (cheap) solver model (stage `difficulty`), as pure functions.

k samples per question from the solver, graded with curation's own verifier (`verify_records`:
the same answer extraction, equivalence and majority vote as stage `verify`), give each question a
pass rate: the share of samples equal to the reference, or, without a reference, to the majority
answer (the pseudo-label, kept with its agreement). A pass-rate band then keeps the questions worth
a teacher's time: a question every sample solves teaches little, one no sample solves is often
mislabelled or ill posed.

Adaptive sampling, the unanimity rule: every question gets `min_samples` samples first; a question
whose first samples are unanimous (all correct or all wrong) stops there, only the others get the
rest of `samples`. Why this rule and not a confidence interval: the decisions that matter are
pass rate 0 and pass rate 1 (no learning signal either way), and a 95% Wilson interval cannot
separate 0 correct from a band edge of 0.1 before ~35 samples, so it would almost never stop within
the usual 8-16. The cost, stated: a question of true pass rate p is stopped as unsolved with
probability (1-p)^min_samples (p = 0.5, 4 samples: 6%) and as solved with p^min_samples. Once a
question's first samples disagree it can never become unanimous, so two rounds are all there is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from distill.section import Section


class DifficultyConfig(Section):
    """k solver samples per question, a pass rate, and a pass-rate band (stage `difficulty`)."""

    engine: str = "generate"
    """The solver engine: `generate` (the teacher's engine and settings, `generate.<engine>`), or a
    registered engine (`hf`, `openai`, `vllm`) configured by `engine_settings` alone. A cheap solver
    is usually a smaller model: `generate` with `engine_settings: {model: ...}` on the same server."""

    engine_settings: dict[str, Any] = Field(default_factory=dict)
    """Settings of the solver engine, the keys of `generate.<engine>` (`distill config explain
    generate.openai`): with engine `generate` they override the teacher's (e.g. `{model: small}`),
    otherwise they are the whole section. Checked before the run starts. Whether a change
    recomputes the stage is decided on the resolved section (a new model does, a new concurrency
    does not)."""

    samples: int = Field(default=8, ge=1)
    """Most samples per question (n of pass@n; the coverage curve runs k = 1..n)."""

    min_samples: int = Field(default=4, ge=1)
    """Samples every question gets before the unanimity rule may stop it (see the module doc):
    unanimous after these, a question is decided. Set it to `samples` to turn adaptive sampling off."""

    band: tuple[float, float] = (0.0, 1.0)
    """Pass rates kept, inclusive: below is `too_hard`, above `too_easy`. The default keeps every
    question that has an answer; e.g. [0.1, 0.9] drops what the solver never or always solves."""

    temperature: float = Field(default=0.7, gt=0.0)
    """Solver sampling temperature (> 0: k greedy samples would be one sample k times)."""

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Solver nucleus sampling mass."""

    max_new_tokens: int = Field(default=1024, ge=1)
    """Longest solver completion; a cut one usually has no answer and counts as a wrong sample."""

    seed: int | None = 0
    """Base seed: sample j of question q is asked with a seed derived from (seed, q, j), so a
    resumed or retried unit asks for the same samples. Unset: unseeded (not reproducible)."""

    _volatile = frozenset({"engine_settings"})  # fingerprinted resolved instead (see engine_settings)

    @model_validator(mode="after")
    def _check(self) -> "DifficultyConfig":
        lo, hi = self.band
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"band={list(self.band)}: needs 0 <= lo <= hi <= 1")
        if self.min_samples > self.samples:
            raise ValueError(f"min_samples={self.min_samples} is more than samples={self.samples}")
        return self


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k),
    as a product (no huge binomials). k > n extends the decided cases: 1 when some sample is
    correct, 0 when none is (what the unanimity rule assumes of a question it stopped early)."""
    if c <= 0:
        return 0.0
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def coverage_curve(counts: Sequence[tuple[int, int]], k_max: int) -> list[float]:
    """Mean pass@k over questions for k = 1..k_max, from (samples, correct) per question: the
    coverage curve of Large Language Monkeys (Brown et al., 2024)."""
    if not counts:
        return []
    return [sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in range(1, k_max + 1)]


@dataclass(frozen=True)
class Outcome:
    """What the solver's samples say about one question."""

    samples: int
    correct: int
    answered: int
    """Samples with an extractable answer."""
    failed: int
    """Samples whose request failed (after the engine's retries)."""
    label: str | None
    """The reference, or without one the majority answer (the pseudo-label)."""
    agreement: float | None
    """The share of answered samples equal to the label (null when none answered)."""
    has_reference: bool
    failure: str | None = None
    """The engine's reason for the first failed request."""

    @property
    def pass_rate(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    @property
    def unanimous(self) -> bool:
        return self.correct in (0, self.samples)


def decide(o: Outcome, cfg: DifficultyConfig, min_agreement: float) -> str | None:
    """The rejection reason, `code: detail`, or None to keep the question."""
    if o.failed == o.samples:
        return f"solver_failed: all {o.samples} solver requests failed ({o.failure})"
    if o.answered == 0:
        return f"no_answer: no sample had an extractable answer ({o.samples} samples)"
    lo, hi = cfg.band
    rate = o.pass_rate
    if lo <= rate <= hi:
        return None
    code = "too_hard" if rate < lo else "too_easy"
    why = f"{code}: pass rate {rate:.2f} over {o.samples} samples (band [{lo:.2f}, {hi:.2f}])"
    if not o.has_reference and o.agreement is not None and o.agreement < min_agreement:
        why += f"; no reference and majority agreement {o.agreement:.2f} below {min_agreement:.2f}"
    return why


SolveFn = Callable[[list[tuple[dict, int]]], list[tuple[str | None, str | None]]]
"""(question record, sample index) pairs -> (completion text, None) or (None, the engine's
reason) per pair, in order."""


def grade(questions: list[dict], texts: list[list[tuple[str | None, str | None]]], verifier: Any,
          vcfg: Any) -> list[Outcome]:
    """Each question's outcome from its samples' (text, failure) pairs, graded by `verify_records`
    (reference if any, else majority vote with `vcfg.min_agreement`)."""
    from distill.curate.verify import _has_answer, verify_records
    from distill.teachers.base import split_reasoning

    records = []
    for q, samples in zip(questions, texts):
        for j, (text, _) in enumerate(samples):
            reasoning, response = split_reasoning(text or "")
            records.append({"id": q["id"], "answer": q.get("answer"), "problem": q["problem"], "sample_idx": j,
                            "response": response, "reasoning": reasoning})
    graded = verify_records(records, verifier, vcfg)
    out, at = [], 0
    for q, samples in zip(questions, texts):
        rows, at = graded[at:at + len(samples)], at + len(samples)
        failures = [why for _, why in samples if why is not None]
        ref = q.get("answer")
        out.append(Outcome(
            samples=len(samples), correct=sum(bool(r["correct"]) for r in rows),
            answered=sum(_has_answer(r["pred_answer"]) for r in rows), failed=len(failures),
            label=rows[0].get("label") if rows else None, agreement=rows[0].get("agreement") if rows else None,
            has_reference=ref is not None and bool(str(ref).strip()), failure=failures[0] if failures else None))
    return out


def assess_questions(questions: list[dict], cfg: DifficultyConfig, solve: SolveFn, verifier: Any, vcfg: Any
                     ) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(kept, rejected with `reason`, stats) for question records `{id, problem, answer, ...}`,
    each with `solver_samples`, `solver_correct`, `solver_pass_rate`, `solver_label` and
    `solver_agreement`. Samples come in two rounds (the unanimity rule, module doc); sample j of a
    question is the same request whichever round asks for it. `stats`: requests asked, questions
    stopped early."""
    m, n = cfg.min_samples, cfg.samples
    first = solve([(q, j) for q in questions for j in range(m)])
    texts = [first[i * m:(i + 1) * m] for i in range(len(questions))]
    outcomes = grade(questions, texts, verifier, vcfg)
    more = [i for i, o in enumerate(outcomes) if not o.unanimous and n > m]
    if more:
        rest = solve([(questions[i], j) for i in more for j in range(m, n)])
        for a, i in enumerate(more):
            texts[i] = texts[i] + rest[a * (n - m):(a + 1) * (n - m)]
        # Regraded with all samples: the majority (and so every verdict against it) may change.
        for i, o in zip(more, grade([questions[i] for i in more], [texts[i] for i in more], verifier, vcfg)):
            outcomes[i] = o
    kept, rejected = [], []
    for q, o in zip(questions, outcomes):
        row = {**q, "solver_samples": o.samples, "solver_correct": o.correct, "solver_pass_rate": o.pass_rate,
               "solver_label": o.label, "solver_agreement": o.agreement}
        reason = decide(o, cfg, vcfg.min_agreement)
        if reason is None:
            kept.append(row)
        else:
            rejected.append({**row, "reason": reason})
    stats = {"solver_requests": len(questions) * m + len(more) * (n - m),
             "stopped_early": len(questions) - len(more) if n > m else 0}
    return kept, rejected, stats
