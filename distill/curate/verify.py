"""Verification: is a predicted final answer equal to the reference (or to the majority)?

The semantics are math-verify's (`math_verify.parse` + `math_verify.verify` on `\\boxed{answer}`):
fractions vs decimals, LaTeX, sets, intervals, tuples, units and `^\\circ` dropped, percentages,
`x = 5` vs `5`, with one exception, the exactness rule: two exact numbers (integers, fractions,
decimals as written, and `+`, `*`, powers and factorials of them) are compared exactly, where
math-verify rounds to 6 decimals (it calls `\\frac{1}{2004!}` and `\\frac{1}{2006!}` equal).
Only answers that are approximate themselves (`\\approx`, a decimal that can only round the other
side, a float expression) keep a tolerance, `VerifyConfig.float_rounding` (see `approximates`).
Two paths decide a pair:

- the fast path, in-process: string work and exact rational arithmetic on short plain numbers
  (`72`, `1,000`, `-0.25`, `3/4`, `\\frac{3}{4}`, `50\\%`, `90^\\circ`, `5\\text{ cm}`, `x = 3`).
  It decides only where it provably gives the symbolic path's verdict and hands the rest on.
  Most answers of arithmetic sets (GSM8K, AIME) never reach sympy.
- the symbolic path: math-verify in sandbox worker processes (`sandbox.WorkerPool`) under a hard
  wall-clock limit and a memory limit, because model output can make sympy hang inside one C call
  (a tower of powers) where math-verify's own SIGALRM cannot interrupt it. No model output is
  ever parsed by sympy in the calling process. Workers parse each distinct reference once.

Without a reference the pseudo-label is the majority answer (`majority_vote`): answers are grouped
by the fast path's canonical form, and groups the symbolic path finds equal (`\\sqrt{4}` and `2`)
are merged (`Verifier.equal_answer_pairs`, bounded by `vote_max_distinct`).

An optional LLM judge (`AnswerJudgeConfig`, `engine_judge`, off by default) decides the pairs
against a reference that the symbolic path cannot (free-text references); its verdicts carry a
`verdict_detail` starting `judge:`.
"""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from distill.curate.answers import DEFAULT_METHODS, EXTRACTION_METHODS, extract_answer
from distill.curate.sandbox import Killed, WorkerPool
from distill.section import Section

VerdictCode = Literal["equal", "not_equal", "no_answer", "timeout", "parse_error"]


@dataclass(frozen=True)
class Verdict:
    """The outcome for one (prediction, reference) pair. Only `equal` counts as correct."""

    code: VerdictCode
    """equal / not_equal / no_answer (nothing extracted) / timeout / parse_error."""
    detail: str = ""
    """Which path decided and why, for the rejected-records report."""

    @property
    def correct(self) -> bool:
        return self.code == "equal"


class AnswerJudgeConfig(Section):
    enabled: bool = False
    """Ask the teacher engine (`generate.engine`, as the decontamination judge does) whether an
    answer equals a reference the symbolic verifier cannot decide: a `parse_error` or `timeout`
    against a reference (free-text references such as "No integer solutions" or "3 is the only
    possible value"), and a `not_equal` against a reference that is prose (`free_text`: math-verify
    read only a fragment of it). Its "yes"/"no" turns the verdict into `equal`/`not_equal`, with a
    `verdict_detail` starting `judge:`. Off by default: a judge can be wrong, and costs one short
    generation per distinct (problem, reference, answer)."""

    max_pairs: int = Field(default=2000, ge=0)
    """Most distinct (problem, reference, answer) triples judged per work unit
    (`curate.shard_size` questions); the rest keep their symbolic verdict and are counted in the
    stage summary (`judge_skipped`). Bounds the judge's cost on a set of text references."""

    max_tokens: int = Field(default=16, ge=1)
    """Tokens the judge may generate; the reply is one word ("yes"/"no"). A reasoning teacher
    needs more (its `<think>` block is skipped when reading the reply)."""


class VerifyConfig(Section):
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    """Final-answer extraction methods, tried in order on the response: `boxed` (last
    `\\boxed{}`), `answer_is` ("The answer is ..." / "Final answer: ..."), `gsm8k` (`#### N`),
    `last_statement` (the value of the last sentence when it holds exactly one number or math
    span, or a closing displayed formula; none when it holds two). Opt-in: `last_number` (any last
    number on the last line; lenient, picks stray numbers: on MATH prose it was wrong 40% of the
    time it answered, see README > Benchmarks > Verification)."""

    use_reasoning: bool = False
    """Also search the `<think>` part when the response has no answer. Credits answers the model
    never stated to the user; off by default."""

    timeout_s: float = Field(default=5.0, ge=1.0)
    """Wall-clock limit per symbolic check (seconds, >= 1). math-verify's own alarm stops most
    slow checks at this limit; one it cannot interrupt is killed from outside 1 s later and its
    worker replaced (about 1 s). Either way the pair is a `timeout`. Longer limits rescue a few
    heavy-but-valid expressions at the price of stalls on pathological ones."""

    workers: int = Field(default=2, ge=1)
    """Sandbox worker processes for symbolic checks (each ~150 MB). More workers help only when
    many pairs miss the fast path."""

    batch_size: int = Field(default=64, ge=1)
    """Most pairs sent to a worker at once (fewer when a call has few, so that every worker gets
    work). Larger batches cost less inter-process traffic; smaller ones balance better."""

    max_answer_chars: int = Field(default=1000, ge=1)
    """Answers longer than this (characters) are a `parse_error` without being parsed: real final
    answers are short, and parse time grows fast with length."""

    memory_limit_mb: int = Field(default=2048, ge=256)
    """Address-space limit of each worker process (MiB). A check that needs more fails alone as a
    `parse_error`; too low a limit makes ordinary checks fail."""

    min_agreement: float = Field(default=0.5, gt=0.0, le=1.0)
    """Questions without a reference: samples are checked against the majority answer when that
    answer's share of the extracted answers is at least this; otherwise they get `no_answer`.
    Higher is stricter (fewer pseudo-labelled questions, fewer wrong labels)."""

    vote_max_distinct: int = Field(default=8, ge=0)
    """Majority voting merges distinct answers that the symbolic check finds equal (`\\sqrt{4}`,
    `2`) only for questions with at most this many distinct answers (after the fast path's
    canonical form). Cost: n(n-1) checks for n distinct answers (each pair both ways), free for two
    plain numbers, milliseconds to `timeout_s` for LaTeX. 0 or 1: vote by canonical form only."""

    float_rounding: int = Field(default=6, ge=0, le=15)
    """The tolerance, in decimal places, for answers that are themselves approximate: a side
    written with `\\approx` (or `\\sim`, `≈`), a decimal that can only be a rounding of the
    other side (`0.333333` vs `\\frac{1}{3}`, `1.414214` vs `\\sqrt{2}`: see `approximates`), or
    an expression math-verify evaluates in floating point. Both sides are then compared rounded
    to this many decimals (math-verify's `float_rounding`). Exact numbers on both sides (integers,
    fractions, factorials, powers, decimals that can write each other) are compared exactly,
    whatever this is: `0.1234567` vs `0.1234568` and `1/2004!` vs `1/2006!` differ. Lower is more
    lenient."""

    judge: AnswerJudgeConfig = Field(default_factory=AnswerJudgeConfig)
    """Optional LLM-judge fallback for pairs the symbolic verifier cannot decide (off by default)."""

    _volatile: ClassVar[frozenset[str]] = frozenset({"workers", "batch_size"})

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in EXTRACTION_METHODS:
                raise ValueError(
                    f"curate.verify.methods: unknown method {m!r}; known: {', '.join(EXTRACTION_METHODS)}"
                )
        if not v:
            raise ValueError("curate.verify.methods: needs at least one method")
        return v


# --------------------------------------------------------------------------- fast path

_SPACING = re.compile(r"\\[,;:!]|\\(?:left|right)(?=[()\[\]|.]|\\[{}])|\\displaystyle")
# A space between two word characters separates tokens (`2 i`, `\pi k`), one after a backslash
# ends a row (`\\ \frac`), one beside an inner `$` splits math from text; elsewhere it is layout.
_LAYOUT_SPACE = re.compile(r"(?<![A-Za-z0-9$\\])\s+|(?<![\\\s])\s+(?![A-Za-z0-9$])")
_WORD_SPACE = re.compile(r"\s+")
_FRAC_CMD = re.compile(r"\\[dtc]frac")
# `x=` in front of a number: math-verify unwraps an assignment when the other side is no equation.
# e, i, E, I, o, O are left out: sympy reads them as constants or math-verify as a unit.
_ASSIGN = re.compile(r"^([a-df-hj-np-zA-DF-HJ-NP-Z])=(?!=)")
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUM = re.compile(
    rf"(?P<sign>-)?(?:"
    rf"(?P<dec>{_INT}(?:\.\d+)?|\.\d+)"
    rf"|\\frac\{{(?P<fn>-?\d+)\}}\{{(?P<fd>\d+)\}}"
    rf"|\\frac(?P<bn>\d)(?P<bd>\d+)"  # `\frac13`, which math-verify repairs to \frac{1}{3}
    rf"|(?P<sn>\d+)/(?P<sd>\d+)"
    rf")"
    rf"(?P<suffix>\\?%|\^\\circ|\^\{{\\circ\}}|°|\\(?:text|mbox)\{{[^{{}}\\]*\}}(?:\^\d|\{{\^\d\}})?)?"
)
_MAX_FLOAT_DIGITS = 15  # math-verify's Floats carry 15 digits: beyond, rounding decides, not the value


def normalize(answer: str) -> str:
    """Layout removed: `$…$`, `\\$`, `\\left`/`\\right`, `\\dfrac` variants, LaTeX spacing commands and
    spaces not between two word characters (`2 i` and `\\pi k` keep theirs: math-verify reads
    `2i` and `\\pik` differently). Two answers with the same normal form are equal under any
    reading; everything else is left to math-verify."""
    # Only `$` around the whole answer is layout: inside (`48$, $384`) math-verify splits on it.
    s = answer.strip().replace("\\$", "").strip("$")
    s = _FRAC_CMD.sub(r"\\frac", s)
    s = _SPACING.sub("", s)
    s = _WORD_SPACE.sub(" ", _LAYOUT_SPACE.sub("", s))
    return s


@dataclass(frozen=True)
class PlainNumber:
    value: Fraction
    """The exact value, percent applied (`50%` -> 1/2)."""
    raw: Fraction
    """The value as written, percent not applied (`50%` -> 50)."""
    kind: Literal["int", "float", "frac"]
    percent: bool
    var: str | None
    """The variable of an `x = ...` prefix."""
    digits: int
    """Significant digits written."""
    places: int | None = None
    """Decimal places of `value` as written (`0.125` -> 3, `12.5%` -> 3); None for integers and
    fractions. A decimal is an exact value unless `approximates` says it rounds the other side."""


def plain_number(answer: str) -> PlainNumber | None:
    """The answer as a plain number, or None when it is anything else (LaTeX expression, set,
    several numbers, ...). Inputs longer than 64 characters are never plain numbers."""
    s = normalize(answer)
    if len(s) > 64:
        return None
    var = None
    if m := _ASSIGN.match(s):
        var, s = m.group(1), s[m.end() :]
    m = _NUM.fullmatch(s)
    if m is None:
        return None
    suffix = m.group("suffix") or ""
    if suffix and (var or m.group("dec") is None):
        return None  # `x = 50\%`, `\frac{1}{2}\%`: not checked against math-verify, left to it
    if m.group("dec") is not None:
        if "," in m.group("dec") and (suffix or var):
            return None  # math-verify reads `2,600\%` and `x = 2,600` as lists
        text = m.group("dec").replace(",", "")
        if len(text) > 1 and text[0] == "0" and text[1] != "." and suffix:
            return None  # `033` is 33 (AIME style), but `010\%` is not read as 10%
        raw = Fraction(text)
        kind = "float" if "." in text else "int"
        digits = len(text.replace(".", "").lstrip("0")) or 1
        places = len(text.partition(".")[2]) + (2 if suffix.endswith("%") else 0) if kind == "float" else None
    elif m.group("fn") is not None or m.group("bn") is not None:
        num, den = (int(m.group("fn")), int(m.group("fd"))) if m.group("fn") else (int(m.group("bn")), int(m.group("bd")))
        if den == 0:
            return None
        raw, kind, digits, places = Fraction(num, den), "frac", 0, None
    else:
        num, den = int(m.group("sn")), int(m.group("sd"))
        if den == 0:
            return None
        raw, kind, digits, places = Fraction(num, den), "frac", 0, None
    if m.group("sign"):
        raw = -raw
    percent = suffix.endswith("%")
    value = raw / 100 if percent else raw
    return PlainNumber(value=value, raw=raw, kind=kind, percent=percent, var=var, digits=digits, places=places)


def approximates(a: Fraction, a_places: int | None, b: Fraction, b_places: int | None) -> bool:
    """The exactness rule: True when one of two exact numbers can only be a rounding of the other,
    so that they are compared with the tolerance (`VerifyConfig.float_rounding`); False when they
    are compared exactly.

    A decimal with k places written is a rounding of the other number when that number is not a
    multiple of 10^-k, i.e. k places cannot write it: `0.333333` vs 1/3, `3.14` vs `3.14159`,
    `0.3333333` vs `0.333333`. Integers, fractions, factorials, powers and decimals that can write
    each other are exact: `0.1234567` vs `0.1234568`, 1/2004! vs 1/2006!, 2^100 vs 2^100+1 differ,
    `0.5` vs 1/2 and `1.50` vs 3/2 are equal."""
    for places, other in ((a_places, b), (b_places, a)):
        if places is not None and (other * 10**places).denominator != 1:
            return True
    return False


def fast_verdict(pred: str, ref: str, float_rounding: int = 6) -> Verdict | None:
    """The verdict on (prediction, reference) when it follows from string work and exact
    arithmetic; None when only the symbolic path can tell. That is math-verify's verdict except
    where the exactness rule (`approximates`) compares exactly what math-verify rounds."""
    a, b = normalize(pred), normalize(ref)
    if a == b and a:
        return Verdict("equal", "fast path: same normalised answer")
    p, r = plain_number(pred), plain_number(ref)
    if p is None or r is None:
        return None
    if p.var is not None and r.var is not None:
        return None  # two equations: math-verify compares relations, not values
    if "float" in (p.kind, r.kind):
        if not approximates(p.value, p.places, r.value, r.places):
            # Exact decimals: compared exactly, however close (`0.1234567` vs `0.1234568`).
            if p.value == r.value:
                return Verdict("equal", "fast path: same number")
            return Verdict("not_equal", "fast path: different numbers (exact decimals)")
        # A decimal rounding the other side: math-verify compares both rounded to `float_rounding`
        # decimals. Rounding can tie values that close, and long numbers lose digits to 15-digit
        # floats: not decided here.
        if max(p.digits, r.digits) > _MAX_FLOAT_DIGITS or max(abs(p.value), abs(r.value)) >= 10**9:
            return None
        if abs(p.value - r.value) > Fraction(2, 10**float_rounding):
            return Verdict("not_equal", "fast path: different numbers")
        return None
    if p.kind == "int" and r.kind == "int" and (p.percent or r.percent) and p.raw >= 0 and r.raw >= 0:
        # math-verify reads an integer percentage against an integer by its number: 9% == 9
        # (but -9% is -(9%), which it compares by value).
        same = p.raw == r.raw or p.value == r.value
    else:
        same = p.value == r.value
    if same:
        return Verdict("equal", "fast path: same number")
    return Verdict("not_equal", "fast path: different numbers")


def canonical(answer: str) -> str:
    """A key under which equal answers meet for majority voting: the exact value of a plain
    number (`0.5`, `1/2`, `50%` -> `1/2`), else the normalised string. Answers equal only
    symbolically (`\\sqrt{4}` vs `2`) get different keys here; `vote_keys` joins them when the
    verifier says so (`Verifier.equal_answer_pairs`)."""
    p = plain_number(answer)
    if p is not None:
        return f"{p.value.numerator}/{p.value.denominator}" if p.value.denominator != 1 else str(p.value.numerator)
    return normalize(answer)


def _has_answer(a: str | None) -> bool:
    return a is not None and bool(a.strip())


def vote_spellings(answers: Sequence[str | None]) -> dict[str, str]:
    """One spelling per canonical key: the key's most frequent spelling (ties: smallest string).
    The answers a symbolic comparison of one question's keys needs."""
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    for a in answers:
        if _has_answer(a):
            groups[canonical(a)][a] += 1
    return {k: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, c in groups.items()}


def vote_keys(answers: Sequence[str | None], same: Sequence[tuple[str, str]] = ()) -> list[str | None]:
    """Each answer's vote key: its canonical form, with the canonical keys that `same` pairs join
    (transitively) merged under the group's smallest key; None where there is no answer."""
    parent: dict[str, str] = {}

    def root(k: str) -> str:
        while parent.get(k, k) != k:
            k = parent[k]
        return k

    for a, b in same:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(canonical(a)) if _has_answer(a) else None for a in answers]


def majority_vote(answers: Sequence[str | None], same: Sequence[tuple[str, str]] = ()) -> tuple[str | None, float]:
    """(pseudo-label, agreement): the most frequent answer among the non-None ones, grouped by
    `vote_keys` (`canonical`, merged by the `same` pairs of canonical keys), and the share of
    those answers in its group. Ties go to the smallest key, so the label does not depend on
    sample order. The label is the group's most frequent spelling (ties: smallest string).
    (None, 0.0) when no sample has an answer."""
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    for a, key in zip(answers, vote_keys(answers, same)):
        if key is not None:
            groups[key][a] += 1  # type: ignore[index]
    if not groups:
        return None, 0.0
    total = sum(sum(c.values()) for c in groups.values())
    key = min(groups, key=lambda k: (-sum(groups[k].values()), k))
    spelling = min(groups[key].items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return spelling, sum(groups[key].values()) / total


# --------------------------------------------------------------------------- symbolic path (workers)

_TEXT_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+")
# Math environments inside an answer's text (`$...$`, `$$...$$`, `\[...\]`, `\(...\)`).
_MATH_ENV = re.compile(r"\$\$.+?\$\$|\$[^$]+\$|\\\[.+?\\\]|\\\(.+?\\\)", re.DOTALL)
# A relation or condition written in the answer (`x \leq 250`, `x \neq \pm 5`, `\{x \mid x > 0\}`).
_RELATION = re.compile(r"[<>=]|\\(?:leq?|geq?|leqslant|geqslant|neq?|pm|mp|mid|in|subset|subseteq|cup|cap)(?![A-Za-z])")


def text_numbers(text: str) -> list[Fraction]:
    """The unsigned numbers written in an answer's text (`1,000` is one number, `x_{1}` holds 1):
    what a parse of the whole answer would have to account for."""
    return [Fraction(m.group().replace(",", "")) for m in _TEXT_NUMBER.finditer(text)]


def fragment_accounts_for(value: Any, text: str) -> bool:
    """Whether a value math-verify read from a fragment of `text` (a sympy object) stands for all
    of `text`: the text holds at most one math environment (of several, math-verify read one: the
    last matrix of "Eigenvalues: $...$ ... $$D=...$$"), every number written in `text` is, up to
    sign, a number of the value's tree (or the numerator or denominator of a fraction there), and
    a bare number is not all that a text with a relation says (`\\{x \\mid x \\geq 0\\}` is not 0).
    Strict by design: a fragment that sympy
    rewrote while parsing (`$\\sqrt{8}$` -> 2*sqrt(2), `$\\frac{6}{4}$` -> 3/2) does not account for
    its text either, so its answer counts as unparsed, never as a wrong "equal". Runs in the
    workers (imports sympy)."""
    from sympy import Float, Number, Rational

    if len(_MATH_ENV.findall(text)) > 1 or (isinstance(value, Number) and _RELATION.search(text)):
        return False
    try:
        atoms = value.atoms(Number)
    except Exception:  # noqa: BLE001 - an object without atoms accounts for nothing
        return False
    have: set[Fraction] = set()
    floats: list[float] = []
    for a in atoms:
        if isinstance(a, Rational):
            q = Fraction(int(a.p), int(a.q))
            have |= {abs(q)} if q.denominator == 1 else {abs(q), abs(Fraction(q.numerator)), Fraction(q.denominator)}
        elif isinstance(a, Float):
            floats.append(abs(float(a)))
    return all(
        n in have or any(abs(float(n) - f) <= 1e-9 * max(1.0, f) for f in floats) for n in text_numbers(text)
    )


_APPROX = re.compile(r"\\(?:approx|thickapprox|sim|simeq)(?![A-Za-z])|≈")
_EXACT_MAX_BITS = 1 << 20  # an exact value above a million bits is not computed (2^{2^{100}})
_EXACT_MAX_FACTORIAL = 20000


def exact_rational(expr: Any) -> Fraction | None:
    """The exact rational value of a parsed expression built from integers and fractions with
    `+`, `*`, powers and factorials (`\\frac{1}{2004!}`, `2^{100}+1`, `\\sqrt{4}`, `10^3`); None
    for anything else (a float, a symbol, an irrational value, another function) or when a
    number would grow past a million bits. Runs in the workers (imports sympy); each step is
    bounded before sympy computes it, so a tower of powers is refused, not evaluated."""
    from sympy import Add, Mul, Pow, factorial

    def small(v) -> bool:
        return max(int(v.p).bit_length(), int(v.q).bit_length()) <= _EXACT_MAX_BITS

    def ev(e):
        if getattr(e, "is_Rational", False):
            return e if small(e) else None
        if not isinstance(e, (Add, Mul, Pow, factorial)):
            return None
        args = [ev(a) for a in e.args]
        if any(a is None for a in args):
            return None
        if isinstance(e, factorial):
            if not (args[0].is_Integer and 0 <= args[0] <= _EXACT_MAX_FACTORIAL):
                return None
        elif isinstance(e, Pow):
            base, exp = args
            bits = max(int(base.p).bit_length(), int(base.q).bit_length())
            if abs(Fraction(int(exp.p), int(exp.q))) * bits > _EXACT_MAX_BITS:
                return None
        out = e.func(*args)
        return out if out.is_Rational and small(out) else None

    try:
        v = ev(expr)
    except Exception:  # noqa: BLE001 - whatever sympy refuses is not an exact number
        return None
    return None if v is None else Fraction(int(v.p), int(v.q))


def exact_number(text: str, candidates: Sequence[Any]) -> tuple[Fraction, int | None, str | None] | None:
    """(value, decimal places, variable) of an answer that is an exact number: a plain number as
    written (`0.1234567` is 1234567/10^7, not a float; `x = 3` has variable x) or a parsed
    expression `exact_rational` evaluates. None when the answer is approximate by its own words
    (`\\approx`), a percentage (math-verify's own reading of `9\\%` vs 9 is kept) or no exact number."""
    if _APPROX.search(text):
        return None
    p = plain_number(text)
    if p is not None:
        return None if p.percent else (p.value, p.places, p.var)
    values = [c for c in candidates if not isinstance(c, str)]
    if len(values) != 1:
        return None
    v = exact_rational(values[0])
    return None if v is None else (v, None, None)


def _worker_handler(alarm_s: int, float_rounding: int = 6, cache_size: int = 4096):
    """Runs in a sandbox worker: returns the function that checks one (pred, ref) pair."""
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    whole_box = [LatexExtractionConfig()]
    cache: OrderedDict[str, Any] = OrderedDict()

    def parsed(text: str):
        """math-verify's reading of `\\boxed{text}`: (candidates, partial). `partial` is True when
        math-verify reads a value only from a fragment of the text (the partial-parse guard below);
        the candidates are then the raw text alone. "timeout" / "error" when parsing fails."""
        if text in cache:
            cache.move_to_end(text)
            return cache[text]
        # As a model writes it, `$\boxed{…}$`: inside math mode math-verify falls back to the raw
        # text for a list it cannot read, where a bare box gets its first item parsed
        # (`\frac{1}{2},-1,\frac{3\pm i}{2}` read as 1/2). An answer holding `$` itself stays bare.
        wrapped = "\\boxed{" + text + "}" if "$" in text else "$\\boxed{" + text + "}$"
        try:
            out = _read_whole(text, wrapped)
        except TimeoutException:
            out = "timeout"
        except Exception:  # noqa: BLE001 - any parser failure is this answer's parse error
            out = "error"
        cache[text] = out
        if len(cache) > cache_size:
            cache.popitem(last=False)
        return out

    def _read_whole(text: str, wrapped: str):
        # Partial-parse guard. math-verify tries its matches from the most trusted down and keeps
        # the first that parses: first the whole box, then, when the box is not LaTeX it can read,
        # any `$…$` inside it or any bare number in it. Those fallbacks read a fragment and drop
        # the rest: `A=x(500-2 x),\{x \mid 0 \leq x \leq 250\}` becomes 250, a sentence with
        # `$\frac{4}{\cos 12^\circ} \approx 4.089$` becomes 4/cos(12), so a wrong answer that
        # differs only outside the fragment is called right. The whole box is math-verify's own
        # first attempt (`extraction_mode="first_match"`: the same match and value its default
        # mode keeps when it parses), so answers it reads as a whole keep their verdicts exactly.
        # A fragment is kept only when it accounts for every number of the text
        # (`fragment_accounts_for`: "The area is 12.25 square inches." is still 12.25).
        # Cost: nothing where the box parses; where it does not (text answers), a second parse
        # that repeats the failed one and the fallbacks, cached per distinct text.
        whole = parse(wrapped, whole_box, extraction_mode="first_match", parsing_timeout=alarm_s,
                      raise_on_error=True)
        if any(not isinstance(x, str) for x in whole):
            return whole, False
        full = parse(wrapped, parsing_timeout=alarm_s, raise_on_error=True)
        values = [x for x in full if not isinstance(x, str)]
        if all(fragment_accounts_for(v, text) for v in values):
            return full, False
        return [x for x in full if isinstance(x, str)] or whole, True

    def check(pair: tuple[str, str]) -> tuple[str, str]:
        pred, ref = pair
        for side, text in (("reference", ref), ("answer", pred)):
            out = parsed(text)
            if out == "timeout":
                return "timeout", f"math-verify parsing the {side} ran past {alarm_s} s"
            if isinstance(out, str) or not out[0]:
                return "parse_error", f"math-verify could not parse the {side}"
        (gold, gold_partial), (target, target_partial) = parsed(ref), parsed(pred)
        # The exactness rule: two exact numbers are compared exactly, not rounded to
        # `float_rounding` decimals as math-verify does (it calls 1/2004! and 1/2006! equal).
        ex_p = None if target_partial else exact_number(pred, target)
        ex_r = None if gold_partial else exact_number(ref, gold)
        if ex_p is not None and ex_r is not None and not (ex_p[2] and ex_r[2]):
            if not approximates(ex_p[0], ex_p[1], ex_r[0], ex_r[1]):
                if ex_p[0] == ex_r[0]:
                    return "equal", "exact comparison: same value"
                return "not_equal", "exact comparison: different values"
        # verify() over the product of both parses, one comparison at a time so that a
        # comparison timing out is told apart from one that says "different".
        timed_out = False
        for g in gold:
            for t in target:
                try:
                    if verify(g, t, float_rounding=float_rounding, timeout_seconds=alarm_s, raise_on_error=True):
                        return "equal", "math-verify"
                except TimeoutException:
                    timed_out = True
                except Exception:  # noqa: BLE001 - math-verify counts a failing comparison as unequal
                    pass
        if timed_out:
            return "timeout", f"a math-verify comparison ran past {alarm_s} s"
        # math-verify falls back to comparing the raw text when LaTeX does not parse; unequal
        # text then says "could not read", not "read and found different".
        for side, cands, partial in (("answer", target, target_partial), ("reference", gold, gold_partial)):
            if all(isinstance(c, str) for c in cands):
                why = (" as a whole (partial-parse guard: its fallback reads only a fragment of it)"
                       if partial else "")
                return "parse_error", f"math-verify could not parse the {side}{why} (text differs)"
        return "not_equal", "math-verify"

    # sympy imports much of itself on first use (simplify, sets, solvers: ~0.3 s CPU); pay it at
    # start-up, not inside the first pair's time limit.
    for pair in (("x^2+1", "(x+1)^2"), ("[0,1)", "(0,1]"), ("\\{1,2\\}", "x=2"), ("\\sqrt{2}", "1.41")):
        check(pair)
    cache.clear()
    return check


class Verifier:
    """Checks (predicted, reference) pairs; a context manager owning the sandbox workers.

    Pairs decided by the fast path never reach a worker; the others are deduplicated, grouped
    by reference and spread over the workers in batches."""

    def __init__(self, cfg: VerifyConfig, *, fast_path: bool = True):
        """`fast_path=False` sends every pair to math-verify (tests and benchmarks compare the
        two; production has no reason to)."""
        self.cfg = cfg
        self.fast_path = fast_path
        self._pool: WorkerPool | None = None
        self.stats: Counter[str] = Counter()
        """Pairs decided by the fast path (`fast`), distinct symbolic checks (`symbolic`)."""
        self.worker_cpu_s = 0.0
        """CPU seconds the closed workers used (read after close())."""

    def _workers(self) -> WorkerPool:
        # Started on first need: a run whose answers all take the fast path starts no process.
        if self._pool is None:
            # math-verify's in-process alarm fires first (cheap: the worker lives on); the parent's
            # kill a little later catches what the alarm cannot interrupt.
            alarm = max(1, math.floor(self.cfg.timeout_s))
            self._pool = WorkerPool(
                "distill.curate.verify:_worker_handler",
                (alarm, self.cfg.float_rounding),
                n_workers=self.cfg.workers,
                item_timeout_s=self.cfg.timeout_s + 1.0,
                memory_limit_mb=self.cfg.memory_limit_mb,
            )
        return self._pool

    def start(self) -> None:
        """Start the workers now and wait for them (about a second), instead of on the first
        pair that needs one: a long-lived caller pays it before its first batch."""
        self._workers().wait_ready()

    def verify(self, pairs: Sequence[tuple[str | None, str]]) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = defaultdict(list)
        limit = self.cfg.max_answer_chars
        for i, (pred, ref) in enumerate(pairs):
            if pred is None or not pred.strip():
                out[i] = Verdict("no_answer", "no final answer found")
            elif ref is None or not ref.strip():
                out[i] = Verdict("parse_error", "empty reference")
            elif len(pred) > limit or len(ref) > limit:
                side = "answer" if len(pred) > limit else "reference"
                out[i] = Verdict("parse_error", f"{side} longer than max_answer_chars={limit}; not parsed")
            elif self.fast_path and (v := fast_verdict(pred, ref, self.cfg.float_rounding)) is not None:
                out[i] = v
            else:
                # Answers with one normal form share a verdict (see `normalize`): n samples that
                # spell the same answer alike cost one symbolic check. Without the fast path the
                # verdicts are math-verify's alone, so only identical strings share.
                key = (normalize(pred), normalize(ref)) if self.fast_path else (pred.strip(), ref.strip())
                todo[key].append(i)
        self.stats["fast"] += len(pairs) - sum(len(v) for v in todo.values())
        if todo:
            # One spelling per key goes to math-verify; one reference's pairs travel together.
            first = {k: (pairs[v[0]][0].strip(), pairs[v[0]][1].strip()) for k, v in todo.items()}
            keys = sorted(todo, key=lambda k: (k[1], k[0]))
            # Batches small enough that every worker gets many: a symbolic check costs ms to
            # seconds against ~0.1 ms of IPC per batch, and a few slow pairs (long text answers)
            # must not queue behind each other in one worker while another idles.
            bs = min(self.cfg.batch_size, max(1, -(-len(keys) // (16 * self.cfg.workers))))
            batches = [keys[i : i + bs] for i in range(0, len(keys), bs)]
            results = self._workers().map([[first[k] for k in b] for b in batches])
            self.stats["symbolic"] += len(keys)
            for batch, res in zip(batches, results):
                for key, r in zip(batch, res):
                    if isinstance(r, Killed):
                        v = Verdict("timeout" if r.reason == "timeout" else "parse_error", r.detail)
                    elif r[0] == "error":
                        v = Verdict("parse_error", f"checker failed: {r[1]}")
                    else:
                        v = Verdict(r[0], r[1])
                    for i in todo[key]:
                        out[i] = v
        return out  # type: ignore[return-value]

    def equal_answer_pairs(
        self, questions: Sequence[Sequence[str | None]], max_distinct: int
    ) -> list[list[tuple[str, str]]]:
        """Per question (its samples' answers), the pairs of canonical keys (`canonical`) whose
        answers are equal both ways, prediction against reference and back (math-verify is not
        symmetric: a merge must not depend on which answer plays the reference). Only questions
        with 2..`max_distinct` distinct keys are compared: n keys cost n(n-1) checks, all sent
        in one `verify` call (plain numbers take the fast path)."""
        pairs: list[tuple[str, str]] = []
        owners: list[tuple[int, str, str]] = []
        for qi, answers in enumerate(questions):
            spelled = vote_spellings(answers)
            if not 2 <= len(spelled) <= max_distinct:
                continue
            keys = sorted(spelled)
            for i, a in enumerate(keys):
                for b in keys[i + 1 :]:
                    pairs += [(spelled[a], spelled[b]), (spelled[b], spelled[a])]
                    owners.append((qi, a, b))
        out: list[list[tuple[str, str]]] = [[] for _ in questions]
        if pairs:
            verdicts = self.verify(pairs)
            for j, (qi, a, b) in enumerate(owners):
                if verdicts[2 * j].correct and verdicts[2 * j + 1].correct:
                    out[qi].append((a, b))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self.worker_cpu_s += self._pool.cpu_s
            self._pool = None

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- LLM judge

_JUDGE_SYSTEM = (
    "You grade a student's final answer to a math problem against the reference answer. Answer "
    "'yes' if the student's answer states the same result as the reference (the same values, "
    "the same set of solutions, or the same statement, however worded or formatted). Answer 'no' "
    "if it differs in any value, misses or adds a solution, or says something else. Reply with "
    "one word: yes or no."
)

JudgeFn = Callable[[list[tuple[str, str, str]]], list[bool | None]]
"""(problem, reference, answer) triples -> True (same), False (different), None (no reply)."""


def judge_messages(problem: str, reference: str, answer: str) -> list[dict]:
    """Chat messages asking the teacher whether `answer` states the reference answer."""
    return [
        {"role": "system", "content": _JUDGE_SYSTEM},
        {"role": "user", "content": f"Problem:\n{problem.strip()}\n\nReference answer:\n{reference.strip()}\n\n"
                                    f"Student answer:\n{answer.strip()}\n\n"
                                    "Does the student's answer state the same result as the reference? "
                                    "Answer yes or no."},
    ]


def engine_judge(engine: Any, cfg: AnswerJudgeConfig) -> JudgeFn:
    """A `JudgeFn` asking `engine` (a `TeacherEngine`) greedily, one request per triple; a failed
    request or a reply without yes/no is None (`decontam.parse_judge` reads the reply)."""
    from distill.curate.decontam import parse_judge
    from distill.teachers.base import Request, SamplingParams

    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_tokens, seed=0)

    def judge(triples: list[tuple[str, str, str]]) -> list[bool | None]:
        results = engine.generate([Request(judge_messages(*t)) for t in triples], params)
        return [parse_judge(r.completions[0].text) if r.ok and r.completions else None for r in results]

    return judge


_PROSE_WORDS = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?:[\s,;]+[A-Za-z]{2,}){2}")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox)\{([^{}]*)\}")


def free_text(reference: str) -> bool:
    """True when the reference is prose: three words in a row outside math (`$…$`, `\\[…\\]`,
    `\\(…\\)`) once `\\text{…}` is unwrapped ("There is no possible choice of $k$ ...",
    "3 is the only possible value"). math-verify reads such a reference from a fragment at best
    (`$k$` alone), so its `not_equal` against it says little."""
    return bool(_PROSE_WORDS.search(_TEXT_CMD.sub(r" \1 ", _MATH_ENV.sub(" ", reference))))


def judge_candidate(verdict: str, detail: str, reference: str) -> bool:
    """Whether a verdict against a real reference goes to the judge: the symbolic verifier could
    not decide (`parse_error`, `timeout`: not for a reason no judge changes, an answer over
    `max_answer_chars` or an empty reference), or it said `not_equal` to a `free_text`
    reference. Its `equal` verdicts stand (the partial-parse guard has vetted them)."""
    if verdict == "not_equal":
        return free_text(reference)
    return verdict in ("parse_error", "timeout") and "max_answer_chars" not in detail and detail != "empty reference"


def verify_records(
    records: list[dict], verifier: Verifier, cfg: VerifyConfig, judge: JudgeFn | None = None,
    stats: Counter[str] | None = None,
) -> list[dict]:
    """Generation records plus `pred_answer`, `label`, `agreement`, `verdict`, `verdict_detail`,
    `correct`, `pass_rate` and `n_samples`. `label`, `agreement`, `pass_rate` and `n_samples` are
    per question `id` (the same on all its samples).

    `label` is what the samples were checked against and `agreement` the share of the question's
    extracted answers (samples without one left out) that agree with it. `agreement` is null
    when no sample has an answer (and `label` too, without a reference):
    - with a reference, `label` is the reference and `agreement` the share of answers the
      verifier (or the judge) found equal to it. (Not the majority's share: with a reference the
      majority may be wrong, and how many answers match the truth is what a difficulty or
      consistency filter wants; `pass_rate` is the same count over all samples.)
    - without, `label` is the majority answer (`majority_vote`) and `agreement` its share, the
      number compared with `VerifyConfig.min_agreement`; below it, the label is still written
      (to show why) but every sample is `no_answer`.

    `judge` (see `engine_judge`), when given, decides the pairs against a reference that the
    symbolic path cannot (`judge_candidate`), at most `cfg.judge.max_pairs` distinct ones; its
    verdicts have a `verdict_detail` starting `judge:`. `stats`, when given, counts them
    (`judged_equal`, `judged_not_equal`, `judged_unreadable`, `judge_skipped`)."""
    out = [dict(r) for r in records]
    for r in out:
        r["pred_answer"] = extract_answer(
            r["response"] or "",
            r["reasoning"],
            methods=cfg.methods,
            use_reasoning=cfg.use_reasoning,
        )
    by_id: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(out):
        by_id[r["id"]].append(i)

    def has_ref(idx: list[int]) -> bool:
        return out[idx[0]]["answer"] is not None and bool(str(out[idx[0]]["answer"]).strip())

    # Questions without a reference vote; answers the symbolic path finds equal vote together.
    unlabelled = [[out[i]["pred_answer"] for i in idx] for idx in by_id.values() if not has_ref(idx)]
    same = iter(verifier.equal_answer_pairs(unlabelled, cfg.vote_max_distinct))

    pairs: list[tuple[str | None, str]] = []
    where: list[int] = []
    notes: dict[int, str] = {}
    for idx in by_id.values():
        ref = out[idx[0]]["answer"]
        if has_ref(idx):
            for i in idx:
                pairs.append((out[i]["pred_answer"], str(ref)))
                where.append(i)
            continue
        label, agreement = majority_vote([out[i]["pred_answer"] for i in idx], next(same))
        for i in idx:
            out[i]["label"], out[i]["agreement"] = label, agreement if label is not None else None
        if label is None or agreement < cfg.min_agreement:
            for i in idx:
                out[i]["verdict"] = "no_answer"
                out[i]["verdict_detail"] = "no reference and agreement below min"
            continue
        for i in idx:
            pairs.append((out[i]["pred_answer"], label))
            where.append(i)
            notes[i] = f"vs majority (agreement {agreement:.2f})"
    for i, v in zip(where, verifier.verify(pairs)):
        out[i]["verdict"] = v.code
        out[i]["verdict_detail"] = f"{notes[i]}: {v.detail}" if i in notes else v.detail
    if judge is not None:
        _apply_judge(out, [i for i in where if i not in notes], judge, cfg.judge.max_pairs, stats)
    for idx in by_id.values():
        n_correct = sum(out[i]["verdict"] == "equal" for i in idx)
        if has_ref(idx):
            answered = [i for i in idx if _has_answer(out[i]["pred_answer"])]
            for i in idx:
                out[i]["label"] = str(out[i]["answer"])
                out[i]["agreement"] = (sum(out[j]["verdict"] == "equal" for j in answered) / len(answered)
                                       if answered else None)
        for i in idx:
            out[i]["correct"] = out[i]["verdict"] == "equal"
            out[i]["n_samples"] = len(idx)
            out[i]["pass_rate"] = n_correct / len(idx)
    return out


def _apply_judge(out: list[dict], with_ref: list[int], judge: JudgeFn, max_pairs: int,
                 stats: Counter[str] | None) -> None:
    """Put the undecided pairs against a reference (records `with_ref`) to the judge, each
    distinct (problem, reference, answer) once, and write its verdicts."""
    todo: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i in with_ref:
        r = out[i]
        if judge_candidate(r["verdict"], r["verdict_detail"], str(r["answer"])):
            todo[(str(r["problem"]), str(r["answer"]), r["pred_answer"])].append(i)
    if not todo:
        return
    triples = sorted(todo)  # sorted: which ones the cap leaves out does not depend on record order
    asked, skipped = triples[:max_pairs], triples[max_pairs:]
    counts: Counter[str] = Counter(judge_skipped=sum(len(todo[t]) for t in skipped))
    for t, said in zip(asked, judge(asked)):
        for i in todo[t]:
            symbolic = f"{out[i]['verdict']}: {out[i]['verdict_detail']}"
            if said is None:
                counts["judged_unreadable"] += 1
                out[i]["verdict_detail"] += "; the judge's reply had no yes/no"
                continue
            counts["judged_equal" if said else "judged_not_equal"] += 1
            out[i]["verdict"] = "equal" if said else "not_equal"
            out[i]["verdict_detail"] = f"judge: {'yes' if said else 'no'} (symbolic path: {symbolic})"
    if stats is not None:
        stats.update({k: v for k, v in counts.items() if v})
