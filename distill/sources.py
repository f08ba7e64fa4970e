"""Seed questions from local JSONL / Parquet / saved datasets or the Hugging Face Hub.

Every input row becomes `{id, problem, answer, source}` or a quarantined record with its
location (`file:line`) and a reason. The run fails only when the malformed share exceeds the
configured error budget, and even then the quarantine is written first so it can be inspected.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from distill import fsio
from distill.config import MixConfig, SourceConfig, output_fields
from distill.fsio import Row, fingerprint, hash_files, iter_jsonl, quarantine_record
from distill.curate.answers import ANSWER_EXTRACTORS
from distill.store import KeyHashes, Manifest, ShardStore, key_hash, reason_code

SOURCE_SCHEMA = pa.schema(
    [("key", pa.string()), ("id", pa.string()), ("problem", pa.string()),
     ("answer", pa.string()), ("source", pa.string())]
)
QUARANTINE_SCHEMA = pa.schema([("key", pa.string()), *fsio.QUARANTINE_SCHEMA])
_SHARD_ROWS = 10_000


class SourceError(RuntimeError):
    pass


@dataclass
class IngestSummary:
    rows: int = 0
    valid: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    skipped: bool = False


# --------------------------------------------------------------------------- readers


def _read_table_rows(name: str, rows: Iterator[dict]) -> Iterator[Row]:
    for i, row in enumerate(rows, start=1):
        yield Row(f"{name}:row {i}", row, "")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    for file in files:
        pf = pq.ParquetFile(file)
        offset = 0
        for batch in pf.iter_batches(batch_size=4096):
            for i, row in enumerate(batch.to_pylist(), start=offset + 1):
                yield Row(f"{file}:row {i}", row, "")
            offset += batch.num_rows


def _hf_split(ds, split: str, where: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise SourceError(f"source.split: {where} has no split {split!r}; available: {', '.join(ds)}")
        return ds[split]
    return ds


def detect_format(cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    p = Path(cfg.path)
    if p.is_file():
        if p.suffix in (".jsonl", ".json"):
            return "jsonl"
        if p.suffix == ".parquet":
            return "parquet"
        raise SourceError(f"source.path: cannot tell the format of {p}; set source.format (jsonl | parquet)")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            return "hf_disk"
        if any(p.glob("**/*.parquet")):
            return "parquet"
        return "hub"  # `datasets.load_dataset` reads local directories of csv/json too
    if p.suffix in (".jsonl", ".json", ".parquet") or cfg.path.startswith((".", "/")):
        raise SourceError(f"source.path: {cfg.path!r} does not exist (relative paths are relative to the working directory)")
    return "hub"


def read_rows(cfg: SourceConfig) -> tuple[Iterator[Row], str, str]:
    """(rows, content fingerprint, default source name) for the configured input."""
    fmt = detect_format(cfg)
    path = Path(cfg.path)
    if fmt == "jsonl":
        return iter_jsonl(path), hash_files([path]), path.stem
    if fmt == "parquet":
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        return _read_parquet(path), hash_files(files), path.stem
    import datasets

    if fmt == "hf_disk":
        ds = _hf_split(datasets.load_from_disk(str(path)), cfg.split, str(path))
        where = f"{path}[{cfg.split}]"
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split)
        except Exception as e:  # offline, no such dataset, no such split: say which key
            raise SourceError(f"source.path: could not load Hub dataset {cfg.path!r} (split {cfg.split!r}): {e}") from e
        where = f"{cfg.path}[{cfg.split}]"
    name = cfg.path.rstrip("/").split("/")[-1]
    return _read_table_rows(where, iter(ds)), ds._fingerprint, name


# --------------------------------------------------------------------------- normalisation


def question_id(problem: str) -> str:
    return "q-" + hashlib.sha256(problem.encode()).hexdigest()[:16]


def normalise_row(row: dict, cfg: SourceConfig, default_source: str) -> tuple[dict | None, str | None]:
    """A source row -> `{id, problem, answer, source}`, or (None, "code: detail"). Pure."""
    cols = cfg.columns
    if cols.problem not in row:
        return None, f"missing_problem: no column {cols.problem!r}"
    problem = row[cols.problem]
    if problem is None or (isinstance(problem, str) and not problem.strip()):
        return None, "empty_problem: problem is empty"
    if not isinstance(problem, str):
        return None, f"bad_type: problem has type {type(problem).__name__}, expected a string"
    answer = None
    if cols.answer is not None:
        if cols.answer not in row:
            return None, f"missing_answer: no column {cols.answer!r}"
        raw = row[cols.answer]
        if isinstance(raw, bool) or not (raw is None or isinstance(raw, (str, int, float))):
            return None, f"bad_type: answer has type {type(raw).__name__}, expected a string or number"
        if raw is not None:
            answer = ANSWER_EXTRACTORS[cfg.answer_extract](str(raw))
            if answer is None:
                return None, f"no_answer: no final answer in column {cols.answer!r} (answer_extract={cfg.answer_extract})"
    qid = row.get(cols.id) if cols.id is not None else None
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (str, int))):
        return None, f"bad_type: id has type {type(qid).__name__}, expected a string or integer"
    qid = str(qid) if qid is not None and str(qid).strip() else question_id(problem)
    source = row.get("source") if isinstance(row.get("source"), str) else default_source
    return {"key": qid, "id": qid, "problem": problem, "answer": answer, "source": source}, None


# --------------------------------------------------------------------------- the ingest step


_LOCATION = re.compile(r"(.*):(row )?(\d{1,12})")


class SeenIds:
    """The question ids ingested so far and where each was first seen, at 16 bytes an id: a
    `store.KeyHashes` whose value is the location packed in 64 bits (index of its file part,
    "row " or not, the number). Ids of the shard being filled sit in a dict until `seal` merges
    them (one sort per 10,000 questions). A location that does not have the `prefix:N` /
    `prefix:row N` form of the readers is kept as text. Two different ids that hash alike would
    be reported as a duplicate (about n^2 / 2^65: 3e-8 for a million ids), never silently merged."""

    _TEXT = 1 << 63  # the value's top bit: the rest indexes `_texts`

    def __init__(self):
        self._sealed = KeyHashes.from_pairs(())
        self._new: dict[int, int] = {}
        self._prefixes: dict[str, int] = {}
        self._prefix_list: list[str] = []
        self._texts: list[str] = []

    def _pack(self, location: str) -> int:
        m = _LOCATION.fullmatch(location)
        if m is None or (m.group(1) not in self._prefixes and len(self._prefix_list) >= 1 << 22):
            self._texts.append(location)
            return self._TEXT | (len(self._texts) - 1)
        if m.group(1) not in self._prefixes:
            self._prefixes[m.group(1)] = len(self._prefix_list)
            self._prefix_list.append(m.group(1))
        return (self._prefixes[m.group(1)] << 41) | (bool(m.group(2)) << 40) | int(m.group(3))

    def _unpack(self, code: int) -> str:
        if code & self._TEXT:
            return self._texts[code & ~self._TEXT]
        return f"{self._prefix_list[code >> 41]}:{'row ' if code >> 40 & 1 else ''}{code & ((1 << 40) - 1)}"

    def first(self, qid: str) -> str | None:
        """Where `qid` was first seen, or None."""
        code = self._new.get(key_hash(qid))
        if code is None:
            code = self._sealed.get(qid)
        return None if code is None else self._unpack(code)

    def add(self, qid: str, location: str) -> None:
        self._new[key_hash(qid)] = self._pack(location)

    def seal(self) -> None:
        if self._new:
            self._sealed.add_many(self._new.keys(), self._new.values())
            self._new = {}


def _validated(rows: Iterator[Row], cfg: SourceConfig, default_source: str, seen: SeenIds
               ) -> Iterator[tuple[Row, dict | None, str | None]]:
    """(row, question or None, reason) for each input row, up to `cfg.limit` valid questions; a
    question whose id was seen before (in this source or an earlier one) is a `duplicate_id`."""
    valid = 0
    for row in rows:
        if cfg.limit is not None and valid >= cfg.limit:
            return
        rec, reason = (None, row.value) if isinstance(row.value, str) else normalise_row(row.value, cfg, default_source)
        if rec is not None and (first := seen.first(rec["id"])) is not None:
            rec, reason = None, f"duplicate_id: {rec['id']!r} first seen at {first}"
        if rec is not None:
            seen.add(rec["id"], row.location)
            valid += 1
        yield row, rec, reason


def _mix_cuts(mix: MixConfig, names: list[str]) -> tuple[list[int], dict]:
    """Per-source hash thresholds of a weighted mix (`distill.mixing`): a first pass over every
    source hashes its valid questions (8 bytes each), the quotas follow the weights exactly."""
    import numpy as np

    from distill.mixing import MixError, mix_hash, quotas, threshold

    seen, hashes = SeenIds(), []
    for src, name in zip(mix.sources, names):
        rows, _, default = read_rows(src)
        h = [mix_hash(mix.seed, f"{name}/{rec['id']}") for _, rec, _ in _validated(rows, src, name or default, seen)
             if rec is not None]
        hashes.append(np.array(h, dtype=np.uint64))
        seen.seal()
    try:
        want = quotas([len(h) for h in hashes], [s.weight for s in mix.sources], mix.total, names)
    except MixError as e:
        raise SourceError(f"mix: {e}") from None
    total = sum(want)
    shares = {n: {"candidates": len(h), "kept": q, "share": round(q / total, 6) if total else 0.0}
              for n, h, q in zip(names, hashes, want)}
    return [threshold(h, q) for h, q in zip(hashes, want)], shares


def ingest(cfg: SourceConfig | MixConfig, out: Path) -> IngestSummary:
    """Read, validate and write the questions to `out` (skipped when already done for this input):
    one source, or a `mix` of several (with weights: exactly those shares, reproducible from
    `mix.seed`; without: all of each, in order). Each question's `source` column is its source's
    name unless the row names one.

    Unlike the expensive stages, a changed source is re-ingested rather than refused: the step is
    cheap and deterministic, and downstream stages key their records by question id, so they
    reuse everything that still applies.
    """
    sources = [cfg] if isinstance(cfg, SourceConfig) else list(cfg.sources)
    opened = [read_rows(s) for s in sources]
    names = [s.name or default for s, (_, _, default) in zip(sources, opened)]
    settings = output_fields(cfg)
    fp = fingerprint([settings, [h for _, h, _ in opened]]) if len(sources) > 1 else fingerprint([settings, opened[0][1]])
    old = Manifest.read(out)
    if old is not None and old.fingerprint == fp and old.status == "complete":
        return IngestSummary(rows=old.summary["rows"], valid=old.counts["records"],
                             bad=old.counts["rejected"], reasons=Counter(old.counts["rejected_by_reason"]), skipped=True)
    if out.exists():
        shutil.rmtree(out)
    weighted = isinstance(cfg, MixConfig) and any(s.weight for s in sources)
    cuts, shares = _mix_cuts(cfg, names) if weighted else (None, {})
    store = ShardStore(out, stage="source", fingerprint=fp, settings=settings, schema=SOURCE_SCHEMA,
                       rejected_schema=QUARANTINE_SCHEMA,
                       inputs={s.path: h for s, (_, h, _) in zip(sources, opened)}).open()

    # Streamed: every _SHARD_ROWS valid questions are committed with the rows quarantined since the
    # last commit, so the driver holds one shard of questions, never the source. Duplicate ids are
    # found in `SeenIds`, 16 bytes a question.
    summary, good, bad, seen, index = IngestSummary(), [], [], SeenIds(), 0
    per_source: list[Counter] = [Counter() for _ in sources]
    first_bad: list[dict | None] = [None] * len(sources)
    if weighted:
        from distill.mixing import mix_hash
    for i, (src, (rows, _, _)) in enumerate(zip(sources, opened)):
        for row, rec, reason in _validated(rows, src, names[i], seen):
            summary.rows += 1
            per_source[i]["rows"] += 1
            if rec is None:
                summary.bad += 1
                per_source[i]["bad"] += 1
                summary.reasons[reason_code(reason)] += 1
                raw = row.raw or json.dumps(row.value, default=str, ensure_ascii=False)
                bad.append({"key": row.location, **quarantine_record(row.location, reason, raw)})
                first_bad[i] = first_bad[i] or bad[-1]
                continue
            if cuts is not None and mix_hash(cfg.seed, f"{names[i]}/{rec['id']}") > cuts[i]:
                continue  # left out by the weights: neither kept nor malformed
            good.append(rec)
            summary.valid += 1
            if len(good) == _SHARD_ROWS:
                store.commit(index, good, bad)
                seen.seal()
                good, bad, index = [], [], index + 1
        seen.seal()
    if good or bad or index == 0:  # at least one shard, so an empty source still has a schema
        store.commit(index, good, bad)
    del seen, good, bad
    for i, src in enumerate(sources):
        n, n_bad = per_source[i]["rows"], per_source[i]["bad"]
        if n and n_bad / n > src.max_bad_fraction:
            store.finish({"rows": summary.rows}, status="failed")
            key = "source" if len(sources) == 1 else f"mix.sources[{i}]"
            raise SourceError(
                f"{key}: {n_bad} of {n} input rows are malformed ({n_bad / n:.1%} > "
                f"{key}.max_bad_fraction={src.max_bad_fraction:g}); they are quarantined in {out / 'rejected'}. "
                f"First: {first_bad[i]['location']}: {first_bad[i]['reason']}")
    if summary.valid == 0:
        store.finish({"rows": summary.rows}, status="failed")
        raise SourceError(f"source: no valid questions in {', '.join(repr(s.path) for s in sources)}")
    store.finish({"rows": summary.rows, **({"mix": shares} if shares else {})})
    return summary
