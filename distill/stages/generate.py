"""Stage `generate`: seed questions -> n teacher samples each, on a pool of Ray actors.

Reads `RUN/source/` (or the last question stage the run lists, e.g. `RUN/validate/`), writes
`RUN/generate/`. Resumable at any point: finished shards are
skipped, and raising `generate.n_samples` generates only the new samples.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import RunConfig
from distill.generation import (
    GEN_REJECTED_SCHEMA, GENERATED_SCHEMA, WorkUnit, changed_questions, count_missing, generation_settings, iter_units,
    run_unit, sampling_params, settings_hash, teacher_name,
)
from distill.progress import Progress, format_counter
from distill.raypool import ReplicaPool
from distill.stages import ActorAsk, Stage, questions_stage
from distill.store import (
    Manifest, ShardStore, ShardRows, StagedShard, StaleOutputError, reason_code, require_complete, stage_shard,
)

log = logging.getLogger("distill.generate")


@dataclass
class UnitDone:
    """What a replica returns for a unit: the shard it staged and its counts, not the records."""

    staged: StagedShard
    tokens: int
    rejected: Counter
    stats: dict[str, float] = field(default_factory=dict)


class TeacherReplica:
    """One engine in one Ray actor. `run` generates a work unit and stages its shard in `out_root`
    (the driver commits it)."""

    def __init__(self, cfg: RunConfig, out_root: str):
        import faulthandler
        import sys

        from distill.teachers import build_engine

        # A native crash (segfault in a kernel, OOM-killed thread) otherwise leaves only Ray's
        # "worker died"; this puts the Python stack in the worker's log.
        faulthandler.enable(file=sys.stderr, all_threads=True)

        gen = cfg.generate
        self.engine = build_engine(gen.engine, gen.engine_config())
        self.args = (sampling_params(gen), gen.prompt, teacher_name(gen), settings_hash(gen))
        self.out_root = out_root

    def run(self, unit: WorkUnit) -> UnitDone:
        before = self.engine.stats()
        result = run_unit(self.engine, unit, *self.args)
        after = self.engine.stats()
        staged = stage_shard(self.out_root, unit.index, result.records, result.rejected, GENERATED_SCHEMA,
                             GEN_REJECTED_SCHEMA)
        return UnitDone(staged, int(sum(r["n_tokens"] for r in result.records)),
                        Counter(reason_code(r["reason"]) for r in result.rejected),
                        {k: after[k] - before.get(k, 0) for k in after})


def resources(cfg: RunConfig) -> ActorAsk:
    gen = cfg.generate
    what = f"{gen.engine} engine, teacher {gen.engine_config().model}, {gen.n_samples} samples per question"
    if gen.engine == "vllm":
        what += f", tensor parallel {gen.vllm.tensor_parallel_size}"
    if gen.engine == "openai":
        what += f" at {gen.openai.base_url} ({gen.openai.concurrency} requests in flight per replica)"
    return ActorAsk(gen.replicas, gen.cpus_per_replica, gen.gpus_per_replica, what)


def run(cfg: RunConfig, run_dir: Path) -> Manifest:
    import ray

    gen = STAGE.config(cfg)
    reads = run_dir / STAGE.input_name(cfg)
    source = require_complete(reads, "distill run CONFIG")
    # The source is streamed a shard at a time (three passes: changed ids, count, units), never held.
    questions = ShardRows(reads, ["id", "problem", "answer", "source"])
    params_hash = settings_hash(gen)
    store = ShardStore(run_dir / STAGE.name, stage=STAGE.name, fingerprint=params_hash,
                       settings=generation_settings(gen), schema=STAGE.output_schema(run_dir),
                       rejected_schema=STAGE.rejected_schema(run_dir), inputs={"source": source.fingerprint}).open()
    # One shard's (id, problem) at a time: the stored samples are never all in memory.
    stored = itertools.chain(ShardRows(store.root, ["id", "problem"]),
                             ShardRows(store.root, ["id", "problem"], rejected=True))
    changed = changed_questions(stored, ShardRows(reads, ["id", "problem"]))
    if changed:
        raise StaleOutputError(
            f"{store.root} holds samples for {len(changed)} question ids whose problem text has changed in "
            f"the source (e.g. {changed[0]!r}). Give changed questions new ids, or write to a new run.dir.")
    done = store.done_key_hashes()
    planned = count_missing(questions, gen.n_samples, params_hash, done)
    n_units = -(-planned // gen.shard_size)
    n_questions = len(questions)
    print(f"generate: {n_questions} questions x {gen.n_samples} samples; {planned} to generate "
          f"in {n_units} shards ({n_questions * gen.n_samples - planned} already done)", flush=True)
    units = iter_units(questions, n_samples=gen.n_samples, params_hash=params_hash, done=done,
                       shard_size=gen.shard_size, first_index=store.next_index(), base_seed=gen.sampling.seed)

    stats, rejected = Counter(), Counter()
    bar = Progress(n_units, "generate", enabled=cfg.run.progress)
    pool = None
    if n_units:
        actor = ray.remote(TeacherReplica)
        ask = resources(cfg)
        options = {"num_cpus": ask.cpus, "num_gpus": ask.gpus}
        pool = ReplicaPool(actor, (cfg, str(store.root)), replicas=min(ask.replicas, n_units), options=options,
                           max_retries=gen.max_shard_retries, describe=lambda u: f"shard {u.index}")
        for res in pool.map_unordered("run", units):
            store.commit_staged(res.staged)
            stats.update(res.stats)
            rejected.update(res.rejected)
            bar.update(res.staged.rows + res.staged.rejected_rows, res.tokens)
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


STAGE = Stage("generate", "generate", run, resources, reads="source", schema=GENERATED_SCHEMA,
              rejected=GEN_REJECTED_SCHEMA, reads_from=questions_stage)
