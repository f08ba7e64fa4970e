"""Stage `filter`: verified samples -> the samples worth training on.

Reads `RUN/verify/`, writes `RUN/filter/`; every rejected sample lands in `RUN/filter/rejected/`
with the filter that rejected it ("repetition: 41% of 8-grams repeated (max 20%)"). Filters that
look at a whole question (max samples per question, difficulty band) see all of its samples,
because work units hold whole questions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from distill.config import RunConfig, output_fields
from distill.stages.derived import (
    done_question_ids, finish_stage, input_schema, open_derived, plan_question_units, rejected_schema_for,
    run_units,
)
from distill.store import read_records, reason_code


def _setup(filter_cfg):
    return filter_cfg


def _process(filter_cfg, records):
    from distill.curate.filters import apply_filters

    kept, rejected = apply_filters(records, filter_cfg)
    return kept, rejected, Counter(reason_code(r["reason"]) for r in rejected)


def run(cfg: RunConfig, run_dir: Path):
    fc = cfg.curate.filters
    schema = input_schema(run_dir / "verify")
    store = open_derived(run_dir, "filter", "verify", output_fields(fc), schema, rejected_schema_for(schema))
    samples = read_records(run_dir / "verify")
    units = plan_question_units(samples, done_question_ids(store), cfg.curate.shard_size, store.next_index())
    print(f"filter: {len(samples)} samples in {len(units)} shards to filter", flush=True)
    _, seconds = run_units(store, units, cfg, "filter", setup=_setup, setup_args=(fc,), process=_process)
    return finish_stage(store, "filter", seconds)
