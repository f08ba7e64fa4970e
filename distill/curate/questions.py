"""Checks of a question before money is spent answering it (stage `validate`), as pure functions.

Rule checks look at the text alone: it asks something, it does not carry its own answer, its
length is in bounds, it is written in a Latin-script language, it asks one thing rather than
several. An optional judge (the teacher engine, greedy) then says whether what is left is well
posed (MathQ-Verify's question: contradictory premises, missing information, ambiguity). Every
rejection carries its reason, `code: detail`; a judge reply that is not in the asked format is a
rejection of its own (`judge_unparsable`), never a crash and never a silent pass.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pydantic import Field

from distill.section import Section


class ValidateJudgeConfig(Section):
    enabled: bool = False
    """Ask the teacher engine (`generate.engine`, greedy) whether each question that passed the
    rules is well posed; rejected: `contradictory`, `missing_information`, `ambiguous`."""

    max_tokens: int = Field(default=64, ge=8)
    """Tokens the judge may write (one verdict word and a short reason)."""


class ValidateConfig(Section):
    """Rule checks (and an optional judge) on each question before generation."""

    min_words: int = Field(default=2, ge=1)
    """Shorter questions are rejected (`too_short`): too little to be a problem. Words are
    whitespace-separated, a formula counts as one ("Factor $58x^5-203x^{11}$." is 2)."""

    max_words: int = Field(default=600, ge=1)
    """Longer questions are rejected (`too_long`)."""

    require_ask: bool = True
    """Reject a text that asks nothing (`no_question`): no question mark and no instruction word
    (find, compute, show, prove, how many, ...)."""

    reject_answer_in_text: bool = True
    """Reject a question that carries its answer (`answer_in_text`): a `\\boxed{}`, `####`, or an
    "Answer:" / "Solution:" / "The answer is" line."""

    single_question: bool = True
    """Reject a text that asks several things (`several_questions`): enumerated parts ((a), (b),
    ... / 1., 2., ... on their own lines) or two or more question sentences."""

    min_latin_share: float = Field(default=0.6, ge=0.0, le=1.0)
    """Reject a question whose letters are mostly outside the Latin / Greek / math blocks
    (`language`): the verifier and the benchmarks are English. 0 turns the check off."""

    judge: ValidateJudgeConfig = Field(default_factory=ValidateJudgeConfig)
    """The optional well-posedness judge."""


_ASK = re.compile(
    r"\b(find|compute|calculate|determine|evaluate|solve|simplify|show|prove|express|give|list|what|which|"
    r"how|who|when|where|why|write|rewrite|estimate|factor|factorise|factorize|convert|round|sketch|derive|"
    r"expand|rationalize|rationalise|graph|plot|identify|state|explain|describe|verify|count|enter|order|"
    r"arrange|complete|approximate|add|subtract|multiply|divide|minimize|maximize|classify|decompose|"
    r"construct|draw|choose|select|match|obtain|deduce|represent|transform|reduce|integrate|differentiate|"
    r"normalize|name)\b", re.I)
_ANSWER = re.compile(r"\\boxed\s*\{|####|^\s*(?:answer|solution|final answer)\s*[:：]|^\s*the answer is\b", re.I | re.M)
_PARTS = re.compile(r"(?:^|\s)\(([a-h])\)\s")
_NOT_PROSE = re.compile(r'\$\$.*?\$\$|\$[^$]*\$|\\\[.*?\\\]|\\begin\{(\w+\*?)\}.*?\\end\{\1\}|\[asy\].*?\[/asy\]|"[^"]*"|“[^”]*”',
                        re.S)
_CHOICES = re.compile(r"\(A\).*\(B\)", re.S)  # multiple choice: "... is $\textbf{(A)}\ 1 \qquad \textbf{(B)} ..."
_QUESTION_SENTENCE = re.compile(r"[^.?!\n]{3,}\?")


def _latin_share(text: str) -> float:
    from distill.curate.filters import _is_latin_letter

    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    return sum(_is_latin_letter(ord(c)) for c in letters) / len(letters)


def rule_problem(problem: str, cfg: ValidateConfig) -> str | None:
    """What is wrong with the question's text, `code: detail`, or None. Pure."""
    words = len(problem.split())
    if words < cfg.min_words:
        return f"too_short: {words} words (min {cfg.min_words})"
    if words > cfg.max_words:
        return f"too_long: {words} words (max {cfg.max_words})"
    if cfg.min_latin_share and (share := _latin_share(problem)) < cfg.min_latin_share:
        return f"language: {share:.0%} of letters Latin (min {cfg.min_latin_share:.0%})"
    if cfg.reject_answer_in_text and (m := _ANSWER.search(problem)):
        return f"answer_in_text: {m.group(0).strip()!r} in the question"
    if cfg.require_ask and "?" not in problem and not _ASK.search(problem) and not _CHOICES.search(problem):
        return "no_question: no question mark and no instruction word"
    if cfg.single_question:
        parts = set(_PARTS.findall(problem))
        if {"a", "b"} <= parts:
            return f"several_questions: parts ({'), ('.join(sorted(parts))})"
        # Question marks inside formulas, diagrams and quotations are not questions the problem asks.
        asks = _QUESTION_SENTENCE.findall(_NOT_PROSE.sub(" ", problem))
        if len(asks) >= 2:
            return f"several_questions: {len(asks)} question sentences"
    return None


# --------------------------------------------------------------------------- the judge

JUDGE_MARKER = "WELL-POSEDNESS CHECK"
"""Opens the judge prompt (the test server recognises it and answers with a verdict)."""
JUDGE_VERDICTS = {"OK": None, "CONTRADICTORY": "contradictory", "MISSING_INFORMATION": "missing_information",
                  "AMBIGUOUS": "ambiguous"}


def judge_messages(problem: str) -> list[dict]:
    return [{"role": "user", "content": (
        f"{JUDGE_MARKER}\nRead the math problem below. Reply with exactly one word first: OK if it is "
        "well posed; CONTRADICTORY if its conditions contradict each other; MISSING_INFORMATION if it "
        "cannot be solved from what it gives; AMBIGUOUS if it can be read in ways with different "
        "answers. Then one short sentence saying why.\n\nProblem:\n" + problem)}]


def parse_judge_verdict(text: str) -> tuple[str | None, str]:
    """(rejection code or None for OK, the reason sentence) from a reply; ValueError when the
    reply does not open with one of the verdict words."""
    m = re.match(r"\s*\**\s*([A-Z_]+)\b[\s:.*-]*(.*)", text or "", re.S)
    if m is None or m.group(1) not in JUDGE_VERDICTS:
        raise ValueError(f"judge_unparsable: the judge replied {text[:80]!r}, not a verdict word")
    return JUDGE_VERDICTS[m.group(1)], " ".join(m.group(2).split())[:200]


JudgeFn = Callable[[list[str]], list[str | None]]
"""Problems -> the judge's reply texts (None where the request failed)."""


def engine_judge(engine: Any, cfg: ValidateJudgeConfig) -> JudgeFn:
    """A `JudgeFn` asking `engine` (a `TeacherEngine`) greedily, one request per problem."""
    from distill.teachers.base import Request, SamplingParams

    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_tokens, seed=0)

    def judge(problems: list[str]) -> list[str | None]:
        results = engine.generate([Request(judge_messages(p)) for p in problems], params)
        return [r.completions[0].text if r.ok and r.completions else None for r in results]

    return judge


def validate_questions(records: list[dict], cfg: ValidateConfig, judge: JudgeFn | None = None
                       ) -> tuple[list[dict], list[dict]]:
    """(kept, rejected with `reason`) for question records `{id, problem, ...}`, in input order
    within each list. The judge sees only questions that passed the rules."""
    kept, rejected, asked = [], [], []
    for r in records:
        reason = rule_problem(r["problem"], cfg)
        if reason is not None:
            rejected.append({**r, "reason": reason})
        elif judge is not None:
            asked.append(r)
        else:
            kept.append(r)
    if asked:
        for r, reply in zip(asked, judge([r["problem"] for r in asked])):
            if reply is None:
                rejected.append({**r, "reason": "judge_failed: the judge request failed after its retries"})
                continue
            try:
                code, why = parse_judge_verdict(reply)
            except ValueError as e:
                rejected.append({**r, "reason": str(e)})
                continue
            if code is None:
                kept.append(r)
            else:
                rejected.append({**r, "reason": f"{code}: {why or 'the judge gave no reason'}"})
    return kept, rejected
