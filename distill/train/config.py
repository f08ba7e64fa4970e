"""Config of the SFT trainer (`train:` section of the run config)."""

from __future__ import annotations

from distill.section import Section


class TrainConfig(Section):
    """Fine-tuning the student on the SFT set. (Being built: fields are added with the trainer.)"""
