"""Stage registry: each stage is one `Stage` object, `STAGE` in the module `distill.stages.NAME`.

The object says everything the rest of distill needs to know about a stage: the config section
it owns, the stage directory it reads, its output and rejected schemas, its preflight (checks
that run before any stage of the run starts), the Ray actors it asks for (`resources`: its run
sizes its pool with it and `--dry-run` prints it, so the two cannot drift) and its run. The
pipeline, the dry run, the report's funnel and the tests read these objects; stage names are
spelled once, in `config.STAGES`.

Each module is imported only when its stage is asked for, so `distill config ...` stays fast and a
CPU-only install never imports a GPU-only stage's dependencies.
"""

from __future__ import annotations

import importlib
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from distill.config import CURATE_STAGES, STAGES  # noqa: F401  (CURATE_STAGES: re-exported)

if TYPE_CHECKING:
    import pyarrow as pa

    from distill.config import RunConfig


@dataclass(frozen=True)
class ActorAsk:
    """The Ray actors a stage asks for: `replicas` x (`cpus`, `gpus`). A pool may place fewer
    (no more than its work units, or than the cluster's CPUs hold) and says so in its manifest."""

    replicas: int
    cpus: float
    gpus: float = 0.0
    what: str = ""


@dataclass(frozen=True)
class Stage:
    """One stage of `distill run`, described once."""

    name: str
    section: str
    """The config section the stage owns, as a dotted key path (`curate.filters`): `config(cfg)`
    returns it, and the stage's run reads its settings from there."""
    run: Callable[["RunConfig", Path], Any]
    """Runs the stage on `RUN/` (resumable: committed work is kept)."""
    resources: Callable[["RunConfig"], ActorAsk]
    """The actors the run asks Ray for; `--dry-run` prints the same call."""
    reads: str | None = None
    """The stage directory it reads (`source` for generate); None for stages that do not read one
    (train reads its data paths or `RUN/sft/`, eval a model)."""
    preflight: Callable[["RunConfig"], None] | None = None
    """Raises ConfigError for inputs that can be checked before the run's first stage starts."""
    schema: "pa.Schema | None" = None
    """A fixed output schema (generate, sft); None: the input's schema plus `adds`."""
    adds: tuple = ()
    """(name, pyarrow type) columns the stage appends to its input's schema."""
    rejected: "pa.Schema | None" = None
    """A fixed schema of rejected rows; None: the output schema plus `reason` and `rejected_adds`."""
    rejected_adds: tuple = ()
    shards: bool = True
    """Writes exactly-once shards under `RUN/NAME/` (a row of the report's funnel). False for
    train and eval, which write checkpoints and result files."""
    reads_from: Callable[["RunConfig"], str] | None = None
    """When the stage it reads depends on the config (verify reads `import` when the run imports
    traces): that choice; `reads` is then the default, for ordering checks."""

    def config(self, cfg: "RunConfig") -> Any:
        return operator.attrgetter(self.section)(cfg)

    def input_name(self, cfg: "RunConfig | None" = None) -> str | None:
        """The stage directory this stage reads under this config."""
        return self.reads_from(cfg) if self.reads_from is not None and cfg is not None else self.reads

    def _extended_input(self, run_dir: Path, cfg: "RunConfig | None") -> "pa.Schema":
        from distill.stages.derived import extend_schema, input_schema

        return extend_schema(input_schema(Path(run_dir) / self.input_name(cfg)), list(self.adds))

    def output_schema(self, run_dir: Path, cfg: "RunConfig | None" = None) -> "pa.Schema | None":
        """The schema of the stage's accepted shards, from its input's shards as they are on disk
        (the run opens its store with this)."""
        if not self.shards:
            return None
        return self.schema if self.schema is not None else self._extended_input(run_dir, cfg)

    def rejected_schema(self, run_dir: Path, cfg: "RunConfig | None" = None) -> "pa.Schema | None":
        """The schema of its rejected rows: the input's (plus `adds`), `reason` and `rejected_adds`."""
        if not self.shards:
            return None
        if self.rejected is not None:
            return self.rejected
        from distill.stages.derived import rejected_schema_for

        return rejected_schema_for(self._extended_input(run_dir, cfg), list(self.rejected_adds))


def questions_before(name: str) -> Callable[["RunConfig"], str]:
    """`reads_from` of a stage that reads questions: the last question stage before `name` that the
    run lists (`config.QUESTION_STAGES` order), else the ingested `source`. So a run may list any
    subset of the question stages and each reads the one before it."""

    def reads(cfg: "RunConfig") -> str:
        from distill.config import QUESTION_STAGES

        before = QUESTION_STAGES[:QUESTION_STAGES.index(name)] if name in QUESTION_STAGES else QUESTION_STAGES
        return next((s for s in reversed(before) if s in cfg.run.stages), "source")

    return reads


questions_stage = questions_before("generate")
"""The stage whose questions `generate` answers."""


def samples_stage(cfg: "RunConfig") -> str:
    """The stage whose samples curation reads: `import` when the config imports traces (the import
    mixes generated sets in itself, with `stage: generate`), else `generate`."""
    return "import" if cfg.traces.sources else "generate"


def get_stage(name: str) -> Stage:
    """The registered stage NAME (imports its module)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    stage = importlib.import_module(f"distill.stages.{name}").STAGE
    if stage.name != name:
        raise RuntimeError(f"distill.stages.{name}.STAGE is named {stage.name!r}")
    return stage
