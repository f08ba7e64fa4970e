"""Question dedup on real GSM8K-train questions with injected exact, reformatted and near copies."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import REPO
from distill.curate.dedup import (
    DedupConfig, dedup_questions, jaccard, lsh_params, minhash_signatures, shingle_set,
)
from distill.curate.normalize import normalize_text


def _load(path, lo: int, hi: int) -> tuple[list[str], list[str]]:
    recs = [json.loads(line) for line in open(path)][lo:hi]
    return [r["id"] for r in recs], [r["problem"] for r in recs]


def _near_copy(text: str, kind: str) -> str:
    words = text.split()
    mid = len(words) // 2
    if kind == "substitute":
        words[mid] = "Kim"
    elif kind == "delete":
        del words[mid]
    elif kind == "insert":
        words.insert(mid, "exactly")
    elif kind == "append":
        words += ["Show", "your", "reasoning", "briefly."]
    return " ".join(words)


def _reformat(text: str) -> str:
    """Same question, retyped: prompt wrapper, upper case, doubled spaces, unicode quotes."""
    return "Question: " + text.upper().replace(" ", "  ").replace("'", "\u2019") + "\nLet's think step by step."


KINDS = ["verbatim", "reformatted", "substitute", "delete", "insert", "append"]


@pytest.fixture(scope="module")
def injected(gsm8k_train):
    """2,000 real questions plus 240 copies of 240 of them (40 per kind), appended at the end."""
    ids, texts = _load(gsm8k_train, 0, 2000)
    rng = random.Random(0)
    truth = {}
    for n, i in enumerate(rng.sample(range(len(ids)), 240)):
        kind = KINDS[n % len(KINDS)]
        copy = texts[i] if kind == "verbatim" else _reformat(texts[i]) if kind == "reformatted" else _near_copy(texts[i], kind)
        truth[f"copy-{kind}-{ids[i]}"] = (ids[i], kind)
        ids.append(f"copy-{kind}-{ids[i]}")
        texts.append(copy)
    cfg = DedupConfig()
    return ids, texts, truth, cfg, dedup_questions(ids, texts, cfg)


def test_config_validation():
    with pytest.raises(ValidationError, match=r"curate.dedup.threshold=1.5: must be in \(0, 1\]"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValidationError):
        DedupConfig(num_perm=4)
    with pytest.raises(ValidationError):
        DedupConfig(treshold=0.7)
    for name, info in DedupConfig.model_fields.items():
        assert info.description, f"curate.dedup.{name} has no docstring"


def test_injected_copies_are_found(injected):
    ids, texts, truth, cfg, result = injected
    pos = {q: i for i, q in enumerate(ids)}
    missed = []
    for copy_id, (orig_id, kind) in truth.items():
        d = result.dropped.get(copy_id)
        if kind in ("verbatim", "reformatted"):
            assert d is not None and (d.kept_id, d.method, d.score) == (orig_id, "exact", 1.0), (kind, d)
            continue
        true_j = jaccard(
            shingle_set(normalize_text(texts[pos[orig_id]]), cfg.shingle),
            shingle_set(normalize_text(texts[pos[copy_id]]), cfg.shingle),
        )
        if d is None:
            missed.append((kind, true_j))
            assert true_j < cfg.threshold, f"{copy_id}: Jaccard {true_j:.3f} >= threshold but not found"
            continue
        assert (d.kept_id, d.method) == (orig_id, "near")
        assert d.score == pytest.approx(true_j, abs=1e-12)
        assert d.estimate == pytest.approx(true_j, abs=0.15)  # 128 permutations: sd ~0.035
    # Only one-word edits of the shortest questions fall below the threshold.
    assert len(missed) <= 4, missed
    assert set(result.kept) | set(result.dropped) == set(ids)
    assert not set(result.kept) & set(result.dropped)
    assert result.kept == [q for q in ids if q in set(result.kept)]  # input order


def test_distinct_real_questions_are_not_merged(injected):
    ids, texts, truth, cfg, result = injected
    false_merges = [(q, d) for q, d in result.dropped.items() if q not in truth]
    assert len(false_merges) <= 2, false_merges  # measured: 0 of the 2,000


def test_a_real_duplicate_in_gsm8k_train_is_found(gsm8k_train):
    # GSM8K train holds the same cassette-tape question twice, once for Josie and once for Amanda.
    ids, texts = _load(gsm8k_train, 0, 7473)
    pick = [ids.index("gsm8k-train-2483"), ids.index("gsm8k-train-6691"), 0, 1, 2]
    result = dedup_questions([ids[i] for i in pick], [texts[i] for i in pick], DedupConfig())
    assert list(result.dropped) == ["gsm8k-train-6691"]
    assert result.dropped["gsm8k-train-6691"].kept_id == "gsm8k-train-2483"


def test_lsh_finds_pairs_at_the_threshold():
    # 200 pairs of synthetic texts whose shingle sets have Jaccard exactly 0.8 (80 shared words of
    # 100): the LSH must propose nearly all of them (designed for >= 99%).
    rng = random.Random(1)
    ids, texts = [], []
    for p in range(200):
        vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(9)) for _ in range(100)]
        ids += [f"a{p}", f"b{p}"]
        texts += [" ".join(vocab[:90]), " ".join(vocab[10:])]
    cfg = DedupConfig(shingle=1, threshold=0.8)
    result = dedup_questions(ids, texts, cfg)
    found = [q for q, d in result.dropped.items() if d.kept_id == "a" + q[1:] and d.score == pytest.approx(0.8)]
    assert len(found) >= 195, len(found)
    assert len(result.dropped) == len(found)  # no cross-pair merges among unrelated texts


def test_lsh_params_reach_the_recall():
    for num_perm in (16, 128, 256):
        for t in (0.5, 0.7, 0.8, 0.9, 0.95):
            bands, rows = lsh_params(t, num_perm)
            assert bands * rows <= num_perm
            assert 1 - (1 - t**rows) ** bands >= 0.99


def test_signatures_are_rowwise_and_reusable(injected):
    ids, texts, truth, cfg, result = injected
    sub = texts[:300]
    whole = minhash_signatures(sub, cfg)
    assert whole.shape == (300, cfg.num_perm) and whole.dtype == np.uint32
    shards = np.concatenate([minhash_signatures(sub[i : i + 70], cfg) for i in range(0, 300, 70)])
    assert np.array_equal(whole, shards)
    again = dedup_questions(ids[:300], sub, cfg, signatures=whole)
    assert again == dedup_questions(ids[:300], sub, cfg)
    with pytest.raises(ValueError, match="curate.dedup.num_perm"):
        dedup_questions(ids[:300], sub, cfg, signatures=whole[:, :64])


def test_first_in_input_order_is_the_representative(injected):
    ids, texts, truth, cfg, result = injected
    rev = dedup_questions(ids[::-1], texts[::-1], cfg)
    # Each injected group is a pair, so reversing the order swaps the roles within every pair.
    pairs = {frozenset((q, d.kept_id)) for q, d in result.dropped.items()}
    assert {frozenset((q, d.kept_id)) for q, d in rev.dropped.items()} == pairs
    for copy_id, (orig_id, _) in truth.items():
        assert rev.dropped[orig_id].kept_id == copy_id


def test_flags_and_seed(injected):
    ids, texts, truth, cfg, result = injected
    no_exact = dedup_questions(ids, texts, cfg.model_copy(update={"exact": False}))
    assert set(no_exact.dropped) == set(result.dropped)  # identical normal forms have Jaccard 1
    assert {d.method for d in no_exact.dropped.values()} == {"near"}
    only_exact = dedup_questions(ids, texts, cfg.model_copy(update={"near": False}))
    assert set(only_exact.dropped) == {q for q, (_, k) in truth.items() if k in ("verbatim", "reformatted")}
    other_seed = cfg.model_copy(update={"seed": 7})
    assert not np.array_equal(minhash_signatures(texts[:5], other_seed), minhash_signatures(texts[:5], cfg))
    reseeded = dedup_questions(ids, texts, other_seed)
    assert {q: (d.kept_id, d.score) for q, d in reseeded.dropped.items()} == {
        q: (d.kept_id, d.score) for q, d in result.dropped.items()
    }


_SUMMARY = """
import hashlib, json, sys
sys.path.insert(0, {tests!r})
from test_dedup import _load, _near_copy
from distill.curate.dedup import DedupConfig, dedup_questions, minhash_signatures
ids, texts = _load({path!r}, 0, 300)
ids += [q + "-copy" for q in ids[:50]]
texts += [_near_copy(t, "substitute") for t in texts[:50]]
cfg = DedupConfig()
r = dedup_questions(ids, texts, cfg)
print(hashlib.sha256(minhash_signatures(texts, cfg).tobytes()).hexdigest(),
      json.dumps({{q: [d.kept_id, d.method, d.score, d.estimate] for q, d in r.dropped.items()}}, sort_keys=True))
"""


def test_same_result_under_different_python_hash_seeds(gsm8k_train):
    code = _SUMMARY.format(tests=str(REPO / "tests"), path=str(gsm8k_train))
    outs = []
    for seed in ("1", "2"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1]
    assert len(json.loads(outs[0].split(" ", 1)[1])) >= 45  # the 50 copies, minus short-question misses


def test_stage_steps_decide_as_the_pure_function(injected, tmp_path):
    """The dedup stage's partitioned steps (sketch each partition, decide from the sketch files)
    drop exactly what `dedup_questions` drops, naming the same kept question and score."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.stages.dedup import _decide, _sketch_partition
    from distill.stages.derived import Unit
    from distill.store import partition_of

    ids, texts, truth, cfg, result = injected
    parts = partition_of(ids, 5)
    units = []
    for p in range(5):
        rows = [(q, t) for q, t, k in zip(ids, texts, parts) if k == p]
        path = tmp_path / f"in-{p}.parquet"
        # Two samples of each question, as the stage sees them.
        pq.write_table(pa.table({"id": [q for q, _ in rows for _ in (0, 1)], "problem": [t for _, t in rows for _ in (0, 1)]}), path)
        units.append(Unit(p, [str(path)]))
    source_ids = pa.array(ids)
    files = [_sketch_partition(cfg, source_ids, str(tmp_path), u)[1] for u in units]
    decided = _decide([tmp_path / f for f in files], cfg)
    assert decided == {q: (d.kept_id, d.method, d.score) for q, d in result.dropped.items()}
    assert len(decided) >= 200
