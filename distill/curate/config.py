"""Config of the curation stages (`curate:` section): one sub-section per step."""

from __future__ import annotations

from pydantic import Field

from distill.curate.decontam import DecontamConfig
from distill.curate.dedup import DedupConfig
from distill.curate.filters import FilterConfig
from distill.curate.sft import SFTFormatConfig
from distill.curate.verify import VerifyConfig
from distill.section import Section


class CurateConfig(Section):
    shard_size: int = Field(default=1024, ge=1)
    """Samples per partition, as a target: the first curation stage splits its input into
    ceil(samples / shard_size) partitions by a stable hash of the question id (all samples of a
    question in one, so per-question filters and pass rates see every sample), and the later
    stages keep them. A partition is a worker's unit of memory and of retry (1,024 R1-length
    samples: ~30 MB of text); more partitions mean more, smaller shards. A resumed stage keeps
    the partition count it started with."""

    workers: int = Field(default=2, ge=1)
    """Ray actors per curation stage (and per exchange or dedup-sketch step). The verify stage's actors each run `verify.workers`
    processes, so its actor count is also capped by the cluster's CPUs."""

    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    """Final-answer extraction and verification (stage `verify`)."""

    filters: FilterConfig = Field(default_factory=FilterConfig)
    """Sample and question filters (stage `filter`)."""

    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Exact and near-duplicate questions (stage `dedup`)."""

    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    """Benchmark decontamination (stage `decontam`)."""

    sft: SFTFormatConfig = Field(default_factory=SFTFormatConfig)
    """How a kept sample becomes a training conversation (stage `sft`)."""

    _volatile = frozenset({"shard_size", "workers"})
