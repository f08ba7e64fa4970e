"""Stage `question_dedup`: the dedup stage's exact and near-duplicate removal, on questions, before
any is answered.

Reads the question stage before it (or `RUN/source/`), writes `RUN/question_dedup/`; settings are
`curate.dedup`'s, and the machinery is `distill/stages/dedup.py`'s (the representative of a
duplicate group is the question that comes first in the source). Removing a duplicate here saves
its generation; the `dedup` stage after generation still runs on the samples (a mix or an import
can bring duplicates back).
"""

from __future__ import annotations

from pathlib import Path

from distill.config import RunConfig
from distill.stages import Stage, dedup, questions_before


def run(cfg: RunConfig, run_dir: Path):
    return dedup.run(cfg, run_dir, STAGE)


STAGE = Stage("question_dedup", "curate.dedup", run, dedup.resources, reads="source",
              reads_from=questions_before("question_dedup"), rejected_adds=dedup.STAGE.rejected_adds)
