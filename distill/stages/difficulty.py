"""Stage `difficulty`: questions -> the questions in the solver's pass-rate band, before `generate`.

Reads `RUN/source/` (or the question stage before it, e.g. `RUN/validate/`), writes
`RUN/difficulty/`: the same question columns plus `solver_samples`, `solver_correct`,
`solver_pass_rate`, `solver_label` (the reference, or the majority answer without one) and
`solver_agreement`. Rejected: `too_hard`, `too_easy` (outside `questions.difficulty.band`),
`no_answer` (no sample had an extractable answer), `solver_failed`. See `distill.curate.difficulty`
for the rule that stops sampling early.

The samples are graded with `curate.verify`'s settings and asked with `generate.prompt`, so the
solver sees the teacher's prompt and is graded as the teacher will be; both, and the resolved solver
engine section, are inputs of the stage's fingerprint: changing them recomputes it (and what
follows), never what comes before.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
from pydantic import ValidationError

from distill.config import ENGINE_CONFIGS, ConfigError, RunConfig, fingerprint, output_fields
from distill.section import Section
from distill.stages import ActorAsk, Stage, questions_before
from distill.stages.derived import finish_stage, open_partitioned, run_units


def solver_engine(cfg: RunConfig) -> tuple[str, Section]:
    """(engine name, its settings section) of the solver; ConfigError naming the key otherwise."""
    dc, gen = STAGE.config(cfg), cfg.generate
    name = gen.engine if dc.engine == "generate" else dc.engine
    if name not in ENGINE_CONFIGS:
        raise ConfigError([f"questions.difficulty.engine={dc.engine!r}: known: generate, "
                           f"{', '.join(sorted(ENGINE_CONFIGS))}"])
    key = "questions.difficulty.engine_settings"
    known = ENGINE_CONFIGS[name].model_fields
    problems = [f"{key}.{k}: not a setting of engine {name!r} (known: {', '.join(known)})"
                for k in sorted(set(dc.engine_settings) - set(known))]
    if problems:
        raise ConfigError(problems)
    base = gen.engine_config().model_dump() if dc.engine == "generate" else {}
    try:
        section = ENGINE_CONFIGS[name].model_validate({**base, **dc.engine_settings})
    except ValidationError as e:
        raise ConfigError([f"{key}.{'.'.join(map(str, err['loc']))}: {err['msg']} (engine {name!r})"
                           for err in e.errors()]) from e
    required = {"openai": ("base_url", "model"), "vllm": ("model",)}.get(name, ())
    problems = [f"{key}.{k} is required for the {name} solver" for k in required if not getattr(section, k)]
    if problems:
        raise ConfigError(problems)
    return name, section


def preflight(cfg: RunConfig) -> None:
    solver_engine(cfg)


def resources(cfg: RunConfig) -> ActorAsk:
    name, section = solver_engine(cfg)
    what = f"{name} solver ({section.model}), {STAGE.config(cfg).samples} samples per question at most"
    if name == "openai":
        return ActorAsk(cfg.curate.workers, 1.0, what=what)
    # A local solver holds a model in each actor: it gets the teacher's per-replica resources.
    return ActorAsk(cfg.generate.replicas, cfg.generate.cpus_per_replica, cfg.generate.gpus_per_replica, what=what)


def _setup(dc, engine_name, engine_cfg, prompt, vcfg):
    from distill.curate.verify import Verifier
    from distill.generation import build_messages
    from distill.teachers import build_engine
    from distill.teachers.base import Request, SamplingParams, derive_seed

    engine = build_engine(engine_name, engine_cfg)
    params = SamplingParams(temperature=dc.temperature, top_p=dc.top_p, max_new_tokens=dc.max_new_tokens)

    def solve(tasks):
        # One request per sample, each with its own seed: sample j is the same request in any round
        # and after a resume ("difficulty" in the seed keeps it apart from the teacher's sample j).
        results = engine.generate([Request(build_messages(q["problem"], prompt), n=1,
                                           seed=derive_seed(dc.seed, "difficulty", q["id"], j)) for q, j in tasks], params)
        return [(r.completions[0].text, None) if r.ok and r.completions else (None, r.rejected or "no completion")
                for r in results]

    return dc, solve, Verifier(vcfg), vcfg


def _process(state, records):
    from distill.curate.difficulty import assess_questions
    from distill.store import reason_code

    dc, solve, verifier, vcfg = state
    kept, rejected, stats = assess_questions(records, dc, solve, verifier, vcfg)
    return kept, rejected, Counter(reason_code(r["reason"]) for r in rejected) + Counter(stats)


def solver_inputs(cfg: RunConfig) -> dict[str, str]:
    """What the stage's output depends on besides its own section and its input, fingerprinted:
    the resolved solver engine section (volatile keys such as concurrency left out), the prompt and
    the grading settings."""
    engine_name, engine_cfg = solver_engine(cfg)
    return {"solver (engine, prompt, curate.verify)": fingerprint({
        "engine": engine_name, "settings": output_fields(engine_cfg), "prompt": output_fields(cfg.generate.prompt),
        "verify": output_fields(cfg.curate.verify)})}


def run(cfg: RunConfig, run_dir: Path):
    dc = STAGE.config(cfg)
    engine_name, engine_cfg = solver_engine(cfg)
    store, units = open_partitioned(run_dir, STAGE, cfg, extra_inputs=solver_inputs(cfg))
    print(f"difficulty: {len(units)} of {store.manifest.partitions} partitions to sample", flush=True)
    stats, seconds = run_units(store, units, cfg, "difficulty", setup=_setup,
                               setup_args=(dc, engine_name, engine_cfg, cfg.generate.prompt, cfg.curate.verify),
                               process=_process, ask=resources(cfg))
    counts = {k: stats.pop(k, 0) for k in ("solver_requests", "stopped_early")}
    return finish_stage(store, "difficulty", seconds, {"rejected_this_run": dict(stats), **counts})


STAGE = Stage("difficulty", "questions.difficulty", run, resources, reads="source", preflight=preflight,
              reads_from=questions_before("difficulty"),
              adds=(("solver_samples", pa.int64()), ("solver_correct", pa.int64()), ("solver_pass_rate", pa.float64()),
                    ("solver_label", pa.string()), ("solver_agreement", pa.float64())))
