"""Stage `import`: teacher outputs that already exist -> samples in the generate stage's schema.

Reads the sets in `traces.sources` (JSONL, Parquet, `save_to_disk`, Hub ids, distill stage
directories, this run's `generate/`), writes `RUN/import/`, which `verify` then reads instead of
`generate/` (see `samples_stage`). Everything downstream is unchanged.

How it runs: each source is cut into work units (a byte range of a JSONL file, a row range of a
Parquet file or dataset, one shard of a stage directory); Ray workers read their unit, turn rows
into samples (`distill.traces.row_samples`), count tokens with the student's tokenizer and stage
the unit's shard; the driver only commits. A unit is shard `index` in a fixed plan, so a killed
run resumes by skipping committed shards: no sample lost or written twice.

With weights, a first pass hashes every candidate sample (`distill.mixing`), the per-source
thresholds are kept in `RUN/import/mix.json`, and the second pass keeps the samples under them.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from distill.config import ConfigError, RunConfig, TraceSource, output_fields, source_name
from distill.fsio import Chunk, Row, atomic_write_json, chunk_rows, fingerprint, hash_files, parquet_rows, plan_chunks
from distill.mixing import MixError, mix_hash, quotas, threshold
from distill.stages import ActorAsk, Stage
from distill.stages.derived import dataset_digest, finish_stage, map_items
from distill.store import Manifest, ShardStore, diff_settings, require_complete, stage_shard
from distill.traces import (
    IMPORT_REJECTED_SCHEMA, IMPORTED_SCHEMA, Origin, generated_sample, mapping_hash, row_samples,
)

MIX_FILE = "mix.json"


@dataclass(frozen=True)
class Unit:
    """One unit of import work: shard `index` of the output, from source `source`."""

    index: int
    source: int
    chunk: Chunk | None = None  # a JSONL / Parquet file's range, or a stage shard (start=stop=0)
    rows: tuple[int, int] | None = None  # a `datasets` dataset's row range
    max_rows: int | None = None  # `limit` ends inside this unit: read only its first max_rows rows


@dataclass
class Opened:
    """A source as the driver plans it: its origin (what every sample records) and its units'
    inputs, without the shard indices."""

    src: TraceSource
    origin: Origin
    kind: str  # jsonl | parquet | dataset | stage
    root: str  # what locations are made relative to
    pieces: list


# --------------------------------------------------------------------------- opening sources


def _format(src: TraceSource) -> str:
    from distill.sources import detect_format

    if src.stage is not None:
        return "stage"
    if src.format == "distill" or (src.format == "auto" and (Path(src.path) / "_manifest.json").exists()):
        return "stage"
    return detect_format(src)


def _stage_dir(src: TraceSource, run_dir: Path) -> Path:
    return run_dir / src.stage if src.stage is not None else Path(src.path)


def _load_dataset(src: TraceSource):
    """A `save_to_disk` dataset or a Hub dataset's split (memory-mapped Arrow, cached locally)."""
    import datasets

    from distill.sources import SourceError, _hf_split

    if _format(src) == "hf_disk":
        return _hf_split(datasets.load_from_disk(src.path), src.split, src.path)
    try:
        return datasets.load_dataset(src.path, src.hub_config, split=src.split, revision=src.revision)
    except Exception as e:  # offline, no such dataset or split: say which source
        raise SourceError(f"could not load Hub dataset {src.path!r} (split {src.split!r}): {e}") from e


def open_source(src: TraceSource, run_dir: Path, chunk_bytes: int) -> Opened:
    fmt, name = _format(src), source_name(src)
    settings = mapping_hash(src)
    if fmt == "stage":
        root = _stage_dir(src, run_dir)
        require_complete(root, "the run that wrote it")
        files = sorted(root.glob("part-*.parquet"))
        origin = Origin(name, str(root), None, dataset_digest(root), src.teacher, settings)
        return Opened(src, origin, "stage", str(root) + "/", [Chunk(str(f), 0, 0) for f in files])
    if fmt in ("jsonl", "parquet"):
        path = Path(src.path)
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        origin = Origin(name, src.path, src.revision, hash_files(files), src.teacher, settings)
        root = str(path if path.is_dir() else path.parent) + "/"
        return Opened(src, origin, fmt, root, plan_chunks(files, chunk_bytes))
    ds = _load_dataset(src)
    per_row = max(1, ds.data.nbytes // max(len(ds), 1))
    step = max(1, chunk_bytes // per_row)
    origin = Origin(name, src.path, src.revision, ds._fingerprint, src.teacher, settings)
    return Opened(src, origin, "dataset", "", [(a, min(a + step, len(ds))) for a in range(0, len(ds), step)])


def _piece_rows(o: Opened, piece, next_piece) -> int | None:
    """Input rows in a piece, where known without reading it (a JSONL chunk's lines)."""
    if o.kind == "dataset":
        return piece[1] - piece[0]
    if o.kind == "parquet":
        return piece.stop - piece.start
    if o.kind == "stage":
        import pyarrow.parquet as pq

        return pq.ParquetFile(piece.path).metadata.num_rows
    return None if next_piece is None else next_piece.line - piece.line  # the last chunk: not counted


def plan(opened: list[Opened]) -> list[Unit]:
    """Every unit of every source, numbered in source order: the same inputs and settings give the
    same plan, so shard `index` always holds the same samples. A source's `limit` keeps its first
    `limit` input rows (JSONL: lines): units past it are left out, the one it ends in is cut."""
    units = []
    for s, o in enumerate(opened):
        seen, limit = 0, o.src.limit
        for j, piece in enumerate(o.pieces):
            if limit is not None and seen >= limit:
                break
            n = _piece_rows(o, piece, o.pieces[j + 1] if j + 1 < len(o.pieces) else None)
            cut = limit - seen if limit is not None and (n is None or seen + n > limit) else None
            kw = {"chunk": piece} if o.kind != "dataset" else {"rows": piece}
            units.append(Unit(len(units), s, max_rows=cut, **kw))
            seen += n or 0
    return units


# --------------------------------------------------------------------------- worker side

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(student: str):
    if student not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from distill.teachers.models import resolve_model

        _TOKENIZERS[student] = AutoTokenizer.from_pretrained(resolve_model(student))
    return _TOKENIZERS[student]


def _rows(o: Opened, unit: Unit) -> Iterator[Row]:
    if o.kind == "stage":
        return parquet_rows(unit.chunk.path)
    if o.kind in ("jsonl", "parquet"):
        return chunk_rows(unit.chunk)
    ds = _load_dataset(o.src)
    a, b = unit.rows
    where = f"{o.src.path}[{o.src.split}]"
    return (Row(f"{where}:row {a + i + 1}", r, "") for i, r in enumerate(ds.select(range(a, b))))


def _samples(o: Opened, unit: Unit) -> tuple[list[dict], list[dict], int]:
    """The unit's candidate samples, rejected items (in input order) and input rows read."""
    samples, rejected, rows = [], [], 0
    for row in itertools.islice(_rows(o, unit), unit.max_rows):
        rows += 1
        where = row.location.removeprefix(o.root)
        if isinstance(row.value, str):  # the reader could not decode the line
            rejected.append({"key": f"{o.origin.name}/{where}", "origin": o.origin.name, "location": row.location,
                             "reason": row.value, "raw": row.raw[:2000]})
            continue
        if o.kind == "stage":
            samples.append(generated_sample(row.value, row.location, o.origin))
            continue
        got, bad = row_samples(row.value, row.location, where, o.src, o.origin)
        samples += got
        rejected += bad
    return samples, rejected, rows


def hash_unit(opened: list[Opened], seed: int, unit: Unit) -> tuple[int, np.ndarray]:
    """Pass 1 of a weighted mix: the mix hashes of the unit's candidate samples."""
    samples, _, _ = _samples(opened[unit.source], unit)
    return unit.source, np.fromiter((mix_hash(seed, s["key"]) for s in samples), dtype=np.uint64, count=len(samples))


@dataclass
class UnitDone:
    staged: object
    source: int
    candidates: int
    tokens: int
    in_bytes: int


def import_unit(opened: list[Opened], seed: int, keep_under: list[int] | None, student: str, out_root: str,
                unit: Unit) -> UnitDone:
    """Pass 2: the unit's samples (those under the source's threshold when mixing), with token
    counts from the student's tokenizer, staged as shard `unit.index`."""
    o = opened[unit.source]
    samples, rejected, rows = _samples(o, unit)
    candidates = len(samples)
    if keep_under is not None:
        cut = keep_under[unit.source]
        samples = [s for s in samples if mix_hash(seed, s["key"]) <= cut]
    todo = [s for s in samples if s["n_tokens"] is None]
    if todo:
        ids = _tokenizer(student)([s["completion"] for s in todo], add_special_tokens=False)["input_ids"]
        for s, t in zip(todo, ids):
            s["n_tokens"] = len(t)
    in_bytes = unit.chunk.stop - unit.chunk.start if o.kind == "jsonl" else 0
    # What the error budget needs travels in the shard's own footer, committed with it: a resumed
    # run counts every committed unit's rows without reading them again.
    bad_rows = sum(1 for r in rejected if "#" not in r["key"])  # whole rows, not items of a row
    meta = {b"origin": o.origin.name.encode(), b"rows_read": str(rows).encode(), b"bad_rows": str(bad_rows).encode()}
    staged = stage_shard(out_root, unit.index, samples, rejected, IMPORTED_SCHEMA.with_metadata(meta),
                         IMPORT_REJECTED_SCHEMA)
    return UnitDone(staged, unit.source, candidates, int(sum(s["n_tokens"] for s in samples)), in_bytes)


# --------------------------------------------------------------------------- the stage


def _columns_of(src: TraceSource) -> list[str] | None:
    """The columns a local source's rows have (from its first readable row), or None when they
    cannot be read without loading it (a Hub id)."""
    fmt = _format(src)
    path = Path(src.path)
    if fmt == "jsonl":
        for row in chunk_rows(Chunk(str(path), 0, path.stat().st_size)):
            if isinstance(row.value, dict):
                return list(row.value)
        return []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        first = path if path.is_file() else next(iter(sorted(path.glob("**/*.parquet"))), None)
        return [] if first is None else list(pq.read_schema(first).names)
    if fmt == "hf_disk":
        return list(_load_dataset(src).column_names)
    return None


def preflight(cfg: RunConfig) -> None:
    """Every mapped column exists in its (local) source, checked before any stage runs."""
    problems = []
    if "import" in cfg.run.stages and not cfg.traces.sources:
        problems.append("traces.sources: the import stage needs at least one source (a file, directory, Hub id or "
                        "stage: generate)")
    for i, src in enumerate(cfg.traces.sources):
        key = f"traces.sources[{i}]"
        if src.stage is not None:
            if src.stage not in cfg.run.stages and not (Path(cfg.run.dir) / src.stage / "_manifest.json").exists():
                problems.append(f"{key}.stage={src.stage}: this run neither runs nor has run stage {src.stage}")
            continue
        p = Path(src.path)
        if src.format in ("jsonl", "parquet", "hf_disk", "distill") and not p.exists():
            problems.append(f"{key}.path: {src.path!r} does not exist")
            continue
        if _format(src) == "stage" or (not p.exists() and src.format == "auto" and src.path.startswith((".", "/"))):
            if not p.exists():
                problems.append(f"{key}.path: {src.path!r} does not exist")
            continue
        try:
            have = _columns_of(src)
        except Exception as e:  # an unreadable file: say which source
            problems.append(f"{key}.path: cannot read {src.path!r}: {e}")
            continue
        if have is None:
            continue
        cols = src.columns
        mapped = {"problem": cols.problem if not (cols.messages and cols.problem not in have) else None,
                  "answer": cols.answer, "id": cols.id, "completion": cols.completion, "messages": cols.messages,
                  "correct": cols.correct, "finish_reason": cols.finish_reason}
        optional = {"id"}  # a missing id column means "hash the problem", as for questions
        for field, column in mapped.items():
            if column is not None and column not in have and field not in optional:
                problems.append(f"{key}.columns.{field}: no column {column!r} in {src.path}; its columns: "
                                f"{', '.join(have) or '(none: no readable row)'}")
    if problems:
        raise ConfigError(problems)


def resources(cfg: RunConfig) -> ActorAsk:
    names = ", ".join(source_name(s) for s in cfg.traces.sources) or "no sources"
    return ActorAsk(cfg.curate.workers, 1.0, what=f"1-CPU readers of {names}, counting tokens with the student's "
                                                  f"tokenizer ({cfg.train.student.model})")


def _mix(store: ShardStore, opened: list[Opened], units: list[Unit], cfg: RunConfig) -> tuple[list[int] | None, dict]:
    """Per-source hash thresholds of a weighted mix (None: keep everything), computed once and
    kept in `mix.json` beside the shards, so a resumed run keeps exactly the same samples."""
    tc = cfg.traces
    if not any(s.weight for s in tc.sources):
        return None, {}
    path = store.root / MIX_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["keep_under"], saved["mix"]
    hashes: list[list[np.ndarray]] = [[] for _ in opened]
    for source, h in map_items(hash_unit, (opened, tc.seed), units, cfg, lambda u: f"import mix pass, shard {u.index}"):
        hashes[source].append(h)
    merged = [np.concatenate(h) if h else np.zeros(0, np.uint64) for h in hashes]
    names = [o.origin.name for o in opened]
    try:
        want = quotas([len(h) for h in merged], [s.weight for s in tc.sources], tc.total, names)
    except MixError as e:
        raise ConfigError([f"traces: {e}"]) from None
    keep_under = [threshold(h, q) for h, q in zip(merged, want)]
    total = sum(want)
    mix = {n: {"candidates": len(h), "kept": q, "share": round(q / total, 6) if total else 0.0,
               "target": round(s.weight / sum(x.weight for x in tc.sources), 6)}
           for n, h, q, s in zip(names, merged, want, tc.sources)}
    atomic_write_json(path, {"keep_under": keep_under, "mix": mix})
    return keep_under, mix


def _check_budgets(store: ShardStore, opened: list[Opened]) -> None:
    """Fail the stage (after committing everything) when a set's malformed rows exceed its
    `max_bad_fraction`, naming the first one. Items of a row that are unusable (an empty
    generation among several) are rejected with their reason but do not count: the row is not
    malformed."""
    import pyarrow.parquet as pq

    rows, bad = Counter(), Counter()
    for name in store.shard_names():
        meta = pq.read_schema(store.root / name).metadata or {}
        origin = meta.get(b"origin", b"").decode()
        rows[origin] += int(meta.get(b"rows_read", 0))
        bad[origin] += int(meta.get(b"bad_rows", 0))
    over = [(o, bad[o.origin.name], rows[o.origin.name]) for o in opened
            if rows[o.origin.name] and bad[o.origin.name] / rows[o.origin.name] > o.src.max_bad_fraction]
    if not over:
        return
    store.finish({"rows": dict(rows), "bad_rows": dict(bad)}, status="failed")
    first = {}
    for p in store.rejected_paths():
        for r in pq.read_table(p, columns=["key", "origin", "location", "reason"]).to_pylist():
            if "#" not in r["key"]:
                first.setdefault(r["origin"], r)
    from distill.sources import SourceError

    raise SourceError("; ".join(
        f"traces source {o.origin.name!r}: {n_bad} of {n} input rows are malformed ({n_bad / n:.1%} > "
        f"max_bad_fraction={o.src.max_bad_fraction:g}); they are in {store.root / 'rejected'}. First: "
        f"{first.get(o.origin.name, {}).get('location')}: {first.get(o.origin.name, {}).get('reason')}"
        for o, n_bad, n in over))


def run(cfg: RunConfig, run_dir: Path) -> Manifest:
    start = time.monotonic()
    tc = STAGE.config(cfg)
    opened = [open_source(s, run_dir, int(tc.chunk_mb * (1 << 20))) for s in tc.sources]
    units = plan(opened)
    settings = {**output_fields(tc), "tokenizer": cfg.train.student.model}
    inputs = {o.origin.name: o.origin.content_hash for o in opened}
    fp = fingerprint({"settings": settings, "inputs": inputs})
    root = run_dir / STAGE.name
    old = Manifest.read(root)
    if old is not None and old.fingerprint != fp:
        why = diff_settings(old.settings, settings) + [f"input {k} changed" for k in inputs if old.inputs.get(k) != inputs[k]]
        print(f"import: recomputing {root} ({'; '.join(why) or 'fingerprint changed'})", flush=True)
        shutil.rmtree(root)
    store = ShardStore(root, stage=STAGE.name, fingerprint=fp, settings=settings, schema=IMPORTED_SCHEMA,
                       rejected_schema=IMPORT_REJECTED_SCHEMA, inputs=inputs).open()
    keep_under, mix = _mix(store, opened, units, cfg)
    done = set(store.shard_names())
    from distill.store import shard_name

    todo = [u for u in units if shard_name(u.index) not in done]
    print(f"import: {len(opened)} sources in {len(units)} units, {len(todo)} to do", flush=True)
    per_source: dict[str, Counter] = {o.origin.name: Counter() for o in opened}
    args = (opened, tc.seed, keep_under, cfg.train.student.model, str(store.root))
    for res in map_items(import_unit, args, todo, cfg, lambda u: f"import shard {u.index} (source {u.source})"):
        store.commit_staged(res.staged)
        c = per_source[opened[res.source].origin.name]
        c.update(candidates=res.candidates, kept=res.staged.rows, rejected=res.staged.rejected_rows,
                 tokens=res.tokens, bytes=res.in_bytes)
    _check_budgets(store, opened)
    seconds = time.monotonic() - start
    this_run = {n: dict(c) for n, c in per_source.items()}
    samples = sum(c["kept"] + c["rejected"] for c in per_source.values())
    mb = sum(c["bytes"] for c in per_source.values()) / (1 << 20)
    summary = {"sources_this_run": this_run, "mix": mix, "samples_per_s": round(samples / max(seconds, 1e-9), 1),
               "mb_per_s": round(mb / max(seconds, 1e-9), 2)}
    return finish_stage(store, "import", seconds, summary)


STAGE = Stage("import", "traces", run, resources, reads=None, preflight=preflight, schema=IMPORTED_SCHEMA,
              rejected=IMPORT_REJECTED_SCHEMA)
