"""Stage `generate`: seed questions -> n teacher samples each, on a pool of Ray actors.

Reads `RUN/source/`, writes `RUN/generate/`. Resumable at any point: finished shards are
skipped, and raising `generate.n_samples` generates only the new samples.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from distill.config import RunConfig
from distill.generation import (
    GEN_REJECTED_SCHEMA, GENERATED_SCHEMA, UnitResult, WorkUnit, changed_questions, generation_settings, plan_units,
    run_unit,
    sampling_params, settings_hash, teacher_name,
)
from distill.progress import Progress, format_counter
from distill.raypool import ReplicaPool
from distill.store import Manifest, ShardStore, StaleOutputError, read_records, reason_code, require_complete

log = logging.getLogger("distill.generate")


class TeacherReplica:
    """One engine in one Ray actor. `run` is a plain function of a work unit."""

    def __init__(self, cfg: RunConfig):
        import faulthandler
        import sys

        from distill.teachers import build_engine

        # A native crash (segfault in a kernel, OOM-killed thread) otherwise leaves only Ray's
        # "worker died"; this puts the Python stack in the worker's log.
        faulthandler.enable(file=sys.stderr, all_threads=True)

        gen = cfg.generate
        self.engine = build_engine(gen.engine, gen.engine_config())
        self.args = (sampling_params(gen), gen.prompt, teacher_name(gen), settings_hash(gen))

    def run(self, unit: WorkUnit) -> UnitResult:
        before = self.engine.stats()
        result = run_unit(self.engine, unit, *self.args)
        after = self.engine.stats()
        result.stats = {k: after[k] - before.get(k, 0) for k in after}
        return result


def run(cfg: RunConfig, run_dir: Path) -> Manifest:
    import ray

    gen = cfg.generate
    source = require_complete(run_dir / "source", "distill run CONFIG")
    questions = read_records(run_dir / "source", ["id", "problem", "answer", "source"])
    params_hash = settings_hash(gen)
    store = ShardStore(run_dir / "generate", stage="generate", fingerprint=params_hash,
                       settings=generation_settings(gen), schema=GENERATED_SCHEMA,
                       rejected_schema=GEN_REJECTED_SCHEMA, inputs={"source": source.fingerprint}).open()
    changed = changed_questions(store.read_columns(("id", "problem")), questions)
    if changed:
        raise StaleOutputError(
            f"{store.root} holds samples for {len(changed)} question ids whose problem text has changed in "
            f"the source (e.g. {changed[0]!r}). Give changed questions new ids, or write to a new run.dir.")
    units = plan_units(questions, n_samples=gen.n_samples, params_hash=params_hash, done=store.done_keys(),
                       shard_size=gen.shard_size, first_index=store.next_index(), base_seed=gen.sampling.seed)
    planned = sum(len(u.tasks) for u in units)
    print(f"generate: {len(questions)} questions x {gen.n_samples} samples; {planned} to generate "
          f"in {len(units)} shards ({len(questions) * gen.n_samples - planned} already done)", flush=True)

    stats, rejected = Counter(), Counter()
    bar = Progress(len(units), "generate", enabled=cfg.run.progress)
    pool = None
    if units:
        actor = ray.remote(TeacherReplica)
        options = {"num_cpus": gen.cpus_per_replica, "num_gpus": gen.gpus_per_replica}
        pool = ReplicaPool(actor, (cfg,), replicas=min(gen.replicas, len(units)), options=options,
                           max_retries=gen.max_shard_retries, describe=lambda u: f"shard {u.index}")
        for res in pool.map_unordered("run", units):
            store.commit(res.index, res.records, res.rejected)
            stats.update(res.stats)
            rejected.update(reason_code(r["reason"]) for r in res.rejected)
            bar.update(len(res.records) + len(res.rejected), int(sum(r["n_tokens"] for r in res.records)))
        pool.shutdown()
    bar.close()

    summary = {
        "generated_this_run": bar.samples, "rejected_this_run": dict(rejected), "seconds": round(bar.elapsed, 2),
        "samples_per_s": round(bar.samples / max(bar.elapsed, 1e-9), 3),
        "tokens_per_s": round(bar.tokens / max(bar.elapsed, 1e-9), 1),
        "shard_retries": dict(pool.retries) if pool else {},
        "engine": {k: int(v) if float(v).is_integer() else round(v, 3) for k, v in stats.items()},
    }
    manifest = store.finish(summary)
    c = manifest.counts
    engine_retries = {k: v for k, v in summary["engine"].items() if k.startswith("retries")}
    print(f"generate: done. {c['records']} samples in {c['shards']} shards, {c['rejected']} rejected "
          f"({format_counter(c['rejected_by_reason'])}); this run: {bar.samples} samples in "
          f"{bar.elapsed:.1f}s = {summary['samples_per_s']} samples/s, {summary['tokens_per_s']} tok/s; "
          f"retries: shards {format_counter(summary['shard_retries'])}, requests "
          f"{format_counter(engine_retries)}", flush=True)
    return manifest
