"""Stage `synthesize`: seed questions -> new questions from the teacher engine (and the seeds).

Reads `RUN/source/`, writes `RUN/synthesize/`: the question columns every later question stage
and `generate` read, plus provenance (`method`, `variant`, `seed_ids`, `persona`, `concepts`,
`teacher`, `params_hash`, `teacher_answer`). Rejected: replies without a usable question
(`no_question`, `unparsable`, `truncated`, `same_as_seed`), failed requests with the engine's
reason, malformed persona lines (`location` = file:line) and concept lists that are not the asked
JSON (`method` "concepts"; the extraction pass itself is cached in `concepts/`). The methods are
`distill.curate.synthesis.METHODS`, the settings `questions.synthesize`.

Work is cut like `generate`'s (tasks keyed by method, seeds, variant, index and the method's
settings hash; shards by arrival, staged by the replicas, committed by the driver), so a killed
run resumes with nothing asked twice that was committed. Like a curation stage, and unlike
`generate`, the stage is recomputed when its settings, the teacher or its input change: its
questions are cheap next to the answers, and a changed method would otherwise leave stale rows.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from distill.config import ConfigError, RunConfig, fingerprint, output_fields
from distill.curate.synthesis import (
    GRAPH_METHODS, METHODS, PlanContext, SynthTask, build_graph, persona_rows, plan_tasks, read_personas,
)
from distill.progress import Progress, format_counter
from distill.stages import ActorAsk, Stage
from distill.stages.derived import finish_stage, open_derived
from distill.store import ShardRows, ShardStore, StagedShard, reason_code, stage_shard
from distill.sources import SOURCE_SCHEMA

SYNTH_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + [
    pa.field("method", pa.string()), pa.field("variant", pa.string()), pa.field("seed_ids", pa.list_(pa.string())),
    pa.field("persona", pa.string()), pa.field("concepts", pa.list_(pa.string())), pa.field("teacher", pa.string()),
    pa.field("params_hash", pa.string()), pa.field("teacher_answer", pa.string())])
"""One row per question: the seeds passed through (`method` "seed") and the synthesized ones."""

SYNTH_REJECTED_SCHEMA = pa.schema(list(SYNTH_SCHEMA) + [
    pa.field("reason", pa.string()), pa.field("reply", pa.string()), pa.field("location", pa.string())])
"""`reply`: the teacher's raw reply (or the malformed persona line); `location`: file:line of a
quarantined persona."""


CONCEPT_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + [
    pa.field("teacher", pa.string()), pa.field("topics", pa.list_(pa.string())),
    pa.field("knowledge_points", pa.list_(pa.string()))])
"""The cached extraction pass (`RUN/synthesize/concepts/`): one row per seed."""
CONCEPT_REJECTED_SCHEMA = pa.schema(list(SOURCE_SCHEMA) + [
    pa.field("teacher", pa.string()), pa.field("reason", pa.string()), pa.field("reply", pa.string())])


def resources(cfg: RunConfig) -> ActorAsk:
    gen, sc = cfg.generate, STAGE.config(cfg)
    if not sc.methods:
        return ActorAsk(1, 1.0, 0.0, "no method: the seeds passed through, no engine")
    what = f"{gen.engine} engine, teacher {gen.engine_config().model}, methods {', '.join(sc.methods) or '(none)'}"
    return ActorAsk(gen.replicas, gen.cpus_per_replica, gen.gpus_per_replica, what)


def preflight(cfg: RunConfig) -> None:
    p = STAGE.config(cfg).persona.path
    if "persona" in STAGE.config(cfg).methods and p and (p.startswith((".", "/")) or p.endswith((".jsonl", ".json"))) \
            and not Path(p).is_file():
        raise ConfigError([f"questions.synthesize.persona.path: {p!r} does not exist (a JSON Lines file of "
                           "{\"persona\": ...} lines, or a Hub dataset id)"])


class SynthReplica:
    """One teacher engine in one Ray actor: a unit of tasks -> a staged shard."""

    def __init__(self, cfg: RunConfig, out_root: str):
        from distill.teachers import build_engine
        from distill.teachers.base import SamplingParams

        gen, sc = cfg.generate, STAGE.config(cfg)
        # Built on the first unit that asks the teacher: a unit of seeds passed through needs none
        # (loading a vLLM teacher takes minutes).
        self.engine = None
        self._build = lambda: build_engine(gen.engine, gen.engine_config())
        self.params = SamplingParams(temperature=sc.temperature, top_p=sc.top_p, max_new_tokens=sc.max_tokens,
                                     seed=sc.seed)
        self.teacher, self.teacher_answers = f"{gen.engine}:{gen.engine_config().model}", sc.teacher_answers
        self.out_root = out_root
        self.extract_tokens = sc.concept_graph.extract_max_tokens

    def run(self, unit: tuple[int, list[SynthTask]]) -> tuple[StagedShard, Counter, Counter]:
        from distill.curate.synthesis import synthesize_unit

        index, tasks = unit
        if self.engine is None and any(t.method != "seed" for t in tasks):
            self.engine = self._build()
        kept, rejected = synthesize_unit(self.engine, tasks, self.params, self.teacher, self.teacher_answers)
        staged = stage_shard(self.out_root, index, kept, rejected, SYNTH_SCHEMA, SYNTH_REJECTED_SCHEMA)
        return staged, Counter(r["method"] for r in kept), Counter(reason_code(r["reason"]) for r in rejected)

    def extract(self, unit: tuple[int, list[dict]]) -> tuple[StagedShard, Counter, Counter]:
        """A unit of seeds -> their concepts, staged in `concepts/`."""
        from distill.curate.synthesis import extract_unit
        from distill.teachers.base import SamplingParams

        index, seeds = unit
        if self.engine is None:
            self.engine = self._build()
        # Greedy: the concepts of a seed are a reading of it, not a creative choice.
        params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=self.extract_tokens, seed=0)
        kept, rejected = extract_unit(self.engine, seeds, params, self.teacher)
        staged = stage_shard(Path(self.out_root) / "concepts", index, kept, rejected, CONCEPT_SCHEMA,
                             CONCEPT_REJECTED_SCHEMA)
        return staged, Counter(extracted=len(kept)), Counter(reason_code(r["reason"]) for r in rejected)


def _units(items: Iterable, done, size: int, first: int, key=lambda t: t.key) -> Iterator[tuple[int, list]]:
    """The tasks (or seeds) not yet committed, `size` a unit, made as the pool asks for them."""
    todo = (t for t in items if key(t) not in done)
    for index in itertools.count(first):
        chunk = list(itertools.islice(todo, size))
        if not chunk:
            return
        yield index, chunk


def _copy_rejected_extractions(cstore: ShardStore, store: ShardStore, done) -> None:
    """Rejected concept lists also go to the stage's own rejected rows (method `concepts`), so the
    report's funnel counts them with their reasons: one shard per extraction shard, copied once
    (a shard whose first key is committed was copied before a kill)."""
    import pyarrow.parquet as pq

    for path in cstore.rejected_paths():
        rows = pq.read_table(path).to_pylist()
        if not rows or f"concepts:{rows[0]['id']}" in done:
            continue
        store.commit(store.next_index(), [], [
            {"key": f"concepts:{r['id']}", "method": "concepts", "seed_ids": [r["id"]], "teacher": r["teacher"],
             "reason": r["reason"], "reply": r["reply"]} for r in rows])


def _load_personas(sc) -> tuple[list[str], list[dict], str]:
    """The persona list, its quarantined lines and its content hash (an input of the stage)."""
    personas, bad = read_personas(persona_rows(sc.persona), sc.persona.column)
    return personas, bad, fingerprint(personas)


def run(cfg: RunConfig, run_dir: Path):
    import ray

    from distill.raypool import ReplicaPool

    sc, gen = STAGE.config(cfg), cfg.generate
    personas, bad_personas, persona_hash = _load_personas(sc) if "persona" in sc.methods else ([], [], "")
    teacher = {"engine": gen.engine, "model": output_fields(gen.engine_config())}
    # A method's hash (in its questions' keys and ids) covers its own section and the sampling
    # settings, not the other methods' sections: changing one method leaves the others' ids alone.
    shared = {k: v for k, v in output_fields(sc).items() if k not in ("methods", "keep_seeds", *METHODS)}
    hashes = {m: fingerprint({"method": m, "settings": output_fields(getattr(sc, m)), "shared": shared,
                              "teacher": teacher, "personas": persona_hash if m == "persona" else None})
              for m in sc.methods}
    store = open_derived(run_dir, STAGE, cfg, {"teacher": fingerprint(teacher), "personas": persona_hash})
    done = store.done_key_hashes()

    # Malformed persona lines: quarantined once, in a shard of their own, as the source's are.
    lines = len(personas) + len(bad_personas)
    quarantine = [{"key": f"personas:{b['location']}", "method": "persona", "reason": b["reason"], "reply": b["raw"],
                   "location": b["location"]} for b in bad_personas]
    if quarantine and quarantine[0]["key"] not in done:
        store.commit(store.next_index(), [], quarantine)
    if "persona" in sc.methods and (not personas or len(bad_personas) / lines > sc.persona.max_bad_fraction):
        store.finish(status="failed")
        first = f"; first: {bad_personas[0]['location']}: {bad_personas[0]['reason']}" if bad_personas else ""
        raise ConfigError([f"questions.synthesize.persona.path: {len(bad_personas)} of {lines} persona lines are "
                           f"malformed (max_bad_fraction={sc.persona.max_bad_fraction:g}), quarantined in "
                           f"{store.root / 'rejected'}{first}"])

    seeds = ShardRows(run_dir / STAGE.input_name(cfg), ["id", "problem", "answer", "source"])
    ctx = PlanContext(sc, hashes, personas)
    pool, extracted = None, Counter()

    def replicas(n_units: int):
        nonlocal pool
        if pool is None:  # one pool for both passes: the engine is built once per replica
            ask = resources(cfg)
            pool = ReplicaPool(ray.remote(SynthReplica), (cfg, str(store.root)), replicas=min(ask.replicas, n_units),
                               options={"num_cpus": ask.cpus, "num_gpus": ask.gpus},
                               max_retries=gen.max_shard_retries, describe=lambda u: f"synthesize unit {u[0]}")
        return pool

    try:
        if graph_methods := [m for m in sc.methods if m in GRAPH_METHODS]:
            # The extraction pass: its own exactly-once shards under concepts/, done once per
            # fingerprint of the stage and reused by both graph methods.
            extraction = {"teacher": teacher, "max_tokens": sc.concept_graph.extract_max_tokens}
            cstore = ShardStore(store.root / "concepts", stage="synthesize.concepts", fingerprint=fingerprint(extraction),
                                settings=extraction, schema=CONCEPT_SCHEMA,
                                rejected_schema=CONCEPT_REJECTED_SCHEMA).open()
            cdone = cstore.done_key_hashes()
            todo = sum(q["id"] not in cdone for q in seeds)
            print(f"synthesize: listing the concepts of {todo} seeds ({len(seeds) - todo} done)", flush=True)
            if todo:
                for staged, _, rej in replicas(-(-todo // sc.shard_size)).map_unordered(
                        "extract", _units(seeds, cdone, sc.shard_size, cstore.next_index(), key=lambda q: q["id"])):
                    cstore.commit_staged(staged)
                    extracted.update(rej)
            counts = cstore.finish({"rejected_this_run": dict(extracted)}).counts
            _copy_rejected_extractions(cstore, store, done)
            cols = ["id", "problem", "answer", "source", "topics", "knowledge_points"]
            ctx.graph = build_graph(({k: r[k] for k in cols[:4]}, r["topics"], r["knowledge_points"])
                                    for r in ShardRows(cstore.root, cols))
            digest = ctx.graph.digest()
            hashes.update({m: fingerprint([hashes[m], digest]) for m in graph_methods})
            extracted = Counter({"seeds": counts["records"], "concepts": len(ctx.graph.nodes),
                                 **{f"rejected_{k}": v for k, v in counts["rejected_by_reason"].items()}})
            print(f"synthesize: concept graph of {len(ctx.graph.nodes)} concepts from {counts['records']} seeds "
                  f"({counts['rejected']} extraction replies rejected)", flush=True)
    except BaseException:
        if pool is not None:
            pool.shutdown()
        raise
    planned = sum(t.key not in done for t in plan_tasks(seeds, ctx))  # a second pass over the seeds, not held
    n_units = -(-planned // sc.shard_size)
    print(f"synthesize: {len(seeds)} seeds, methods {', '.join(sc.methods) or '(none)'}; {planned} questions to make "
          f"in {n_units} shards", flush=True)
    made, rejected = Counter(), Counter()
    bar = Progress(n_units, "synthesize", enabled=cfg.run.progress)
    try:
        if n_units:
            for staged, kept, rej in replicas(n_units).map_unordered(
                    "run", _units(plan_tasks(seeds, ctx), done, sc.shard_size, store.next_index())):
                store.commit_staged(staged)
                made.update(kept)
                rejected.update(rej)
                bar.update(staged.rows + staged.rejected_rows, 0)
    finally:
        if pool is not None:
            pool.shutdown()
    bar.close()
    summary = {"made_this_run": dict(made), "rejected_this_run": dict(rejected), "personas": len(personas),
               "persona_lines_quarantined": len(bad_personas), "concepts": dict(extracted)}
    print(f"synthesize: this run {format_counter(made)}", flush=True)
    return finish_stage(store, "synthesize", bar.elapsed, summary)


STAGE = Stage("synthesize", "questions.synthesize", run, resources, reads="source", preflight=preflight,
              schema=SYNTH_SCHEMA, rejected=SYNTH_REJECTED_SCHEMA)
