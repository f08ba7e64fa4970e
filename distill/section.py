"""The base class of every config section, in a module of its own so that component modules
(`distill/curate/verify.py`, `distill/train/config.py`, ...) can define their config classes
without importing the run config that composes them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed config section: unknown keys are errors, field docstrings are the help text."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)
    _volatile: ClassVar[frozenset[str]] = frozenset()
    """Fields that change only how fast a stage runs; left out of the stage fingerprint."""
