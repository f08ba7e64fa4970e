"""Stage registry: config name -> "module:function" taking (RunConfig, run_dir).

Each stage module is imported only when the stage runs, so `distill config ...` stays fast and a
CPU-only install never imports a GPU-only stage's dependencies. A stage may also register a
preflight `(RunConfig) -> None` that checks its inputs before any stage of the run starts.
"""

from __future__ import annotations

import importlib
from typing import Callable

STAGE_RUNNERS: dict[str, str] = {
    "generate": "distill.stages.generate:run",
    "verify": "distill.stages.verify:run",
    "filter": "distill.stages.filter:run",
    "dedup": "distill.stages.dedup:run",
    "decontam": "distill.stages.decontam:run",
    "sft": "distill.stages.sft:run",
    "train": "distill.stages.train:run",
    "eval": "distill.stages.eval:run",
}

STAGE_PREFLIGHT: dict[str, str] = {
    "decontam": "distill.stages.decontam:preflight",
    "train": "distill.stages.train:preflight",
    "eval": "distill.stages.eval:preflight",
}

CURATE_STAGES = ("verify", "filter", "dedup", "decontam", "sft")
"""What `distill curate` runs, in order."""


def _load(ref: str) -> Callable:
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(module), fn)


def stage_runner(name: str) -> Callable:
    return _load(STAGE_RUNNERS[name])


def stage_preflight(name: str, cfg) -> None:
    if name in STAGE_PREFLIGHT:
        _load(STAGE_PREFLIGHT[name])(cfg)
