"""Question dedup: exact copies after normalisation, near copies by MinHash LSH (pure functions).

Two questions are exact duplicates when `normalize_text` maps them to the same string (case,
spacing, punctuation, LaTeX spelling, number formatting and prompt wrappers differ). They are near
duplicates when the Jaccard similarity of their word-shingle sets (word n-grams of `word_tokens`)
is at least `threshold`; MinHash LSH only proposes candidate pairs, and every pair is confirmed
with the exact Jaccard of the two shingle sets, so the LSH's false positives cost time, never a
wrongly dropped question.

Representative rule: questions are taken in the given input order and the first one of a group
wins. A later question is compared with the questions kept so far and dropped as a copy of the
most similar one (ties: the earliest). So every dropped question names a kept question it
duplicates, and the result depends on the input order and `seed`, nothing else (no Python hash
randomisation, no worker timing). Callers that want a stable choice pass the questions in source
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from distill.curate.normalize import normalize_text, words_of_normalized
from distill.section import Section

_SCHEME = "affine32"
"""datasketch's MinHash scheme (its 2.x default), named explicitly because signatures computed in
one process are turned back into MinHash objects in another."""


class DedupConfig(Section):
    exact: bool = True
    """Drop questions whose normalised text equals an earlier question's (cheap: one dict)."""

    near: bool = True
    """Drop questions whose word shingles overlap an earlier kept question's by at least
    `threshold` Jaccard (MinHash LSH candidates, confirmed exactly). Costs one MinHash per
    question (~0.4 ms for a GSM8K question, parallel per shard) and an in-memory LSH index."""

    threshold: float = 0.8
    """Jaccard similarity of word-shingle sets at or above which two questions are near
    duplicates. Lower merges more reworded copies but also distinct questions that share a
    template: on the 7,473 GSM8K train questions 0.8 merges one pair (a true duplicate), 0.7
    merges several distinct ones."""

    num_perm: int = Field(default=128, ge=16)
    """MinHash permutations: more give better LSH recall near the threshold at linear cost in
    time and signature memory (4 bytes each)."""

    shingle: int = Field(default=2, ge=1)
    """Word n-gram size of the shingles. One edited word changes up to n shingles, so larger n
    misses one-word edits of short questions (3 misses ~1 in 20 on GSM8K, 2 almost none);
    1 ignores word order entirely."""

    seed: int = 1
    """MinHash permutation seed. The result depends on it only through which near-threshold pairs
    the LSH proposes; exact Jaccard decides."""

    @model_validator(mode="after")
    def _check(self) -> "DedupConfig":
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"curate.dedup.threshold={self.threshold}: must be in (0, 1]")
        return self


@dataclass(frozen=True)
class Duplicate:
    """Why a question was dropped."""

    kept_id: str
    """The kept question it duplicates."""
    method: Literal["exact", "near"]
    score: float
    """Exact Jaccard similarity of the two word-shingle sets (1.0 for exact duplicates)."""
    estimate: float | None = None
    """MinHash estimate of the same similarity (near duplicates only)."""


@dataclass
class DedupResult:
    kept: list[str] = field(default_factory=list)
    """Ids of kept questions, in input order."""
    dropped: dict[str, Duplicate] = field(default_factory=dict)
    """Dropped id -> its kept representative, method and similarity."""


def shingle_set(normalized: str, n: int) -> set[str]:
    """Word n-grams of an already normalised text, each joined by spaces (the whole text as one
    shingle if it has fewer than n words; empty for a text without words)."""
    words = words_of_normalized(normalized)
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


LSH_RECALL = 0.99
"""Least probability that the LSH proposes a pair whose Jaccard is exactly at the threshold
(higher above it). datasketch's default band layout balances false positives against false
negatives and finds only ~40% of pairs at the threshold; here false positives cost just an exact
Jaccard check, so the layout is chosen for recall."""


def lsh_params(threshold: float, num_perm: int, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bands, rows per band) for MinHash LSH: the most rows per band (fewest spurious candidates)
    such that a pair at Jaccard `threshold` collides in at least one band with probability
    >= `recall`, i.e. 1 - (1 - threshold**rows)**bands >= recall, bands = num_perm // rows."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def minhash_signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """MinHash signatures of the texts' word shingles, `uint32[len(texts), cfg.num_perm]`.

    Pure and row-independent, so a stage can compute them per shard in parallel and concatenate.
    Texts are normalised here, the same way `dedup_questions` does."""
    from datasketch import MinHash

    out = np.empty((len(texts), cfg.num_perm), dtype=np.uint32)
    template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME)
    for row, text in enumerate(texts):
        # Sharing the template's permutations skips re-drawing them per text (~40% of the cost).
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=template.permutations, scheme=_SCHEME)
        m.update_batch([s.encode("utf-8") for s in sorted(shingle_set(normalize_text(text), cfg.shingle))])
        out[row] = m.hashvalues
    return out


def dedup_questions(
    ids: list[str], texts: list[str], cfg: DedupConfig, signatures: np.ndarray | None = None
) -> DedupResult:
    """Exact then near dedup of questions; the first of each group in input order is kept.

    `signatures` (from `minhash_signatures(texts, cfg)`, rows aligned with `texts`) may be passed
    when computed elsewhere; they are computed here otherwise. Each dropped question names the
    kept question it duplicates: for near copies, the most similar kept one (ties: earliest)."""
    if len(ids) != len(texts):
        raise ValueError(f"dedup_questions: {len(ids)} ids but {len(texts)} texts")
    if len(set(ids)) != len(ids):
        raise ValueError("dedup_questions: question ids must be unique")
    result = DedupResult()
    normalized = [normalize_text(t) for t in texts]

    candidates = []
    first_of: dict[str, int] = {}
    for i, norm in enumerate(normalized):
        if cfg.exact and norm in first_of:
            result.dropped[ids[i]] = Duplicate(ids[first_of[norm]], "exact", 1.0)
        else:
            first_of.setdefault(norm, i)
            candidates.append(i)

    if not cfg.near:
        result.kept = [ids[i] for i in candidates]
        return result

    if signatures is None:
        signatures = minhash_signatures(texts, cfg)
    if signatures.shape != (len(texts), cfg.num_perm):
        raise ValueError(
            f"dedup_questions: signatures have shape {signatures.shape}, expected "
            f"({len(texts)}, {cfg.num_perm}) (curate.dedup.num_perm)"
        )
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=cfg.num_perm, params=lsh_params(cfg.threshold, cfg.num_perm))
    permutations = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME).permutations
    shingles: dict[int, set[str]] = {}
    for i in candidates:
        shingles[i] = shingle_set(normalized[i], cfg.shingle)
        m = MinHash(seed=cfg.seed, hashvalues=signatures[i], permutations=permutations, scheme=_SCHEME)
        best = None
        # The LSH returns an unordered set: sort so ties resolve to the earliest kept question.
        for j in sorted(lsh.query(m)):
            score = jaccard(shingles[i], shingles[j])
            if score >= cfg.threshold and (best is None or score > best[1]):
                best = (j, score)
        if best is None:
            lsh.insert(i, m, check_duplication=False)
            result.kept.append(ids[i])
        else:
            j, score = best
            estimate = float(np.mean(signatures[i] == signatures[j]))
            result.dropped[ids[i]] = Duplicate(ids[j], "near", score, estimate)
    return result
