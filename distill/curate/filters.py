"""Sample filters: which verified teacher samples are worth training on (pure functions).

Two kinds of filter, all registered in `FILTERS` under the name of their config field:

- per-sample `(record, cfg) -> reason | None` look at one sample (truncated, wrong answer,
  repetition loops, length, think tags, garbage text);
- per-question `(records, cfg) -> {position: reason}` look at the surviving samples of one
  question together (at most k per question, difficulty band).

`apply_filters` runs the per-sample filters first (the first failing one names the reason), then
the per-question filters on what survived. A reason is `"<filter name>: <detail>"`, e.g.
`"repetition: 41% of 8-grams repeated (max 20%)"`; the funnel report counts by the name.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Literal

from pydantic import Field, field_validator, model_validator

from distill.curate.dedup import jaccard, shingle_set
from distill.curate.normalize import normalize_text, word_tokens
from distill.section import Section

# ----------------------------------------------------------------------------- config


class TruncatedFilter(Section):
    enabled: bool = True
    """Reject samples cut off by the token limit (`finish_reason` = `length`): a chain of thought
    that stops mid-thought teaches the student to stop mid-thought."""

    require_answer: bool = True
    """Also reject samples with no extractable final answer (`pred_answer` null), the other
    face of a truncated or rambling sample."""


class WrongAnswerFilter(Section):
    enabled: bool = True
    """Reject samples whose verdict is not `equal` (wrong, no answer, verifier timeout or parse
    error). Disable only to keep incorrect samples on purpose (e.g. for preference data)."""


class RepetitionFilter(Section):
    enabled: bool = True
    """Reject degenerate loops: too many repeated word n-grams. Costs normalising the completion
    and one pass over its words (~1-2 ms per 1,000 words, most of it normalising)."""

    n: int = Field(default=8, ge=1)
    """Word n-gram size. Small n also counts the ordinary reuse of phrases and numbers in long
    reasoning ("so the total is"); large n only counts verbatim passages."""

    max_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    """Largest allowed share of n-grams that repeat an earlier n-gram of the same text
    (1 - distinct/total). A loop drives it towards 1; healthy text with parallel case analyses
    repeats too (olympiad reference solutions reach 0.4 at n=8), so lower values cost real
    samples."""

    tail_words: int | None = Field(default=400, ge=1)
    """Also apply `max_ratio` to the last this many words alone (unset: whole text only). A
    loop at the end of a long healthy chain of thought is diluted in the whole-text ratio but
    dominates the tail."""

    min_words: int = Field(default=50, ge=1)
    """Texts (and tails) with fewer words are not judged: a ratio over a handful of n-grams is
    noise."""


class LengthFilter(Section):
    enabled: bool = True
    """Reject samples outside [min_tokens, max_tokens] completion tokens (`n_tokens`)."""

    min_tokens: int = Field(default=1, ge=0)
    """Fewest completion tokens; the default 1 only rejects empty completions."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Most completion tokens (unset: no limit). Set it to the student's training sequence
    length minus the prompt, so over-long samples are counted here, not dropped later."""


class ThinkTagsFilter(Section):
    enabled: bool = True
    """Reject completions whose `<think>`/`</think>` tags are malformed."""

    require: bool = False
    """Also reject completions without a reasoning block. Off by default: teachers without a
    thinking mode produce no tags, and those samples are fine for response-only SFT."""

    implicit_open: bool = True
    """Accept a completion that starts inside the reasoning (a `</think>` with no `<think>`
    before it): R1-style chat templates put the opening tag in the prompt."""

    max_blocks: int = Field(default=1, ge=1)
    """Most reasoning blocks per completion; several blocks usually mean the model restarted."""


class GarbageFilter(Section):
    enabled: bool = True
    """Reject wrong-language or garbage text (byte soup, emoji runs, mojibake, letter runs
    without spaces). Tuned so LaTeX-heavy mathematics passes: on the 2,800 reference solutions
    of the math benchmarks (MATH-500, Minerva, OlympiadBench, AIME, GSM8K) nothing is rejected."""

    min_text_ratio: float = Field(default=0.95, ge=0.0, le=1.0)
    """Least share of non-space characters that are letters, digits, punctuation or math /
    currency / modifier symbols (LaTeX's `\\ { } ^ _ $` count as text). Emoji, box drawing,
    control, private-use and unassigned code points count against it."""

    max_non_latin: float = Field(default=0.05, ge=0.0, le=1.0)
    """Largest share of letters outside the Latin, Greek and math-letter blocks (catches a
    model switching into another language). Set 1.0 for corpora in other scripts."""

    max_word_chars: int = Field(default=64, ge=1)
    """Longest run of letters/digits without a space or symbol. The longest in the reference
    solutions above is 21; base64 blobs and `aaaa…` loops are far longer."""

    max_replacement_chars: int = Field(default=0, ge=0)
    """Most U+FFFD replacement characters (each is a byte sequence that failed to decode)."""


class MaxPerQuestionFilter(Section):
    enabled: bool = False
    """Keep at most `k` of the samples that survived the per-sample filters (with wrong_answer
    on, those are the correct ones); the others are rejected. Off by default: every correct
    sample is kept."""

    k: int = Field(default=4, ge=1)
    """Samples kept per question."""

    strategy: Literal["shortest", "diverse"] = "diverse"
    """`shortest`: the k with fewest tokens (cheaper training, terser student). `diverse`: start
    from the shortest, then repeatedly add the sample farthest (max-min word-shingle Jaccard
    distance) from those chosen; costs O(k * samples) set comparisons per question."""

    shingle: int = Field(default=4, ge=1)
    """Word n-gram size of the shingles `diverse` compares."""


class DifficultyFilter(Section):
    enabled: bool = True
    """Reject whole questions by pass rate (`pass_rate` = correct / samples, from verify)."""

    drop_all_correct: bool = False
    """Reject questions every sample solved (too easy to teach much). Off by default."""

    drop_all_wrong: bool = True
    """Reject questions no sample solved (only matters when wrong_answer is off: otherwise
    their samples are already rejected as wrong)."""

    min_pass_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Reject questions with a lower pass rate."""

    max_pass_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    """Reject questions with a higher pass rate."""

    min_samples: int = Field(default=2, ge=1)
    """Questions with fewer samples are not judged: with one sample every question is all
    correct or all wrong, and `drop_all_correct` would empty the set."""

    @model_validator(mode="after")
    def _check(self) -> "DifficultyFilter":
        if self.min_pass_rate > self.max_pass_rate:
            raise ValueError(
                f"curate.filters.difficulty.min_pass_rate={self.min_pass_rate} > "
                f"curate.filters.difficulty.max_pass_rate={self.max_pass_rate}: the band is empty"
            )
        return self


# ----------------------------------------------------------------------------- per-sample filters


def check_truncated(record: dict, cfg: TruncatedFilter) -> str | None:
    if record["finish_reason"] == "length":
        return f"finish_reason=length at {record['n_tokens']} tokens"
    if cfg.require_answer and record["pred_answer"] is None:
        return "no final answer"
    return None


def check_wrong_answer(record: dict, cfg: WrongAnswerFilter) -> str | None:
    if record["verdict"] == "equal":
        return None
    return f"{record['verdict']} (predicted {record['pred_answer']!r}, reference {record['answer']!r})"


def repeated_ngram_ratio(words: list[str], n: int) -> float:
    """Share of the word n-grams of `words` that repeat an earlier one: 1 - distinct/total
    (0 when there are fewer than n words)."""
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    # zip of n shifted views builds the n-gram tuples in C: ~20% faster than slicing per position.
    # Exact tuples, not hashes of them: a hash collision would change a ratio.
    distinct = len(set(zip(*(words[i:] for i in range(n)))))
    return 1.0 - distinct / total


def check_repetition(record: dict, cfg: RepetitionFilter) -> str | None:
    words = word_tokens(record["completion"])
    spans = [("", words)]
    if cfg.tail_words is not None and len(words) > cfg.tail_words:
        spans.append((f" in the last {cfg.tail_words} words", words[-cfg.tail_words :]))
    for where, span in spans:
        if len(span) < cfg.min_words:
            continue
        ratio = repeated_ngram_ratio(span, cfg.n)
        if ratio > cfg.max_ratio:
            return f"{ratio:.0%} of {cfg.n}-grams repeated{where} (max {cfg.max_ratio:.0%})"
    return None


def check_length(record: dict, cfg: LengthFilter) -> str | None:
    n = record["n_tokens"]
    if n < cfg.min_tokens:
        return f"{n} tokens < min {cfg.min_tokens}"
    if cfg.max_tokens is not None and n > cfg.max_tokens:
        return f"{n} tokens > max {cfg.max_tokens}"
    return None


def think_tag_problem(text: str, require: bool, implicit_open: bool, max_blocks: int) -> str | None:
    """What is wrong with the `<think>` / `</think>` tags of `text`, or None if they are fine:
    every block opened then closed, no nesting, at most `max_blocks` blocks, at least one if
    `require`. With `implicit_open`, a text whose first tag is `</think>` counts as opened."""
    tags = []
    pos = 0
    while True:
        i = text.find("<think>", pos)
        j = text.find("</think>", pos)
        if i < 0 and j < 0:
            break
        if j < 0 or (0 <= i < j):
            tags.append("open")
            pos = i + len("<think>")
        else:
            tags.append("close")
            pos = j + len("</think>")
    if implicit_open and tags and tags[0] == "close":
        tags.insert(0, "open")
    blocks = 0
    depth = 0
    for tag in tags:
        if tag == "open":
            if depth:
                return "nested <think>"
            depth = 1
        else:
            if not depth:
                return "</think> without <think>"
            depth = 0
            blocks += 1
    if depth:
        return "<think> never closed"
    if blocks > max_blocks:
        return f"{blocks} think blocks (max {max_blocks})"
    if require and not blocks:
        return "no <think> block"
    return None


def check_think_tags(record: dict, cfg: ThinkTagsFilter) -> str | None:
    return think_tag_problem(record["completion"], cfg.require, cfg.implicit_open, cfg.max_blocks)


def _is_latin_letter(cp: int) -> bool:
    # Latin blocks up to IPA extensions and Latin Extended Additional, Greek (math variables),
    # letterlike symbols (ℝ, ℕ) and mathematical alphanumerics (𝑥).
    return (
        cp < 0x250 or 0x370 <= cp < 0x400 or 0x1E00 <= cp < 0x1F00 or 0x2100 <= cp < 0x2150
        or 0x1D400 <= cp < 0x1D800
    )


_TEXT_CATEGORIES = frozenset("Lu Ll Lt Lm Lo Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk".split())


@dataclass(frozen=True)
class TextStats:
    """Character statistics `check_garbage` judges (see `text_stats`)."""

    text_ratio: float
    non_latin: float
    longest_word: int
    replacement_chars: int


# The classes of the ASCII characters, which are nearly all of a chain of thought, for counting
# them with `bytes.translate` (C, ~1 ns a character) in `text_stats`.
_ASCII = [chr(c) for c in range(128)]
_ASCII_SPACE = "".join(c for c in _ASCII if c.isspace()).encode()
_ASCII_NON_TEXT = "".join(  # the control characters
    c for c in _ASCII if not c.isspace() and unicodedata.category(c) not in _TEXT_CATEGORIES).encode()
_ASCII_LETTERS = "".join(c for c in _ASCII if c.isalpha()).encode()  # all Latin
_ASCII_NON_ALNUM_TO_SPACE = bytes(c if c < 128 and chr(c).isalnum() else 32 for c in range(256))
_NON_ASCII_RUN = re.compile("[^\x00-\x7f][^\x00-\x7f]*")  # `[..][..]*`: see normalize._GREEK_RUN_RE


def _count_of(data: bytes, chars: bytes) -> int:
    return len(data) - len(data.translate(None, chars))


def _longest_alnum_run(text: str) -> int:
    """Longest run of characters for which `str.isalnum()` holds. Found on an ASCII stand-in of
    the text (each non-ASCII character -> `a` if alphanumeric, else a space) with
    `bytes.translate` and `split`: ~2x faster than a regex `findall` of the runs."""
    stand_in = _NON_ASCII_RUN.sub(lambda m: "".join("a" if c.isalnum() else " " for c in m[0]), text)
    return max(map(len, stand_in.encode("ascii").translate(_ASCII_NON_ALNUM_TO_SPACE).split()), default=0)


def text_stats(text: str) -> TextStats:
    """Share of non-space characters in text categories, share of letters outside the Latin /
    Greek / math blocks, longest letter-or-digit run, count of U+FFFD.

    ASCII characters are counted by class in C (`bytes.translate`), the others with `Counter` and
    one category lookup per distinct character. A lookup per character made this filter the
    slowest curation step; this costs ~1/3 of `Counter` over the whole text plus a regex for the
    runs (~0.5 ms on a 3,000-word chain of thought)."""
    ascii_bytes = text.encode("ascii", "ignore")
    n_visible = len(ascii_bytes) - _count_of(ascii_bytes, _ASCII_SPACE)
    n_text = n_visible - _count_of(ascii_bytes, _ASCII_NON_TEXT)
    n_letters = _count_of(ascii_bytes, _ASCII_LETTERS)
    n_foreign = 0
    for ch, n in Counter("".join(_NON_ASCII_RUN.findall(text))).items():
        if ch.isspace():
            continue
        n_visible += n
        cat = unicodedata.category(ch)
        if cat in _TEXT_CATEGORIES:
            n_text += n
        if cat[0] == "L":
            n_letters += n
            if not _is_latin_letter(ord(ch)):
                n_foreign += n
    return TextStats(
        text_ratio=n_text / n_visible if n_visible else 1.0,
        non_latin=n_foreign / n_letters if n_letters else 0.0,
        longest_word=_longest_alnum_run(text),
        replacement_chars=text.count("\ufffd"),
    )


def check_garbage(record: dict, cfg: GarbageFilter) -> str | None:
    s = text_stats(record["completion"])
    if s.replacement_chars > cfg.max_replacement_chars:
        return f"{s.replacement_chars} replacement characters (max {cfg.max_replacement_chars})"
    if s.text_ratio < cfg.min_text_ratio:
        return f"{s.text_ratio:.0%} text characters (min {cfg.min_text_ratio:.0%})"
    if s.non_latin > cfg.max_non_latin:
        return f"{s.non_latin:.0%} of letters non-Latin (max {cfg.max_non_latin:.0%})"
    if s.longest_word > cfg.max_word_chars:
        return f"{s.longest_word}-character word (max {cfg.max_word_chars})"
    return None


# ----------------------------------------------------------------------------- per-question filters


def select_diverse(texts: list[str], lengths: list[int], k: int, shingle: int) -> list[int]:
    """Positions of k texts chosen greedily for diversity: first the shortest, then each time
    the text whose nearest chosen text (Jaccard similarity of word shingles) is farthest. Ties go
    to the shorter text, then the earlier position, so the choice is deterministic."""
    if len(texts) <= k:
        return list(range(len(texts)))
    sets = [shingle_set(normalize_text(t), shingle) for t in texts]
    first = min(range(len(texts)), key=lambda i: (lengths[i], i))
    chosen = [first]
    # Nearest-chosen distance per candidate, updated with each pick: O(k * n) comparisons.
    nearest = [1.0 - jaccard(sets[i], sets[first]) for i in range(len(texts))]
    while len(chosen) < k:
        best = max((i for i in range(len(texts)) if i not in chosen), key=lambda i: (nearest[i], -lengths[i], -i))
        chosen.append(best)
        for i in range(len(texts)):
            nearest[i] = min(nearest[i], 1.0 - jaccard(sets[i], sets[best]))
    return sorted(chosen)


def check_max_per_question(records: list[dict], cfg: MaxPerQuestionFilter) -> dict[int, str]:
    if len(records) <= cfg.k:
        return {}
    lengths = [r["n_tokens"] for r in records]
    if cfg.strategy == "shortest":
        keep = set(sorted(range(len(records)), key=lambda i: (lengths[i], i))[: cfg.k])
    else:
        keep = set(select_diverse([r["completion"] for r in records], lengths, cfg.k, cfg.shingle))
    reason = f"{cfg.k} of {len(records)} kept ({cfg.strategy})"
    return {i: reason for i in range(len(records)) if i not in keep}


def check_difficulty(records: list[dict], cfg: DifficultyFilter) -> dict[int, str]:
    if not records:
        return {}
    rate, n = records[0]["pass_rate"], records[0]["n_samples"]
    if n < cfg.min_samples:
        return {}
    reason = None
    if cfg.drop_all_correct and rate >= 1.0:
        reason = f"all {n} samples correct (too easy)"
    elif cfg.drop_all_wrong and rate <= 0.0:
        reason = f"no sample of {n} correct"
    elif not cfg.min_pass_rate <= rate <= cfg.max_pass_rate:
        reason = f"pass rate {rate:.2f} outside [{cfg.min_pass_rate:g}, {cfg.max_pass_rate:g}]"
    return {i: reason for i in range(len(records))} if reason else {}


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Filter:
    """A registered filter. Calling it returns reasons already prefixed with its name, so the
    reason code always equals the registry key."""

    name: str
    kind: Literal["sample", "question"]
    fn: Callable

    def __call__(self, records, cfg):
        out = self.fn(records, cfg)
        if self.kind == "sample":
            return None if out is None else f"{self.name}: {out}"
        return {i: f"{self.name}: {detail}" for i, detail in out.items()}


FILTERS: dict[str, Filter] = {
    f.name: f
    for f in [
        Filter("truncated", "sample", check_truncated),
        Filter("wrong_answer", "sample", check_wrong_answer),
        Filter("length", "sample", check_length),
        Filter("think_tags", "sample", check_think_tags),
        Filter("garbage", "sample", check_garbage),
        Filter("repetition", "sample", check_repetition),
        Filter("difficulty", "question", check_difficulty),
        Filter("max_per_question", "question", check_max_per_question),
    ]
}
"""Every filter a config may name, in default order: cheap per-sample checks first (the first
failing filter names the reason, so the order decides which reason a sample with several faults
gets), then the per-question filters."""


def filter_names() -> list[str]:
    return list(FILTERS)


class FilterConfig(Section):
    order: list[str] = Field(default_factory=filter_names)
    """Run order. Per-sample filters always run before per-question ones; within each kind,
    filters run in this order (the first failing one names a sample's reason). Filters left out
    run after the named ones, in the default order. Whether a filter runs is its `enabled`."""

    truncated: TruncatedFilter = Field(default_factory=TruncatedFilter)
    """Samples cut off by the token limit or without a final answer."""

    wrong_answer: WrongAnswerFilter = Field(default_factory=WrongAnswerFilter)
    """Samples the verifier did not judge correct."""

    length: LengthFilter = Field(default_factory=LengthFilter)
    """Samples outside a completion-token band."""

    think_tags: ThinkTagsFilter = Field(default_factory=ThinkTagsFilter)
    """Malformed `<think>` tags."""

    garbage: GarbageFilter = Field(default_factory=GarbageFilter)
    """Wrong-language or garbage text."""

    repetition: RepetitionFilter = Field(default_factory=RepetitionFilter)
    """Degenerate repetition loops."""

    difficulty: DifficultyFilter = Field(default_factory=DifficultyFilter)
    """Questions outside a pass-rate band (too easy / never solved)."""

    max_per_question: MaxPerQuestionFilter = Field(default_factory=MaxPerQuestionFilter)
    """At most k samples per question."""

    @field_validator("order")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [n for n in v if n not in FILTERS]
        if unknown:
            raise ValueError(f"curate.filters.order: unknown filter(s) {unknown}; known: {', '.join(FILTERS)}")
        dups = sorted({n for n in v if v.count(n) > 1})
        if dups:
            raise ValueError(f"curate.filters.order: {dups} named more than once")
        return v

    def active(self, kind: str) -> list[tuple[Filter, Section]]:
        """The enabled filters of one kind, in run order, each with its config section."""
        names = self.order + [n for n in FILTERS if n not in self.order]
        sections = [(FILTERS[n], getattr(self, n)) for n in names if FILTERS[n].kind == kind]
        return [(f, s) for f, s in sections if s.enabled]


# ----------------------------------------------------------------------------- apply


def apply_filters(records: list[dict], cfg: FilterConfig) -> tuple[list[dict], list[dict]]:
    """Split samples into (kept, rejected); rejected records are copies with a `reason` column.

    Samples are grouped by question id; per-sample filters run first (the first failing one
    gives the reason), then per-question filters on each question's survivors. Both outputs are
    ordered by (id, sample_idx), whatever the input order. Input records are not modified.
    """
    sample_filters = cfg.active("sample")
    question_filters = cfg.active("question")
    kept: list[dict] = []
    rejected: list[dict] = []
    ordered = sorted(records, key=lambda r: (r["id"], r["sample_idx"]))
    for _, group in groupby(ordered, key=lambda r: r["id"]):
        survivors = []
        for rec in group:
            reason = next((r for f, c in sample_filters if (r := f(rec, c)) is not None), None)
            if reason is None:
                survivors.append(rec)
            else:
                rejected.append({**rec, "reason": reason})
        for f, c in question_filters:
            drop = f(survivors, c)
            rejected.extend({**rec, "reason": drop[i]} for i, rec in enumerate(survivors) if i in drop)
            survivors = [rec for i, rec in enumerate(survivors) if i not in drop]
        kept.extend(survivors)
    rejected.sort(key=lambda r: (r["id"], r["sample_idx"]))
    return kept, rejected
