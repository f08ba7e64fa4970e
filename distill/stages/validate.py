"""Stage `validate`: seed questions -> the questions worth answering, before any generation.

Reads `RUN/source/` (or the question stage before it), writes `RUN/validate/` (the same question columns); `generate` then answers
these instead of the source. Rejected questions keep their reason (`too_short`, `no_question`,
`answer_in_text`, `several_questions`, `language`, and with the judge on `contradictory`,
`missing_information`, `ambiguous`, `judge_unparsable`, `judge_failed`); see
`distill.curate.questions`. Like the curation stages it is recomputed when its settings change,
and `generate` keeps every sample of a question that is still kept.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from distill.config import RunConfig
from distill.stages import ActorAsk, Stage, questions_before
from distill.stages.derived import finish_stage, open_partitioned, run_units


def resources(cfg: RunConfig) -> ActorAsk:
    vc = STAGE.config(cfg)
    what = "rule checks"
    if vc.judge.enabled:
        what += f", then the {cfg.generate.engine} engine ({cfg.generate.engine_config().model}) as well-posedness judge"
    return ActorAsk(cfg.curate.workers, 1.0, what=what)


def _setup(vc, gen):
    from distill.curate.questions import engine_judge

    judge = None
    if vc.judge.enabled:
        from distill.teachers import build_engine

        judge = engine_judge(build_engine(gen.engine, gen.engine_config()), vc.judge)
    return vc, judge


def _process(state, records):
    from distill.curate.questions import validate_questions
    from distill.store import reason_code

    vc, judge = state
    kept, rejected = validate_questions(records, vc, judge)
    return kept, rejected, Counter(reason_code(r["reason"]) for r in rejected)


def run(cfg: RunConfig, run_dir: Path):
    vc = STAGE.config(cfg)
    store, units = open_partitioned(run_dir, STAGE, cfg)
    print(f"validate: {len(units)} of {store.manifest.partitions} partitions to check", flush=True)
    reasons, seconds = run_units(store, units, cfg, "validate", setup=_setup, setup_args=(vc, cfg.generate),
                                 process=_process, ask=resources(cfg))
    return finish_stage(store, "validate", seconds, {"rejected_this_run": dict(reasons)})


STAGE = Stage("validate", "questions.validation", run, resources, reads="source", reads_from=questions_before("validate"))
