import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.config import SourceConfig
from distill.sources import SourceError, ingest, normalise_row
from distill.store import Manifest, read_records


def seed_rows(path, n):
    with open(path) as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_real_gsm8k_file_ingests_with_limit(tmp_path, gsm8k_train):
    out = tmp_path / "source"
    s = ingest(SourceConfig(path=str(gsm8k_train), limit=50), out)
    assert (s.valid, s.bad, s.skipped) == (50, 0, False)
    recs = read_records(out)
    assert [r["id"] for r in recs] == [f"gsm8k-train-{i}" for i in range(50)]
    assert recs[0]["answer"] == "72" and recs[0]["source"] == "gsm8k_train"
    again = ingest(SourceConfig(path=str(gsm8k_train), limit=50), out)
    assert again.skipped and again.valid == 50
    # the whole run directory loads with `datasets`
    ds = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    assert ds.num_rows == 50 and ds[0]["problem"] == recs[0]["problem"]


def test_malformed_lines_are_quarantined_with_file_line_and_reason(tmp_path, gsm8k_train):
    good = seed_rows(gsm8k_train, 3)
    path = tmp_path / "seeds.jsonl"
    lines = [
        json.dumps(good[0]).encode(),                          # 1 ok
        b'{"id": "x1", "problem": "unterminated',              # 2 bad json
        b"",                                                   # 3 blank: skipped, not an error
        b'["a", "list"]',                                      # 4 not an object
        json.dumps({"id": "x2", "answer": "1"}).encode(),      # 5 missing problem
        json.dumps({"id": "x3", "problem": "  ", "answer": "1"}).encode(),   # 6 empty problem
        json.dumps({"id": "x4", "problem": 17, "answer": "1"}).encode(),     # 7 wrong type
        json.dumps({"id": "x5", "problem": "p?", "answer": [1]}).encode(),   # 8 wrong answer type
        b'{"id": "x6", "problem": "caf\xe9 \xff", "answer": "1"}',          # 9 not utf-8
        json.dumps(good[1]).encode(),                          # 10 ok
        json.dumps(good[1]).encode(),                          # 11 duplicate id
        json.dumps({**good[2], "answer": 3}).encode(),         # 12 ok: numeric answer becomes "3"
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "source"
    s = ingest(SourceConfig(path=str(path), max_bad_fraction=0.9), out)
    assert (s.rows, s.valid, s.bad) == (11, 3, 8)
    rejected = {r["location"]: r["reason"] for r in read_records(out, rejected=True)}
    expect = {2: "invalid_json", 4: "not_an_object", 5: "missing_problem", 6: "empty_problem", 7: "bad_type",
              8: "bad_type", 9: "undecodable", 11: "duplicate_id"}
    assert {loc: r.split(":")[0] for loc, r in rejected.items()} == {f"{path}:{n}": code for n, code in expect.items()}
    assert "first seen at" in rejected[f"{path}:11"] and f"{path}:10" in rejected[f"{path}:11"]
    assert [r["answer"] for r in read_records(out)] == [good[0]["answer"], good[1]["answer"], "3"]
    assert Manifest.read(out).counts["rejected_by_reason"]["bad_type"] == 2


def test_ingest_commits_as_it_reads_and_finds_duplicates_across_shards(tmp_path, monkeypatch):
    """Shards of _SHARD_ROWS valid questions are committed while reading (the driver never holds
    the source); a duplicate id two shards after its first row is still caught, with the first
    row's location, and every row lands exactly once."""
    import distill.sources as sources

    monkeypatch.setattr(sources, "_SHARD_ROWS", 3)
    path = tmp_path / "seeds.jsonl"
    rows = [{"id": f"q{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)]
    lines = [json.dumps(r) for r in rows[:4]] + ["{bad"] + [json.dumps(r) for r in rows[4:]] + [json.dumps(rows[0])]
    path.write_text("\n".join(lines) + "\n")
    s = ingest(SourceConfig(path=str(path), max_bad_fraction=0.5), tmp_path / "source")
    assert (s.rows, s.valid, s.bad) == (10, 8, 2)
    assert sorted(p.name for p in (tmp_path / "source").glob("part-*.parquet")) == \
        ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [r["id"] for r in read_records(tmp_path / "source")] == [r["id"] for r in rows]
    rejected = {r["location"]: r["reason"] for r in read_records(tmp_path / "source", rejected=True)}
    assert set(rejected) == {f"{path}:5", f"{path}:10"}
    assert rejected[f"{path}:10"] == f"duplicate_id: 'q0' first seen at {path}:1"


def test_seen_ids_give_back_the_exact_first_location_before_and_after_sealing():
    from distill.sources import SeenIds

    locations = {"a": "/data/seeds.jsonl:12", "b": "part-0.parquet:row 7", "c": "hub:user/ds:train:row 3",
                 "d": "no number here", "e": "x:row 1099511627775", "f": "C:\\seeds.jsonl:1"}
    seen = SeenIds()
    for qid, loc in list(locations.items())[:3]:
        seen.add(qid, loc)
    assert seen.first("a") == locations["a"] and seen.first("d") is None
    seen.seal()
    for qid, loc in list(locations.items())[3:]:
        seen.add(qid, loc)
    assert {q: seen.first(q) for q in locations} == locations  # sealed and unsealed alike
    seen.seal()
    assert {q: seen.first(q) for q in locations} == locations and seen.first("zz") is None


def test_error_budget_fails_the_run_after_writing_the_quarantine(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"problem": "What is 1+1?", "answer": "2"}\n{bad\n{"problem": "", "answer": "1"}\n')
    out = tmp_path / "source"
    with pytest.raises(SourceError) as e:
        ingest(SourceConfig(path=str(path), max_bad_fraction=0.5), out)
    assert "2 of 3 input rows are malformed" in str(e.value) and "source.max_bad_fraction=0.5" in str(e.value)
    assert f"{path}:2: invalid_json" in str(e.value)
    assert len(read_records(out, rejected=True)) == 2
    assert Manifest.read(out).status == "failed"


def test_gsm8k_style_columns_with_answer_extraction_from_parquet(tmp_path, gsm8k_train):
    rows = seed_rows(gsm8k_train, 20)
    d = tmp_path / "gsm8k_like"
    d.mkdir()
    table = pa.Table.from_pylist([{"question": r["problem"], "answer": r["solution"]} for r in rows])
    pq.write_table(table, d / "train-00000.parquet")
    cfg = SourceConfig(path=str(d), columns={"problem": "question", "answer": "answer", "id": None},
                       answer_extract="gsm8k")
    s = ingest(cfg, tmp_path / "source")
    got = read_records(tmp_path / "source")
    assert s.valid == 20
    assert [g["answer"] for g in got] == [r["answer"] for r in rows]
    assert all(g["id"].startswith("q-") for g in got)  # no id column: content hash ids


def test_saved_hf_dataset_and_hub_loader_path(tmp_path, gsm8k_train):
    rows = seed_rows(gsm8k_train, 12)
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"q": r["problem"], "a": r["solution"], "id": r["id"]} for r in rows[:8]]),
        "test": datasets.Dataset.from_list([{"q": r["problem"], "a": r["solution"], "id": r["id"]} for r in rows[8:]]),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    cols = {"problem": "q", "answer": "a", "id": "id"}
    s = ingest(SourceConfig(path=str(tmp_path / "saved"), split="test", columns=cols, answer_extract="gsm8k"),
               tmp_path / "s1")
    assert s.valid == 4 and read_records(tmp_path / "s1")[0]["id"] == rows[8]["id"]
    with pytest.raises(SourceError, match="has no split 'validation'"):
        ingest(SourceConfig(path=str(tmp_path / "saved"), split="validation", columns=cols), tmp_path / "s2")
    # `format: hub` goes through datasets.load_dataset, exactly as a Hub id would.
    hub_dir = tmp_path / "hubrepo"
    hub_dir.mkdir()
    (hub_dir / "train.jsonl").write_text("".join(json.dumps({"q": r["problem"], "a": r["solution"]}) + "\n" for r in rows))
    s = ingest(SourceConfig(path=str(hub_dir), format="hub", columns={"problem": "q", "answer": "a", "id": None},
                            answer_extract="gsm8k"), tmp_path / "s3")
    assert s.valid == 12


def test_unreachable_hub_id_names_the_key(tmp_path):
    with pytest.raises(SourceError, match="source.path: could not load Hub dataset 'nobody/nothing-here'"):
        ingest(SourceConfig(path="nobody/nothing-here"), tmp_path / "s")
    with pytest.raises(SourceError, match="does not exist"):
        ingest(SourceConfig(path="./missing.jsonl"), tmp_path / "s")


def test_changed_file_is_reingested(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"problem": "What is 1+1?", "answer": "2"}\n')
    out = tmp_path / "source"
    assert ingest(SourceConfig(path=str(path)), out).valid == 1
    path.write_text('{"problem": "What is 1+1?", "answer": "2"}\n{"problem": "What is 2+2?", "answer": "4"}\n')
    s = ingest(SourceConfig(path=str(path)), out)
    assert not s.skipped and s.valid == 2 and len(read_records(out)) == 2


def test_normalise_row_is_pure_and_extracts():
    cfg = SourceConfig(path="x", answer_extract="boxed")
    rec, why = normalise_row({"problem": "p", "answer": "so \\boxed{\\frac{1}{2}}"}, cfg, "src")
    assert why is None and rec["answer"] == "\\frac{1}{2}" and rec["source"] == "src"
    rec, why = normalise_row({"problem": "p", "answer": "no box"}, cfg, "src")
    assert rec is None and why.startswith("no_answer")


def test_weighted_mix_of_sources_is_exact_and_reproducible(tmp_path, gsm8k_train):
    """Two real sources mixed 1:3 (GSM8K and MATH training questions): the shares are the weights
    to one question, the same seed keeps the same questions, another seed others; an unweighted
    mix keeps all of each; an id seen in an earlier source is quarantined as a duplicate."""
    from collections import Counter

    from distill.config import MixConfig
    from distill.sources import ingest
    from distill.store import read_records

    math_train = gsm8k_train.parent / "math_train.jsonl"
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"id": "gsm8k-train-0", "problem": "Another text, same id: what is 1+1?"}) + "\n")

    def mix(seed: int, weights=(1, 3), total=None, extra=()) -> list[dict]:
        sources = [{"path": str(gsm8k_train), "name": "gsm8k", "limit": 400},
                   {"path": str(math_train), "name": "math", "limit": 900}, *extra]
        if weights:
            sources = [{**s, "weight": w} for s, w in zip(sources, weights)]
        out = tmp_path / f"mix-{seed}-{weights}-{total}-{len(extra)}"
        ingest(MixConfig(sources=sources, seed=seed, total=total), out)
        return read_records(out)

    a = mix(0)
    by = Counter(r["source"] for r in a)
    # (The rows carry their own `source` column, which wins over the mix's names.)
    assert by == {"gsm8k_train": 300, "math_train": 900}  # MATH's 900 at 3/4 sets the size: 1,200
    assert [r["id"] for r in mix(0)] == [r["id"] for r in a]
    b = mix(1)
    assert Counter(r["source"] for r in b) == by and {r["id"] for r in b} != {r["id"] for r in a}
    assert Counter(r["source"] for r in mix(0, total=400)) == {"gsm8k_train": 100, "math_train": 300}
    with pytest.raises(SourceError, match="'gsm8k' needs 1000 but holds 400"):
        mix(0, total=4000)
    everything = mix(0, weights=None, extra=[{"path": str(dup), "max_bad_fraction": 1.0, "columns": {"answer": None}}])
    assert Counter(r["source"] for r in everything) == {"gsm8k_train": 400, "math_train": 900}
    rejected = read_records(tmp_path / "mix-0-None-None-1", rejected=True)
    assert [r["reason"].split(":")[0] for r in rejected] == ["duplicate_id"]
    assert "first seen at" in rejected[0]["reason"] and "gsm8k_train.jsonl:1" in rejected[0]["reason"]
