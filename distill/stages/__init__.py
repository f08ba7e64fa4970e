"""Stage registry: config name -> "module:function" taking (RunConfig, run_dir).

Each stage module is imported only when the stage runs, so `distill config ...` stays fast and a
CPU-only install never imports a GPU-only stage's dependencies. A stage may also register a
preflight `(RunConfig) -> None` that checks its inputs before any stage of the run starts, and
declares what it asks Ray for (`resources(RunConfig) -> ActorAsk`): its run sizes its actor pool
with that function and `--dry-run` prints it, so the two cannot drift.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ActorAsk:
    """The Ray actors a stage asks for: `replicas` x (`cpus`, `gpus`). A pool may place fewer
    (no more than its work units, or than the cluster's CPUs hold) and says so in its manifest."""

    replicas: int
    cpus: float
    gpus: float = 0.0
    what: str = ""

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

STAGE_RESOURCES: dict[str, str] = {name: ref.replace(":run", ":resources") for name, ref in STAGE_RUNNERS.items()}
"""Every stage module defines `resources` beside `run`."""

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


def stage_resources(name: str, cfg) -> ActorAsk:
    return _load(STAGE_RESOURCES[name])(cfg)
