"""Shared plumbing of the curation stages (verify, filter, dedup, decontam, sft).

These stages are deterministic functions of their input dataset and settings, and cheap next to
generation. So, unlike `generate` (whose output is refused when settings change, because it cost
GPU hours and is not reproducible), a curation stage whose settings or input changed is simply
recomputed, with a line saying why. An unchanged stage resumes: its work units are partitions of
whole questions (below), committed one shard each, so "done" is the set of committed shard numbers.

Data never passes through the driver: workers read their partition's files, write their shard
to `.tmp/`, and return its name and counts; the driver renames it into place. So the run
directory must be on storage every node sees (the cluster recipes mount one), and the driver's
memory does not grow with the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.config import RunConfig, fingerprint, output_fields
from distill.fsio import fsync_file, rename_into_place
from distill.progress import Progress, format_counter
from distill.stages import ActorAsk, Stage
from distill.store import (
    Manifest, ShardStore, StagedShard, diff_settings, partition_of, read_shards, require_complete,
    shard_index, shard_name, stage_shard,
)


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


def open_derived(run_dir: Path, stage: "Stage", cfg: RunConfig,
                 extra_inputs: dict[str, str] | None = None) -> ShardStore:
    """The stage's store, recomputed from scratch when its settings (its config section) or its
    input changed. Its schemas are the stage object's."""
    reads = stage.input_name(cfg)
    up_root = run_dir / reads
    require_complete(up_root, f"distill run CONFIG (stage {reads})")
    settings = output_fields(stage.config(cfg))
    inputs = {reads: dataset_digest(up_root), **(extra_inputs or {})}
    fp = fingerprint({"settings": settings, "inputs": inputs})
    root = run_dir / stage.name
    old = Manifest.read(root)
    if old is not None and old.fingerprint != fp:
        why = diff_settings(old.settings, settings) + (
            [f"input {k} changed" for k in inputs if old.inputs.get(k) != inputs[k]])
        print(f"{stage.name}: recomputing {root} ({'; '.join(why) or 'fingerprint changed'})", flush=True)
        shutil.rmtree(root)
    return ShardStore(root, stage=stage.name, fingerprint=fp, settings=settings, schema=stage.output_schema(run_dir, cfg),
                      rejected_schema=stage.rejected_schema(run_dir, cfg), inputs=inputs).open()


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


# --------------------------------------------------------------------------- partitions
#
# A curation stage's work unit is a partition: the questions whose `partition_of(id, P)` is p,
# with every sample of each. Output shard p holds exactly partition p, so the next stage's
# partition p is one file, and "done" is "part-p exists". Generation cuts shards by arrival, so
# the first stage after it (verify) exchanges its input once: map tasks split batches of input
# shards by partition into `STAGE/.exchange/m*/p*.parquet`, then partition p reads its pieces.
# The driver only ever holds file names and counts.

EXCHANGE = ".exchange"


@dataclass
class Unit:
    """Partition `index` of a stage: the input files holding exactly its records."""

    index: int
    inputs: list[str]


@dataclass
class UnitOutput:
    index: int
    staged: StagedShard
    stats: dict[str, Any] = field(default_factory=dict)


def choose_partitions(old: Manifest | None, fingerprint: str, upstream: Manifest, target_rows: int) -> int:
    """The stage's partition count: the upstream's when it is partitioned (no exchange); the one
    a resumed run (`old`, same fingerprint) already started with, so that changing
    `curate.shard_size` mid-run cannot re-cut committed partitions; else enough for `target_rows`
    samples per partition."""
    if upstream.partitions:
        return upstream.partitions
    if old is not None and old.partitions and old.fingerprint == fingerprint:
        return old.partitions
    return max(1, math.ceil(upstream.counts.get("records", 0) / target_rows))


_MAP_BYTES = 64 << 20
_MAX_MAPS = 64


def _map_batches(paths: list[Path]) -> list[list[str]]:
    """Consecutive input shards grouped into map tasks by size on disk (a stat, no read: an
    unreadable shard fails in a worker, which is retried and names it). At least 64 MiB a map
    and at most 64 maps, so the exchange writes at most 64 files per partition."""
    sizes = [p.stat().st_size for p in paths]
    target = max(_MAP_BYTES, -(-sum(sizes) // _MAX_MAPS))
    batches, cur, n = [], [], 0
    for p, size in zip(paths, sizes):
        cur.append(str(p))
        n += size
        if n >= target:
            batches.append(cur)
            cur, n = [], 0
    if cur:
        batches.append(cur)
    return batches


def exchange_map(paths: list[str], n_partitions: int, out_dir: str) -> dict[str, Any]:
    """Split input shards by partition into `out_dir/p{p}.parquet` (only non-empty ones), one
    shard at a time: memory is one input shard. Runs in a worker; `out_dir` is a fresh temp dir
    the driver renames into place when the map is accepted."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for path in paths:
            table = read_shards([path])
            if table.num_rows == 0:
                continue
            parts = partition_of(table.column("id").to_pylist(), n_partitions)
            for p in np.unique(parts).tolist():
                piece = table.filter(pa.array(parts == p))
                if p not in writers:
                    writers[p] = pq.ParquetWriter(out / f"p{p:05d}.parquet", piece.schema)
                writers[p].write_table(piece)
    finally:
        for w in writers.values():
            w.close()
    for f in out.iterdir():
        fsync_file(f)
    return {"dir": str(out), "parts": sorted(writers)}


def _exchange_task(item: tuple[int, list[str], int, str]) -> tuple[int, dict]:
    j, paths, n, tmp = item
    return j, exchange_map(paths, n, f"{tmp}/m{j:05d}.{uuid.uuid4().hex[:12]}")


class FnWorker:
    """A Ray actor applying a plain function to work items: `fn(*args, item)`."""

    def __init__(self, fn: Callable, args: tuple = ()):
        self.fn, self.args = fn, args

    def run(self, item: Any) -> Any:
        return self.fn(*self.args, item)


def map_items(fn: Callable, args: tuple, items: list, cfg: RunConfig, describe: Callable[[Any], str]) -> Iterator:
    """`fn(*args, item)` for each item on a pool of Ray actors, results in completion order, each
    exactly once (a died actor's item is retried; see `ReplicaPool`)."""
    import ray

    from distill.raypool import ReplicaPool

    if not items:
        return
    pool = ReplicaPool(ray.remote(FnWorker), (fn, args), replicas=min(cfg.curate.workers, len(items)),
                       options={"num_cpus": 1}, max_retries=2, describe=describe)
    try:
        yield from pool.map_unordered("run", items)
    finally:
        pool.shutdown()


def plan_units(store: ShardStore, up_root: Path, upstream: Manifest, n_partitions: int, cfg: RunConfig,
               stage: str) -> list[Unit]:
    """The partitions of this stage not yet committed, each with its input files. Runs the
    exchange first when the upstream is not partitioned the same way (resumable: a finished
    map's directory is reused)."""
    done = {shard_index(n) for n in store.shard_names()}
    todo = [p for p in range(n_partitions) if p not in done]
    if not todo:
        return []
    if upstream.partitions == n_partitions:
        return [Unit(p, [str(up_root / shard_name(p))]) for p in todo]
    ex = store.root / EXCHANGE
    ex.mkdir(exist_ok=True)
    batches = _map_batches(sorted(up_root.glob("part-*.parquet")))
    maps = [(j, b, n_partitions, str(store.root / ".tmp")) for j, b in enumerate(batches)
            if not (ex / f"m{j:05d}").is_dir()]
    if maps:
        print(f"{stage}: partitioning {len(batches)} batches of input shards into {n_partitions} partitions"
              f" ({len(maps)} to do)", flush=True)
        for j, res in map_items(_exchange_task, (), maps, cfg, lambda m: f"{stage} exchange map {m[0]} ({m[1][0]} ...)"):
            rename_into_place(res["dir"], ex / f"m{j:05d}")  # the map's commit point
    pieces: dict[int, list[str]] = {p: [] for p in todo}
    for j in range(len(batches)):
        for f in sorted((ex / f"m{j:05d}").glob("p*.parquet")):
            p = int(f.stem[1:])
            if p in pieces:
                pieces[p].append(str(f))
    return [Unit(p, pieces[p]) for p in todo]


class StageWorker:
    """A Ray actor around a plain function: `setup(*args)` once, then per partition: read its
    input files, `process(state, records)` -> (kept, rejected) or (kept, rejected, stats), and
    write the result to the stage's `.tmp/` for the driver to commit."""

    def __init__(self, setup: Callable, args: tuple, process: Callable, out_root: str, schema: pa.Schema,
                 rejected_schema: pa.Schema):
        self.state = setup(*args)
        self.process = process
        self.out = (out_root, schema, rejected_schema)

    def run(self, unit: Unit) -> UnitOutput:
        table = read_shards(unit.inputs)
        records = [] if table is None else table.to_pylist()
        del table
        # Question order inside a partition follows the input files; samples by index.
        records = [r for g in group_by_question(records).values() for r in g]
        kept, rejected, *rest = self.process(self.state, records)
        root, schema, rejected_schema = self.out
        return UnitOutput(unit.index, stage_shard(root, unit.index, kept, rejected, schema, rejected_schema),
                          rest[0] if rest else {})


def placed(ask: ActorAsk, n_units: int) -> ActorAsk:
    """What a pool actually starts for `ask`: no more replicas than work units, nor than the
    cluster's CPUs hold (more would hold units that never start)."""
    import ray

    total = ray.cluster_resources().get("CPU", 1)
    cpus = min(ask.cpus, total)
    replicas = max(1, min(ask.replicas, n_units, int(total // cpus) if cpus else ask.replicas))
    return ActorAsk(replicas, cpus, ask.gpus, ask.what)


def record_actors(store: ShardStore, ask: ActorAsk, used: ActorAsk | None) -> None:
    store.manifest.summary = {**store.manifest.summary, "actors": {
        "asked": {"replicas": ask.replicas, "cpus": ask.cpus, "gpus": ask.gpus},
        "placed": None if used is None else {"replicas": used.replicas, "cpus": used.cpus, "gpus": used.gpus}}}


def run_units(store: ShardStore, units: list[Unit], cfg: RunConfig, stage: str, *, setup: Callable,
              setup_args: tuple, process: Callable, ask: ActorAsk) -> tuple[Counter, float]:
    """Run `process` over the partitions on a pool of Ray actors; commit each as it arrives."""
    import ray

    from distill.raypool import ReplicaPool

    stats: Counter = Counter()
    bar = Progress(len(units), stage, enabled=cfg.run.progress)
    used = placed(ask, len(units)) if units else None
    record_actors(store, ask, used)
    if units:
        args = (setup, setup_args, process, str(store.root), store.schema, store.rejected_schema)
        pool = ReplicaPool(ray.remote(StageWorker), args, replicas=used.replicas, options={"num_cpus": used.cpus},
                           max_retries=2, describe=lambda u: f"{stage} partition {u.index} ({', '.join(u.inputs[:3])}"
                                                             f"{' ...' if len(u.inputs) > 3 else ''})")
        try:
            for res in pool.map_unordered("run", units):
                store.commit_staged(res.staged)
                stats.update(res.stats)
                bar.update(res.staged.rows + res.staged.rejected_rows, 0)
        finally:
            pool.shutdown()
    bar.close()
    return stats, bar.elapsed


def open_partitioned(run_dir: Path, stage: "Stage", cfg: RunConfig,
                     extra_inputs: dict[str, str] | None = None) -> tuple[ShardStore, list[Unit]]:
    """The stage's store (`open_derived`) and the partitions left to do, with their inputs."""
    old = Manifest.read(run_dir / stage.name)  # before `open` rewrites it
    store = open_derived(run_dir, stage, cfg, extra_inputs)
    up = Manifest.read(run_dir / stage.input_name(cfg))
    n = choose_partitions(old, store.manifest.fingerprint, up, cfg.curate.shard_size)
    store.manifest.partitions = n
    store.manifest.write(store.root)
    units = plan_units(store, run_dir / stage.input_name(cfg), up, n, cfg, stage.name)
    return store, units


def finish_stage(store: ShardStore, stage: str, seconds: float, summary: dict | None = None) -> Manifest:
    n = store.manifest.partitions
    if n:
        # Never "complete" with a partition missing: the next stage would silently lose it.
        missing = sorted(set(range(n)) - {shard_index(x) for x in store.shard_names()})
        if missing:
            raise RuntimeError(f"{stage}: partitions {missing[:10]} of {n} have no committed shard in {store.root}")
        shutil.rmtree(store.root / EXCHANGE, ignore_errors=True)
    elif not store.shard_names():
        # Nothing survived (or nothing came in): an empty shard still carries the schema, so the
        # next stage reads "zero records" instead of failing on a missing file.
        store.commit(store.next_index(), [])
    manifest = store.finish({"seconds": round(seconds, 2), **{k: v for k, v in store.manifest.summary.items()
                                                             if k == "actors"}, **(summary or {})})
    c = manifest.counts
    print(f"{stage}: {c['records']} kept, {c['rejected']} rejected ({format_counter(c['rejected_by_reason'])})"
          f" in {seconds:.1f}s", flush=True)
    return manifest


