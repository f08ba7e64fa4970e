"""`distill run`: validate, check every input the stages will need, ingest the source, then run
each configured stage in order."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from distill.config import RunConfig
from distill.progress import format_counter
from distill.raypool import connect
from distill.sources import ingest
from distill.stages import get_stage


def save_resolved_config(cfg: RunConfig, run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None) -> Path:
    start = time.monotonic()
    stages = list(stages if stages is not None else cfg.run.stages)
    # Inputs a later stage needs (benchmark files, the student's config) are checked before the
    # first stage starts: a typo in a benchmark path must not surface after hours of generation.
    # The preflights see run.stages as this invocation runs them (`distill train` runs only train).
    planned = cfg.model_copy(update={"run": cfg.run.model_copy(update={"stages": stages})})
    for stage in stages:
        if (preflight := get_stage(stage).preflight) is not None:
            preflight(planned)

    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir)
    print(f"distill: run directory {run_dir.resolve()}; stages: {', '.join(stages)}", flush=True)

    if any(get_stage(s).input_name(cfg) == "source" for s in stages):
        src = ingest(cfg.mix if cfg.mix is not None else cfg.source, run_dir / "source")
        state = "unchanged, reused" if src.skipped else f"{src.rows} rows read"
        print(f"source: {src.valid} questions ({state}); {src.bad} quarantined ({format_counter(src.reasons)})",
              flush=True)

    print(f"ray: {connect(cfg.ray)}", flush=True)
    for stage in stages:
        get_stage(stage).run(cfg, run_dir)

    print(f"distill: finished in {time.monotonic() - start:.1f}s; outputs under {run_dir}", flush=True)
    return run_dir
