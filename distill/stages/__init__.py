"""Stage registry: config name -> "module:function" taking (RunConfig, run_dir).

Each stage module is imported only when the stage runs, so `distill config ...` stays fast and a
CPU-only install never imports a GPU-only stage's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Callable

STAGE_RUNNERS: dict[str, str] = {
    "generate": "distill.stages.generate:run",
}


def stage_runner(name: str) -> Callable:
    module, _, fn = STAGE_RUNNERS[name].partition(":")
    return getattr(importlib.import_module(module), fn)
