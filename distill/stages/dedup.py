"""Stage `dedup`: drop questions that duplicate another question of the set.

Reads `RUN/filter/`, writes `RUN/dedup/`. Exact duplicates after normalisation and near
duplicates by MinHash LSH. The kept representative is the question that comes first in the
source, so the choice does not depend on shard order or worker timing.

Three steps, so that no process holds the texts of the whole set:
1. per partition, on Ray: each question's source position, normal form, exact key, MinHash
   signature and LSH band hashes, written to `dedup/.exchange/lsh-pN.parquet`;
2. in the driver: ordinals, exact keys and each band's hashes read one 8-byte column at a time,
   candidate pairs by sorting each band, then the normal forms of the candidates only, read
   back file by file, for the exact Jaccard that confirms a pair. Measured by
   tools/bench_dedup_memory.py: ~230 MiB above the driver's start per million questions
   (0.8 / 128 permutations: 21 bands), plus the candidates' normal forms;
3. per partition, on Ray: the partition's samples, minus the dropped questions' (the dropped
   set, a few bytes a duplicate, is shared through the object store).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.config import RunConfig
from distill.stages import ActorAsk, Stage
from distill.stages.derived import (
    EXCHANGE, Unit, finish_stage, map_items, open_partitioned, run_units,
)
from distill.fsio import rename_into_place
from distill.store import partition_of, read_shards

DUP_COLUMNS = [("dup_of", pa.string()), ("dup_method", pa.string()), ("dup_score", pa.float64())]


def resources(cfg: RunConfig) -> ActorAsk:
    return ActorAsk(cfg.curate.workers, 1, what="sketches and drops per partition on Ray; the decision in the driver "
                                                "(exact keys and band hashes, ~230 MiB per million questions)")


def _sketch_partition(dc, source_ids: pa.Array, tmp_dir: str, unit: Unit) -> tuple[int, str]:
    """Step 1 for one partition: one row per question, written to a temp file."""
    from distill.curate.dedup import band_hashes, exact_key, lsh_params, minhash_signatures
    from distill.curate.normalize import normalize_text

    table = read_shards(unit.inputs, ["id", "problem"])
    ids, problems = [], []
    if table is not None:
        seen = set()
        for qid, problem in zip(table.column("id").to_pylist(), table.column("problem").to_pylist()):
            if qid not in seen:
                seen.add(qid)
                ids.append(qid)
                problems.append(problem)
    # Source position decides the representative; ids not in the source come after it, in a
    # stable hash order.
    pos = pc.index_in(pa.array(ids, pa.string()), value_set=source_ids).to_numpy(zero_copy_only=False)
    missing = np.isnan(pos) if pos.dtype.kind == "f" else np.zeros(len(ids), bool)
    ordinal = np.where(missing, len(source_ids) + (partition_of(ids, 2**40) if ids else 0), np.nan_to_num(pos))
    norms = [normalize_text(t) for t in problems]
    columns = {"ordinal": pa.array(ordinal.astype(np.int64)), "id": pa.array(ids, pa.string()),
               "norm": pa.array(norms, pa.string()),
               "exact": pa.array(np.array([exact_key(n) for n in norms], dtype=np.uint64))}
    if dc.near:
        sigs = minhash_signatures(problems, dc) if ids else np.empty((0, dc.num_perm), np.uint32)
        columns["sig"] = pa.array([row.tobytes() for row in sigs], pa.binary())
        n_bands = lsh_params(dc.threshold, dc.num_perm)[0]
        bands = band_hashes(sigs, dc.threshold) if ids else np.empty((0, n_bands), np.uint64)
        for b in range(bands.shape[1]):
            columns[f"b{b}"] = pa.array(bands[:, b])
    path = f"{tmp_dir}/lsh-p{unit.index:05d}.{uuid.uuid4().hex[:12]}"
    pq.write_table(pa.table(columns), path)
    return unit.index, path


def _column(files: list[Path], name: str) -> np.ndarray:
    table = read_shards(files, [name])
    return np.empty(0) if table is None else table.column(name).to_numpy()


def _lookup(files: list[Path], column: str, ordinals: np.ndarray, convert=lambda v: v) -> dict:
    """`convert(column)` of the rows with these ordinals, one file at a time (never the whole
    column, nor all the raw values at once)."""
    out: dict = {}
    if not len(ordinals):
        return out
    wanted = pa.array(np.asarray(ordinals, dtype=np.int64))
    for f in files:
        t = read_shards([f], ["ordinal", column])
        t = t.filter(pc.is_in(t.column("ordinal"), value_set=wanted))
        out.update((o, convert(v)) for o, v in zip(t.column("ordinal").to_pylist(), t.column(column).to_pylist()))
    return out


def _decide(files: list[Path], dc) -> dict[str, tuple[str, str, float]]:
    """Step 2: dropped question id -> (kept id, method, Jaccard), from the sketch files, one
    column at a time (ordinals, exact keys, then each band): the peak is a few 8-byte columns
    and the candidate pairs, whatever the number of bands."""
    from distill.curate.dedup import candidate_pairs, pair_scores, resolve_near, shingle_hashes

    if not files:
        return {}
    ordinal = _column(files, "ordinal")
    order = np.argsort(ordinal, kind="stable")  # rows in source order from here on
    ordinal = ordinal[order]
    if not len(ordinal):
        return {}

    dropped: dict[int, tuple[int, str, float]] = {}  # row -> (kept row, method, score)
    survivors = np.arange(len(ordinal))
    if dc.exact:
        exact = _column(files, "exact")[order]
        _, first = np.unique(exact, return_index=True)  # first row of each key, in source order
        first_of = dict(zip(exact[first].tolist(), first.tolist()))
        survivors = np.sort(first)
        for row in np.setdiff1d(np.arange(len(ordinal)), first).tolist():
            dropped[row] = (first_of[int(exact[row])], "exact", 1.0)
        del exact
    bcols = [c for c in pq.read_schema(files[0]).names if c.startswith("b") and c[1:].isdigit()]
    if dc.near and bcols and len(survivors):
        pairs = survivors[candidate_pairs(_column(files, c)[order][survivors] for c in bcols)]
        need = np.unique(pairs)
        # Shingles as hash arrays, made file by file: a template-heavy set has most questions
        # among the candidates (every question of bench_scale's does).
        by_ordinal = _lookup(files, "norm", ordinal[need], lambda t: shingle_hashes(t, dc.shingle))
        scores = pair_scores(pairs, {int(r): by_ordinal[int(ordinal[r])] for r in need})
        for row, (kept, score) in resolve_near(pairs, scores, dc.threshold).items():
            dropped[row] = (kept, "near", score)

    involved = sorted({int(ordinal[r]) for r in dropped} | {int(ordinal[k]) for k, _, _ in dropped.values()})
    id_of = _lookup(files, "id", np.array(involved, dtype=np.int64))
    return {id_of[int(ordinal[r])]: (id_of[int(ordinal[k])], method, score) for r, (k, method, score) in dropped.items()}


def _setup(dropped_ref):
    import ray

    return ray.get(dropped_ref)


def _process(dropped: dict, records: list[dict]):
    kept, rejected = [], []
    for r in records:
        if r["id"] in dropped:
            kept_id, method, score = dropped[r["id"]]
            reason = f"duplicate: {method} copy of question {kept_id} (jaccard {score:.2f})"
            rejected.append({**r, "reason": reason, "dup_of": kept_id, "dup_method": method, "dup_score": float(score)})
        else:
            kept.append(r)
    return kept, rejected


def run(cfg: RunConfig, run_dir: Path, stage: Stage | None = None):
    """`stage`: the stage object this runs as (`question_dedup` runs this on questions)."""
    import ray

    stage = stage or STAGE
    dc = stage.config(cfg)
    start = time.monotonic()
    store, units = open_partitioned(run_dir, stage, cfg)
    n = store.manifest.partitions
    summary = {}
    if units:
        ex = store.root / EXCHANGE
        ex.mkdir(exist_ok=True)
        tmp = store.root / ".tmp"
        tmp.mkdir(exist_ok=True)
        # Every partition's questions take part in the decision, committed ones included.
        filter_root = run_dir / stage.input_name(cfg)
        todo = [Unit(p, [str(filter_root / f"part-{p:05d}.parquet")]) for p in range(n)
                if not (ex / f"lsh-p{p:05d}.parquet").exists()]
        # A run that imports its samples has no source/: every id is then ordered by its hash.
        source = read_shards(sorted((run_dir / "source").glob("part-*.parquet")), ["id"])
        source_ids = source.column("id").combine_chunks() if source is not None else pa.array([], pa.string())
        del source
        print(f"{stage.name}: sketching {len(todo)} of {n} partitions", flush=True)
        for p, path in map_items(_sketch_partition, (dc, source_ids, str(tmp)), todo, cfg,
                                 lambda u: f"{stage.name} sketch of partition {u.index} ({u.inputs[0]})"):
            rename_into_place(path, ex / f"lsh-p{p:05d}.parquet")
        del source_ids
        dropped = _decide([ex / f"lsh-p{p:05d}.parquet" for p in range(n)], dc)
        summary = {"questions": sum(pq.ParquetFile(ex / f"lsh-p{p:05d}.parquet").metadata.num_rows for p in range(n)),
                   "duplicate_questions": len(dropped)}
        print(f"{stage.name}: {summary['duplicate_questions']} of {summary['questions']} questions are duplicates",
              flush=True)
        run_units(store, units, cfg, stage.name, setup=_setup, setup_args=(ray.put(dropped),), process=_process,
                  ask=resources(cfg))
    return finish_stage(store, stage.name, time.monotonic() - start, summary)


STAGE = Stage("dedup", "curate.dedup", run, resources, reads="filter", rejected_adds=tuple(DUP_COLUMNS))
