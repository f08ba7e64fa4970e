"""Stage `decontam`: remove samples whose question (or, optionally, response) is a benchmark problem.

The lexical (and embedding) checks find the closest benchmark problem; `curate.decontam.policy`
then decides on what differs between the two (`compare_problems`): `copies` removes copies,
`variants` also numbers-changed template variants, `overlap` every match. Pairs the comparison
leaves unsure, and maybe-band candidates, go to the judge when it is enabled.

Reads `RUN/dedup/`, writes `RUN/decontam/`. The benchmark files are read and hashed before any
stage of the run starts (`preflight`), so an unreadable file fails the run at once, naming it.
The n-gram index is built once in the driver and shared with the workers through the Ray object
store; the embedding model, when enabled, is loaded once per worker. Every removal keeps an audit
trail: the benchmark, its item id, the method, the score and the matched benchmark text. The
manifest records each benchmark file's sha256, so "decontaminated against AIME24" names exactly
which copy.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa

from distill.config import RunConfig, fingerprint
from distill.stages import ActorAsk, Stage
from distill.stages.derived import finish_stage, open_partitioned, run_units

AUDIT_COLUMNS = [("bench", pa.string()), ("bench_id", pa.string()), ("match_method", pa.string()),
                 ("match_score", pa.float64()), ("match_field", pa.string()), ("matched_text", pa.string()),
                 ("match_kind", pa.string()), ("match_diff", pa.string())]


def preflight(cfg: RunConfig) -> None:
    """Read every benchmark now: a missing or malformed file fails before any work."""
    from distill.curate.benchmarks import load_benchmarks

    load_benchmarks(cfg.curate.decontam.benchmarks)


def resources(cfg: RunConfig) -> ActorAsk:
    what = "n-gram index in the object store"
    if cfg.curate.decontam.judge.enabled:
        what += f"; the {cfg.generate.engine} teacher judges candidates in each actor"
    return ActorAsk(cfg.curate.workers, 1, what=what)


def _setup(dc, index_ref, embed_ref, gen):
    import ray

    engine = None
    if dc.judge.enabled:
        from distill.teachers import build_engine

        engine = build_engine(gen.engine, gen.engine_config())
    return dc, ray.get(index_ref), ray.get(embed_ref) if embed_ref is not None else None, engine


def _matches(texts: list[str], index, embed) -> list:
    from distill.curate.decontam import combine

    lexical = index.check_many(texts)
    if embed is None:
        return lexical
    # Embeddings only for what the lexical checks did not surely flag: the expensive model runs
    # on the (few) unclear records, not on every one.
    todo = [i for i, m in enumerate(lexical) if m is None or m.candidate]
    for i, m in zip(todo, embed.check_many([texts[i] for i in todo])):
        lexical[i] = combine(lexical[i], m)
    return lexical


def _judge(engine, dc, pairs: list[tuple[str, str]]) -> list[bool | None]:
    """The teacher's yes/no on each (record text, benchmark text) candidate pair."""
    from distill.curate.decontam import judge_messages, parse_judge
    from distill.teachers.base import Request, SamplingParams

    params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=dc.judge.max_tokens, seed=0)
    results = engine.generate([Request(judge_messages(a, b, dc.policy)) for a, b in pairs], params)
    return [parse_judge(r.completions[0].text) if r.ok else None for r in results]


def _to_judge(match) -> bool:
    return match.candidate or match.kind == "unsure"


def _process(state, records):
    dc, index, embed, engine = state
    # A question's samples share its text: check each distinct problem once.
    problems = sorted({r["problem"] for r in records})
    by_problem = dict(zip(problems, _matches(problems, index, embed)))
    by_response = [None] * len(records)
    if dc.check_response:
        by_response = _matches([r.get("response") or "" for r in records], index, embed)
    found = []
    for r, resp in zip(records, by_response):
        match, field = by_problem[r["problem"]], "problem"
        if (match is None or match.candidate) and resp is not None and not resp.candidate:
            match, field = resp, "response"
        found.append((match, field))

    stats = Counter()
    verdicts: dict[tuple[str, str], bool | None] = {}
    # The judge sees the maybe band of the scores and the pairs `compare_problems` left unsure.
    candidates = sorted({(r[f] if f == "problem" else r.get("response") or "", m.text)
                         for r, (m, f) in zip(records, found) if m is not None and _to_judge(m)})
    if candidates and engine is not None:
        # The cap is applied per work unit; candidates past it stay unjudged, i.e. flagged.
        judged = candidates[: dc.judge.max_candidates]
        verdicts = dict(zip(judged, _judge(engine, dc, judged)))
    kept, rejected = [], []
    for r, (match, field) in zip(records, found):
        text = r["problem"] if field == "problem" else r.get("response") or ""
        how = match.method if match is not None else None
        if match is not None and _to_judge(match):
            verdict = verdicts.get((text, match.text))
            what = "candidates" if match.candidate else "unsure"
            stats[f"{what}_{'judged_' + str(verdict).lower() if engine is not None else 'unjudged'}"] += 1
            # Without a judge a maybe-band candidate is kept, while an unsure pair (its score is
            # sure; only the comparison hesitates) is removed; an unreadable judge reply removes
            # either (conservative).
            if verdict is False or (engine is None and match.candidate):
                match = None
            elif engine is not None:
                how = f"{match.method}+judge"
        if match is None:
            kept.append(r)
            continue
        stats[f"hits.{match.benchmark}"] += 1
        rejected.append({
            **r, "reason": f"contaminated: {field} matches {match.benchmark}:{match.item_id} "
                           f"({how}, score {match.score:.2f}{', ' + match.kind if match.kind else ''})",
            "bench": match.benchmark, "bench_id": str(match.item_id), "match_method": how,
            "match_kind": match.kind or "", "match_diff": match.diff,
            "match_score": float(match.score), "match_field": field, "matched_text": match.text,
        })
    return kept, rejected, stats


def run(cfg: RunConfig, run_dir: Path, stage: Stage | None = None):
    """`stage`: the stage object this runs as (`question_decontam` runs this on questions)."""
    import ray

    from distill.curate.benchmarks import load_benchmarks
    from distill.curate.decontam import BenchmarkIndex

    stage = stage or STAGE
    dc = stage.config(cfg)
    benchmarks = load_benchmarks(dc.benchmarks)
    provenance = {b.name: b.provenance() for b in benchmarks}
    # The benchmark hashes are inputs: a changed benchmark file recomputes the stage.
    benchmark_hashes = {f"benchmark:{n}": fingerprint(p["sha256"]) for n, p in provenance.items()}
    store, units = open_partitioned(run_dir, stage, cfg, extra_inputs=benchmark_hashes)
    print(f"{stage.name}: {len(units)} of {store.manifest.partitions} partitions against {len(benchmarks)} benchmarks "
          f"({', '.join(f'{b.name}={len(b.items)}' for b in benchmarks) or 'none'})", flush=True)
    index_ref = embed_ref = None
    if units:
        index_ref = ray.put(BenchmarkIndex(benchmarks, dc))
        if dc.embedding.enabled:  # benchmark embeddings computed once here, shared by all workers
            from distill.curate.decontam import EmbeddingIndex

            embed_ref = ray.put(EmbeddingIndex(benchmarks, dc.embedding, dc.policy))
    stats, seconds = run_units(store, units, cfg, stage.name, setup=_setup,
                               setup_args=(dc, index_ref, embed_ref, cfg.generate), process=_process,
                               ask=resources(cfg))
    return finish_stage(store, stage.name, seconds, {"benchmarks": provenance, "this_run": dict(stats)})


STAGE = Stage("decontam", "curate.decontam", run, resources, reads="dedup", preflight=preflight,
              rejected_adds=tuple(AUDIT_COLUMNS))
