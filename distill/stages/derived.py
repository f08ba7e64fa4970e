"""Shared plumbing of the curation stages (verify, filter, dedup, decontam, sft).

These stages are deterministic functions of their input dataset and settings, and cheap next to
generation. So, unlike `generate` (whose output is refused when settings change, because it cost
GPU hours and is not reproducible), a curation stage whose settings or input changed is simply
recomputed, with a line saying why. An unchanged stage resumes: work units are groups of whole
questions, so a question's samples are committed together and "done" is the set of question ids
in committed shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from distill.config import RunConfig, fingerprint
from distill.progress import Progress, format_counter
from distill.store import Manifest, ShardStore, diff_settings, require_complete


def dataset_digest(root: Path) -> str:
    """Identity of a finished stage directory: its manifest fingerprint and committed files.

    Shards are immutable once renamed into place, so names and sizes identify the content
    without reading it (a stat per file instead of a full scan).
    """
    m = Manifest.read(root)
    files = sorted(p for p in root.glob("part-*.parquet")) + sorted((root / "rejected").glob("part-*.parquet"))
    listing = [(str(p.relative_to(root)), p.stat().st_size) for p in files]
    blob = json.dumps({"fingerprint": m.fingerprint if m else None, "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def input_schema(root: Path) -> pa.Schema:
    """Schema of a stage's accepted shards (the first one; all shards share it)."""
    parts = sorted(root.glob("part-*.parquet"))
    if not parts:
        raise RuntimeError(f"{root} has no shards")
    return pq.read_schema(parts[0]).remove_metadata()


def extend_schema(schema: pa.Schema, extra: list[tuple[str, pa.DataType]]) -> pa.Schema:
    names = set(schema.names)
    for name, typ in extra:
        if name not in names:
            schema = schema.append(pa.field(name, typ))
    return schema


def open_derived(run_dir: Path, stage: str, upstream: str, settings: dict, schema: pa.Schema,
                 rejected_schema: pa.Schema, extra_inputs: dict[str, str] | None = None) -> ShardStore:
    """The stage's store, recomputed from scratch when its settings or its input changed."""
    up_root = run_dir / upstream
    require_complete(up_root, f"distill run CONFIG (stage {upstream})")
    inputs = {upstream: dataset_digest(up_root), **(extra_inputs or {})}
    fp = fingerprint({"settings": settings, "inputs": inputs})
    root = run_dir / stage
    old = Manifest.read(root)
    if old is not None and old.fingerprint != fp:
        why = diff_settings(old.settings, settings) + (
            [f"input {k} changed" for k in inputs if old.inputs.get(k) != inputs[k]])
        print(f"{stage}: recomputing {root} ({'; '.join(why) or 'fingerprint changed'})", flush=True)
        shutil.rmtree(root)
    return ShardStore(root, stage=stage, fingerprint=fp, settings=settings, schema=schema,
                      rejected_schema=rejected_schema, inputs=inputs).open()


def rejected_schema_for(schema: pa.Schema, extra: list[tuple[str, pa.DataType]] = ()) -> pa.Schema:
    return extend_schema(schema, [("reason", pa.string()), *extra])


def group_by_question(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records grouped by question id, groups in first-seen order, samples by sample_idx."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["id"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.get("sample_idx") or 0)
    return groups


@dataclass
class Unit:
    """A shard's worth of whole questions."""

    index: int
    records: list[dict]


def plan_question_units(records: list[dict], done_ids: set[str], shard_size: int, first_index: int) -> list[Unit]:
    groups = [g for qid, g in group_by_question(records).items() if qid not in done_ids]
    units, cur, n = [], [], 0
    for g in groups:
        cur.extend(g)
        n += 1
        if n == shard_size:
            units.append(Unit(first_index + len(units), cur))
            cur, n = [], 0
    if cur:
        units.append(Unit(first_index + len(units), cur))
    return units


@dataclass
class UnitOutput:
    index: int
    kept: list[dict]
    rejected: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)


class StageWorker:
    """A Ray actor around a plain function: `setup(*args)` once, then `process(state, records)`
    per unit, returning (kept, rejected) or (kept, rejected, stats)."""

    def __init__(self, setup: Callable, args: tuple, process: Callable):
        self.state = setup(*args)
        self.process = process

    def run(self, unit: Unit) -> UnitOutput:
        out = self.process(self.state, unit.records)
        kept, rejected, *rest = out
        return UnitOutput(unit.index, kept, rejected, rest[0] if rest else {})


def run_units(store: ShardStore, units: list[Unit], cfg: RunConfig, stage: str, *, setup: Callable,
              setup_args: tuple, process: Callable, cpus: float = 1) -> tuple[Counter, float]:
    """Run `process` over the units on a pool of Ray actors; commit each result as it arrives."""
    import ray

    from distill.raypool import ReplicaPool

    stats: Counter = Counter()
    bar = Progress(len(units), stage, enabled=cfg.run.progress)
    if units:
        # More actors than the cluster can place would hold units that never start.
        total = ray.cluster_resources().get("CPU", 1)
        cpus = min(cpus, total)
        replicas = max(1, min(cfg.curate.workers, len(units), int(total // cpus)))
        pool = ReplicaPool(ray.remote(StageWorker), (setup, setup_args, process), replicas=replicas,
                           options={"num_cpus": cpus}, max_retries=2, describe=lambda u: f"{stage} shard {u.index}")
        try:
            for res in pool.map_unordered("run", units):
                store.commit(res.index, res.kept, res.rejected)
                stats.update(res.stats)
                bar.update(len(res.kept) + len(res.rejected), 0)
        finally:
            pool.shutdown()
    bar.close()
    return stats, bar.elapsed


def finish_stage(store: ShardStore, stage: str, seconds: float, summary: dict | None = None) -> Manifest:
    if not store.shard_names():
        # Nothing survived (or nothing came in): an empty shard still carries the schema, so the
        # next stage reads "zero records" instead of failing on a missing file.
        store.commit(store.next_index(), [])
    manifest = store.finish({"seconds": round(seconds, 2), **(summary or {})})
    c = manifest.counts
    print(f"{stage}: {c['records']} kept, {c['rejected']} rejected ({format_counter(c['rejected_by_reason'])})"
          f" in {seconds:.1f}s", flush=True)
    return manifest


def done_question_ids(store: ShardStore) -> set[str]:
    return {r["id"] for r in store.read_columns(("id",))}

