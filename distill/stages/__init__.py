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

from distill.config import CURATE_STAGES, STAGES  # noqa: F401  (CURATE_STAGES: re-exported)


@dataclass(frozen=True)
class ActorAsk:
    """The Ray actors a stage asks for: `replicas` x (`cpus`, `gpus`). A pool may place fewer
    (no more than its work units, or than the cluster's CPUs hold) and says so in its manifest."""

    replicas: int
    cpus: float
    gpus: float = 0.0
    what: str = ""


STAGE_RUNNERS: dict[str, str] = {name: f"distill.stages.{name}:run" for name in STAGES}
"""Stage NAME is the module `distill.stages.NAME`, with `run`, `resources` and, when it has
inputs to check before any stage starts, `preflight`."""

STAGE_RESOURCES: dict[str, str] = {name: f"distill.stages.{name}:resources" for name in STAGES}


def _load(ref: str) -> Callable:
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(module), fn)


def stage_runner(name: str) -> Callable:
    return _load(STAGE_RUNNERS[name])


def stage_preflight(name: str, cfg) -> None:
    check = getattr(importlib.import_module(f"distill.stages.{name}"), "preflight", None)
    if check is not None:
        check(cfg)


def stage_resources(name: str, cfg) -> ActorAsk:
    return _load(STAGE_RESOURCES[name])(cfg)
