"""Teacher engines. `ENGINES` maps a config name to "module:Class", read off the engine
registry `distill.config.ENGINE_CONFIGS` (each settings class names its engine); importing is
lazy so that choosing `openai` never imports torch and choosing `hf` never imports vllm."""

from __future__ import annotations

import importlib

from distill.config import ENGINE_CONFIGS

from distill.teachers.base import (  # noqa: F401  (the protocol is the package's public face)
    Completion,
    Request,
    Result,
    SamplingParams,
    TeacherEngine,
    derive_seed,
    split_reasoning,
)

ENGINES: dict[str, str] = {name: cls.engine_class for name, cls in ENGINE_CONFIGS.items()}


def engine_class(name: str) -> type:
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(name: str, cfg) -> TeacherEngine:
    """Construct engine `name` from its config section (e.g. `GenerateConfig.hf`)."""
    return engine_class(name)(cfg)
