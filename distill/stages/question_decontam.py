"""Stage `question_decontam`: the decontam stage's benchmark check, on questions, before any is
answered.

Reads the question stage before it (or `RUN/source/`), writes `RUN/question_decontam/`; settings,
benchmarks, audit columns and judge are `curate.decontam`'s and the machinery
`distill/stages/decontam.py`'s. A benchmark problem removed here is never sent to the teacher; the
`decontam` stage after generation still checks the samples (and their responses, with
`check_response`).
"""

from __future__ import annotations

from pathlib import Path

from distill.config import RunConfig
from distill.stages import Stage, decontam, questions_before


def run(cfg: RunConfig, run_dir: Path):
    return decontam.run(cfg, run_dir, STAGE)


STAGE = Stage("question_decontam", "curate.decontam", run, decontam.resources, reads="source",
              reads_from=questions_before("question_decontam"), preflight=decontam.preflight,
              rejected_adds=decontam.STAGE.rejected_adds)
