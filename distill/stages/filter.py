"""Stage `filter`: verified samples -> the samples worth training on.

Reads `RUN/verify/`, writes `RUN/filter/`; every rejected sample lands in `RUN/filter/rejected/`
with the filter that rejected it ("repetition: 41% of 8-grams repeated (max 20%)"). Filters that
look at a whole question (max samples per question, difficulty band) see all of its samples,
because work units are partitions of whole questions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from distill.config import RunConfig
from distill.stages import ActorAsk, Stage
from distill.stages.derived import finish_stage, open_partitioned, run_units
from distill.store import reason_code


def resources(cfg: RunConfig) -> ActorAsk:
    return ActorAsk(cfg.curate.workers, 1)


def _setup(filter_cfg):
    return filter_cfg


def _process(filter_cfg, records):
    from distill.curate.filters import apply_filters

    kept, rejected = apply_filters(records, filter_cfg)
    return kept, rejected, Counter(reason_code(r["reason"]) for r in rejected)


def run(cfg: RunConfig, run_dir: Path):
    fc = STAGE.config(cfg)
    store, units = open_partitioned(run_dir, STAGE, cfg)
    print(f"filter: {len(units)} of {store.manifest.partitions} partitions to filter", flush=True)
    _, seconds = run_units(store, units, cfg, "filter", setup=_setup, setup_args=(fc,), process=_process,
                            ask=resources(cfg))
    return finish_stage(store, "filter", seconds)


STAGE = Stage("filter", "curate.filters", run, resources, reads="verify")
