"""The resolved plan of a run, without running it: what `distill run CFG --dry-run` prints.

For every stage: the Ray actors it asks for (replicas x CPUs / GPUs). For training: the world
size and its split into data, tensor, pipeline, context and (DeepSpeed Ulysses) sequence parallel
degrees, the global batch, the steps when they are known, a per-GPU memory estimate, and which of
the memory settings (chunked loss, activation checkpointing, sequence parallelism, offload) the
run needs to fit an 80 GB GPU, or would need. Nothing here needs a GPU or the network:
the student's shape comes from its HF config when that is readable offline (a local directory, the
packaged model, the local Hub cache), else from `KNOWN_MODELS`, else the estimate says what to set.

The estimates are the arithmetic of the ZeRO paper (Rajbhandari et al., 2020: 2 + 2 + 12 bytes per
parameter in bf16 mixed precision with Adam) and of Korthikanti et al., 2022 ("Reducing Activation
Recomputation in Large Transformer Models": 34 * s * b * h bytes of activations per layer with
FlashAttention, which never stores the s x s scores). They are rough on purpose (no allocator
fragmentation, no NCCL buffers, no ZeRO-3 prefetch buckets): a plan well under the GPU's memory is
a reason to try, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from distill.train.shape import ModelShape, shape_from_hf_config  # noqa: F401  (ModelShape: re-exported)

GB = 1e9
GPU_BYTES = 80 * GB
"""What a plan on GPUs is checked against: an 80 GB H100 / A100 (an H200's 141 GB holds more)."""


# --------------------------------------------------------------------------- model shapes


# Public facts from each model's config.json on the Hugging Face Hub, so that a dry run on a
# machine without the Hub still sizes the common students and teachers. `params()` of each
# reproduces the count on its model card (e.g. 7.62B for Qwen2.5-7B), which a test checks.
_QWEN2_1P5B = dict(n_layers=28, hidden=1536, n_heads=12, n_kv_heads=2, intermediate=8960, vocab=151936, qkv_bias=True)
_QWEN2_7B = dict(n_layers=28, hidden=3584, n_heads=28, n_kv_heads=4, intermediate=18944, vocab=152064, qkv_bias=True)
_QWEN2_32B = dict(n_layers=64, hidden=5120, n_heads=40, n_kv_heads=8, intermediate=27648, vocab=152064, qkv_bias=True)
KNOWN_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-1.5B": ModelShape(**_QWEN2_1P5B, max_positions=131072, tied_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(**_QWEN2_1P5B, max_positions=32768, tied_embeddings=True),
    "Qwen/Qwen2.5-Math-1.5B": ModelShape(**_QWEN2_1P5B, max_positions=4096, tied_embeddings=True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ModelShape(**_QWEN2_1P5B, max_positions=131072,
                                                            tied_embeddings=False),
    "Qwen/Qwen2.5-7B": ModelShape(**_QWEN2_7B, max_positions=131072, tied_embeddings=False),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(**_QWEN2_7B, max_positions=32768, tied_embeddings=False),
    "Qwen/Qwen2.5-Math-7B": ModelShape(**_QWEN2_7B, max_positions=4096, tied_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": ModelShape(**_QWEN2_7B, max_positions=131072, tied_embeddings=False),
    "Qwen/Qwen2.5-32B": ModelShape(**_QWEN2_32B, max_positions=131072, tied_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": ModelShape(**_QWEN2_32B, max_positions=131072,
                                                           tied_embeddings=False),
    "meta-llama/Llama-3.1-8B": ModelShape(n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, intermediate=14336,
                                          vocab=128256, max_positions=131072, tied_embeddings=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3,
                                                      intermediate=1536, vocab=49152, max_positions=8192,
                                                      tied_embeddings=True),
}


def read_model_shape(name: str) -> tuple[ModelShape | None, str]:
    """The student's shape and where it came from, offline and without converting anything.

    Order: a local directory's config.json; the packaged model (its converted cache, else the
    GGUF's own metadata); the local Hugging Face cache of a Hub id; `KNOWN_MODELS`. (None, why)
    when none has it.
    """
    shape, source, _ = _read_student(name)
    return shape, source


def _read_student(name: str) -> tuple[ModelShape | None, str, object | None]:
    """read_model_shape, plus the HF config it came from (None for KNOWN_MODELS or unknown)."""
    from transformers import AutoConfig

    from distill.teachers.models import DEFAULT_CACHE_DIR, PACKAGED_MODELS, packaged_gguf_path

    local = Path(name).expanduser()
    config, source = None, ""
    if local.is_dir():
        config, source = AutoConfig.from_pretrained(local), f"config.json in {local}"
    elif name in PACKAGED_MODELS:
        converted = DEFAULT_CACHE_DIR.expanduser() / f"{name}-{PACKAGED_MODELS[name].version}"
        if converted.is_dir():
            config, source = AutoConfig.from_pretrained(converted), f"packaged model ({converted})"
        else:
            gguf = packaged_gguf_path(name)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            source = f"packaged model ({gguf.name} metadata)"
    else:
        try:
            config, source = AutoConfig.from_pretrained(name, local_files_only=True), "local Hugging Face cache"
        except (OSError, ValueError):
            pass
    if config is not None:
        return shape_from_hf_config(config, count=True), source, config
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name], "built-in table of public configs (distill.plan.KNOWN_MODELS)", None
    return None, (f"unknown model {name!r}: give train.student.model as a local directory (or one of "
                  f"{', '.join(sorted(KNOWN_MODELS))})"), None


# --------------------------------------------------------------------------- parallelism


@dataclass(frozen=True)
class Parallel:
    world: int
    dp: int
    """Data-parallel degree: how many different rows a step reads at once (per micro-batch slot)."""
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: int = 1
    """DeepSpeed's Ulysses degree (train.deepspeed.sequence_parallel): ranks sharing each row."""


def parallel_degrees(world: int, tp: int = 1, pp: int = 1, cp: int = 1, sp: int = 1) -> Parallel:
    """Split `world` ranks into dp x tp x pp x cp x sp; ValueError when tp * pp * cp * sp does not divide it."""
    model_parallel = tp * pp * cp * sp
    if world % model_parallel:
        raise ValueError(f"{world} ranks are not a multiple of tp*pp*cp*sp = {tp}*{pp}*{cp}*{sp} = {model_parallel}")
    return Parallel(world=world, dp=world // model_parallel, tp=tp, pp=pp, cp=cp, sp=sp)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU rank (and what offload keeps off the GPU, per rank)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    cpu: float = 0.0
    nvme: float = 0.0

    @property
    def gpu_total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.logits


def bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter with AdamW.

    bf16 mixed precision: bf16 weights and gradients, fp32 master weights + m + v (2 + 2 + 12, the
    ZeRO paper's K = 12). fp32: the weights are the master copy, so the optimizer adds m + v only.
    """
    return (2, 2, 12) if precision == "bf16" else (4, 4, 8)


def model_state_bytes(n_params: float, *, dp: int, tp: int = 1, pp: int = 1, zero_stage: int = 0,
                      precision: str = "bf16", offload_optimizer: str = "none", offload_param: str = "none",
                      distributed_optimizer: bool = False) -> tuple[float, float, float, float, float]:
    """(params, grads, optimizer) bytes on each GPU, then (cpu, nvme) bytes each rank offloads.

    Tensor and pipeline parallelism split every state by tp * pp (embeddings included: vocab-
    parallel under TP). Over the dp replicas, ZeRO-1 (or Megatron's distributed optimizer) shards
    the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights. Offload moves the
    optimizer state (ZeRO >= 1) or the weights (ZeRO-3) to CPU RAM or NVMe.
    """
    wb, gb, ob = bytes_per_param(precision)
    local = n_params / (tp * pp)
    p, g, o = local * wb, local * gb, local * ob
    if zero_stage >= 1 or distributed_optimizer:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    if zero_stage >= 3:
        p /= dp
    off = {"cpu": 0.0, "nvme": 0.0}
    if offload_optimizer != "none":
        off[offload_optimizer] += o
        o = 0.0
    if offload_param != "none":
        # The GPU still holds the layers being computed (prefetch buckets); not counted.
        off[offload_param] += p
        p = 0.0
    return p, g, o, off["cpu"], off["nvme"]


def activation_bytes(*, seq_len: int, micro_batch: int, hidden: int, n_layers: int, tp: int = 1, pp: int = 1,
                     cp: int = 1, grad_accum: int = 1, checkpointing: bool = False, sequence_parallel: bool = False,
                     precision: str = "bf16", ulysses: int = 1) -> float:
    """Activations kept for backward on the busiest GPU (rough).

    Per layer and micro-batch, 34 * s * b * h bytes in 16-bit with FlashAttention (Korthikanti et
    al.); tensor parallelism divides 24 of the 34 (all of it with Megatron's sequence parallelism),
    context parallelism and Ulysses (`ulysses`, DeepSpeed's sequence parallelism: each rank holds
    s / degree tokens outside attention and all s tokens of heads / degree inside) divide s. With
    activation checkpointing a layer keeps only its input (2 * s * b * h) and one layer at a time is
    recomputed in full. Under 1F1B pipelining the first stage holds min(pp, micro-batches)
    micro-batches of its L / pp layers.
    """
    s = seq_len / (cp * ulysses)
    sbh = s * micro_batch * hidden
    full_layer = sbh * (34 / tp if sequence_parallel else 10 + 24 / tp)
    scale = 1 if precision == "bf16" else 2
    layers_held = math.ceil(n_layers / pp) * min(pp, grad_accum)
    if checkpointing:
        kept = layers_held * 2 * sbh / (tp if sequence_parallel else 1) + full_layer
    else:
        kept = layers_held * full_layer
    return kept * scale


DENSE_LOSS_COPIES = 3
"""fp32 [targets, vocab] tensors alive at once in the dense loss's backward: the log-probabilities
kept from forward, their gradient, and the logits' gradient (tools/bench_chunked_loss.py: 3.0x
the logits, CPU)."""
CHUNKED_LOSS_COPIES = 2
"""fp32 [chunk, vocab] tensors counted for the chunked loss: the chunk's logits, turned into
probabilities and gradients in place, plus in bf16 the matmul's output and the gradient's 16-bit
copy (the bench measures 1.1x in float32, where there are no copies; bf16 adds 0.5x)."""
LOSS_CHUNK = 512
"""The train.loss_chunk a plan suggests: 512 x 152k x 4 x 2 = 0.6 GB per rank."""


def logits_bytes(*, seq_len: int, micro_batch: int, vocab: int, tp: int = 1, cp: int = 1, ulysses: int = 1,
                 chunk: int = 0) -> float:
    """Peak memory of the loss over one micro-batch's targets (vocabulary-parallel under TP: each
    tensor rank holds vocab / tp columns; its own s / (cp x ulysses) tokens under context or
    Ulysses parallelism). Dense (chunk 0): 3 fp32 copies of [tokens, vocab]: at 16k tokens and a
    152k vocabulary ~30 GB. Chunked (train.loss_chunk): 2 copies of [chunk, vocab], whatever the
    row length (a chunk as large as the targets is the dense case). Targets are bounded by tokens."""
    tokens = seq_len / (cp * ulysses) * micro_batch
    if 0 < chunk < tokens:
        return chunk * vocab * 4 * CHUNKED_LOSS_COPIES / tp
    return tokens * vocab * 4 * DENSE_LOSS_COPIES / tp


def memory_per_gpu(shape: ModelShape, par: Parallel, *, zero_stage: int, precision: str, seq_len: int,
                   micro_batch: int, grad_accum: int = 1, checkpointing: bool = False,
                   offload_optimizer: str = "none", offload_param: str = "none",
                   distributed_optimizer: bool = False, sequence_parallel: bool = False,
                   loss_chunk: int = 0) -> Memory:
    # DeepSpeed counts every rank as data parallel (the backend gives it no sequence groups), so
    # ZeRO shards over the Ulysses groups' ranks too: over dp x sp ranks.
    p, g, o, cpu, nvme = model_state_bytes(
        shape.params(), dp=par.dp * par.sp, tp=par.tp, pp=par.pp, zero_stage=zero_stage, precision=precision,
        offload_optimizer=offload_optimizer, offload_param=offload_param,
        distributed_optimizer=distributed_optimizer)
    act = activation_bytes(seq_len=seq_len, micro_batch=micro_batch, hidden=shape.hidden, n_layers=shape.n_layers,
                           tp=par.tp, pp=par.pp, cp=par.cp, grad_accum=grad_accum, checkpointing=checkpointing,
                           sequence_parallel=sequence_parallel, precision=precision, ulysses=par.sp)
    logits = logits_bytes(seq_len=seq_len, micro_batch=micro_batch, vocab=shape.vocab, tp=par.tp, cp=par.cp,
                          ulysses=par.sp, chunk=loss_chunk)
    return Memory(params=p, grads=g, optimizer=o, activations=act, logits=logits, cpu=cpu, nvme=nvme)


# --------------------------------------------------------------------------- the plan of a run


@dataclass
class StagePlan:
    name: str
    actors: int
    cpus: float
    gpus: float = 0.0
    what: str = ""
    section: str = ""
    """The config section the stage owns (its settings)."""


@dataclass
class TrainPlan:
    backend: str
    parallel: Parallel | None
    precision: str
    zero_stage: int | None
    global_rows: int | None
    seq_len: int
    steps: str
    model: str
    model_source: str
    shape: ModelShape | None = None
    memory: Memory | None = None
    on_gpu: bool = True
    fit: list[str] = field(default_factory=list)
    """Which memory settings the run needs to fit GPU_BYTES (or would need), one line each."""


@dataclass
class Plan:
    stages: list[StagePlan]
    train: TrainPlan | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _looks_local(path: str) -> bool:
    """The rule of distill.sources.detect_format: a file suffix or a leading `.` / `/` means a
    local path; anything else that does not exist is a Hub id."""
    return Path(path).exists() or Path(path).suffix in (".jsonl", ".json", ".parquet") or path.startswith((".", "/"))


def _check_benchmarks(key: str, refs: list, problems: list[str], notes: list[str]) -> None:
    """Parse the local benchmark files now (as the stage's preflight does); list the Hub ones."""
    from distill.curate.benchmarks import BenchmarkError, load_benchmarks

    local = []
    for i, b in enumerate(refs):
        if _looks_local(b.path):
            local.append(b)
        else:
            notes.append(f"{key}[{i}] ({b.name}) is the Hub dataset {b.path!r}: not checked offline")
    try:
        load_benchmarks(local)
    except BenchmarkError as e:
        problems.append(f"{key}: {e}")


def check_inputs(cfg, stages: list[str]) -> tuple[list[str], list[str]]:
    """(problems, notes) about what the stages read, checked as their preflights would, minus the
    network: local seed and benchmark files (benchmarks are parsed), SFT files, metric sinks."""
    from distill.sources import SourceError, detect_format

    problems, notes = [], []
    if "generate" in stages and cfg.source is not None:
        try:
            fmt = detect_format(cfg.source)
        except SourceError as e:
            problems.append(str(e))
        else:
            if fmt == "hub":
                notes.append(f"source.path={cfg.source.path!r} is a Hub dataset: not checked offline")
            elif not Path(cfg.source.path).exists():
                problems.append(f"source.path={cfg.source.path!r}: no such file or directory")
    if "decontam" in stages:
        _check_benchmarks("curate.decontam.benchmarks", cfg.curate.decontam.benchmarks, problems, notes)
    if "eval" in stages:
        _check_benchmarks("eval.benchmarks", cfg.eval.benchmarks, problems, notes)
    if "train" in stages:
        from distill.train.launch import data_path_problems, sft_input_problem
        from distill.train.metrics import check_sinks

        problems += data_path_problems(cfg.train)
        # A note, not a problem: a dry run usually runs elsewhere than the run (RUN/ on a cluster).
        no_sft = sft_input_problem(cfg.train, Path(cfg.run.dir), stages[:stages.index("train")])
        if no_sft:
            notes.append(no_sft)
        problems += check_sinks(cfg.train.metrics)
    return problems, notes


def stage_resources(cfg, stages: list[str]) -> list[StagePlan]:
    """The Ray actors each stage asks for (what `ray status` will show it holding): each stage's
    own `resources`, the function its run sizes its pool with."""
    from distill.stages import get_stage

    out = []
    for name in stages:
        stage = get_stage(name)
        ask = stage.resources(cfg)
        out.append(StagePlan(name, ask.replicas, ask.cpus, ask.gpus, ask.what, section=stage.section))
    return out


def _train_parallel(train, sp: int | None = None) -> tuple[Parallel | None, list[str]]:
    """The config's degrees (`sp`: another Ulysses degree than the config's)."""
    world = train.launch.num_workers
    if train.backend == "megatron":
        m = train.megatron
        tp, pp, cp, sp = m.tensor_parallel, m.pipeline_parallel, m.context_parallel, 1
    else:
        tp = pp = cp = 1
        sp = train.deepspeed.sequence_parallel if sp is None else sp
    try:
        return parallel_degrees(world, tp, pp, cp, sp), []
    except ValueError as e:
        return None, [f"train.launch.num_workers={world}: {e}; set it to a multiple of {tp * pp * cp * sp}"]


# --------------------------------------------------------------------------- what a run needs to fit


@dataclass(frozen=True)
class MemorySettings:
    """The settings that trade speed for GPU memory, as a config has them. Cheapest first: the
    chunked loss (one more output-projection matmul per chunk), activation checkpointing (~1/3 more
    compute), sequence parallelism (4 all-to-alls per layer; Megatron's: with TP only), optimizer
    offload (a PCIe round trip of the gradients and weights per step), parameter offload (one per
    layer per micro-batch: the slowest)."""

    loss_chunk: int
    checkpointing: bool
    sp: int  # DeepSpeed Ulysses degree
    megatron_sp: bool
    offload_optimizer: str
    offload_param: str


def _settings(train) -> MemorySettings:
    if train.backend == "megatron":
        m = train.megatron
        return MemorySettings(train.loss_chunk, m.activation_checkpointing, 1, m.sequence_parallel, "none", "none")
    ds = train.deepspeed
    return MemorySettings(train.loss_chunk, ds.activation_checkpointing, ds.sequence_parallel, False,
                          ds.offload_optimizer, ds.offload_param)


def _memory(train, shape: ModelShape, precision: str, st: MemorySettings) -> Memory | None:
    """memory_per_gpu of `train` with its memory settings replaced by `st` (None: degrees invalid)."""
    par, problems = _train_parallel(train, sp=st.sp)
    if problems:
        return None
    megatron = train.backend == "megatron"
    return memory_per_gpu(
        shape, par, zero_stage=0 if megatron else train.deepspeed.zero_stage, precision=precision,
        seq_len=train.seq_len, micro_batch=train.micro_batch, grad_accum=train.grad_accum,
        checkpointing=st.checkpointing, offload_optimizer=st.offload_optimizer, offload_param=st.offload_param,
        distributed_optimizer=megatron and train.megatron.distributed_optimizer,
        sequence_parallel=st.megatron_sp, loss_chunk=st.loss_chunk)


def _levers(train, shape: ModelShape, st: MemorySettings) -> list[tuple[str, list[dict]]]:
    """(the override to set, changes of the settings to try in order) for each memory setting `st`
    lacks, cheapest first. Ulysses degrees must divide the world, the row and the heads (smallest
    first)."""
    out = []
    if st.loss_chunk == 0:
        out.append((f"train.loss_chunk={LOSS_CHUNK}", [{"loss_chunk": LOSS_CHUNK}]))
    section = "train.megatron" if train.backend == "megatron" else "train.deepspeed"
    if not st.checkpointing:
        out.append((f"{section}.activation_checkpointing=true", [{"checkpointing": True}]))
    if train.backend == "megatron":
        if not st.megatron_sp and train.megatron.tensor_parallel > 1:
            out.append(("train.megatron.sequence_parallel=true", [{"megatron_sp": True}]))
        return out
    world = train.launch.num_workers
    degrees = [d for d in range(st.sp + 1, world + 1)
               if not (world % d or train.seq_len % d or shape.n_heads % d or shape.n_kv_heads % d)]
    if degrees:
        out.append(("train.deepspeed.sequence_parallel={}", [{"sp": d} for d in degrees]))
    if st.offload_optimizer == "none" and train.deepspeed.zero_stage >= 1:
        out.append(("train.deepspeed.offload_optimizer=cpu", [{"offload_optimizer": "cpu"}]))
    if st.offload_param == "none" and train.deepspeed.zero_stage == 3:
        out.append(("train.deepspeed.offload_param=cpu", [{"offload_param": "cpu"}]))
    return out


def fit_lines(train, shape: ModelShape, precision: str) -> list[str]:
    """Which memory settings the run needs to fit GPU_BYTES: each it has whose removal alone would
    not fit ("needs"), or, when it does not fit, the cheapest settings that would make it fit,
    added cheapest first ("does not fit")."""
    from dataclasses import replace

    st = _settings(train)
    total = _memory(train, shape, precision, st).gpu_total
    budget = f"{GPU_BYTES / GB:.0f} GB"
    if total <= GPU_BYTES:
        section = "train.megatron" if train.backend == "megatron" else "train.deepspeed"
        have = [(f"train.loss_chunk={st.loss_chunk}", replace(st, loss_chunk=0), st.loss_chunk > 0),
                (f"{section}.activation_checkpointing=true", replace(st, checkpointing=False), st.checkpointing),
                (f"train.deepspeed.sequence_parallel={st.sp}", replace(st, sp=1), st.sp > 1),
                ("train.megatron.sequence_parallel=true", replace(st, megatron_sp=False), st.megatron_sp),
                (f"train.deepspeed.offload_optimizer={st.offload_optimizer}", replace(st, offload_optimizer="none"),
                 st.offload_optimizer != "none"),
                (f"train.deepspeed.offload_param={st.offload_param}", replace(st, offload_param="none"),
                 st.offload_param != "none")]
        out, spare = [], []
        for key, without, on in have:
            m = _memory(train, shape, precision, without) if on else None
            if m is not None and m.gpu_total > GPU_BYTES:
                out.append(f"needs {key} to fit {budget} (without it: {_gb(m.gpu_total)})")
            elif on:
                spare.append(key)
        if spare:
            out.append(f"fits {budget}, and would without any one of: {', '.join(spare)}")
        return out or [f"fits {budget} with no chunked loss, checkpointing, sequence parallelism or offload"]
    chosen = []
    for key, changes in _levers(train, shape, st):
        for change in changes:
            cand = replace(st, **change)
            m = _memory(train, shape, precision, cand)
            if m is not None and m.gpu_total <= GPU_BYTES:
                chosen.append(key.format(cand.sp))
                return [f"does not fit {budget} ({_gb(total)}): it would with {', '.join(chosen)} "
                        f"({_gb(m.gpu_total)})"]
        st = cand  # the largest of the lever's steps, then the next lever on top
        chosen.append(key.format(st.sp))
    tried = f" even with {', '.join(chosen)}" if chosen else ""
    return [f"does not fit {budget} ({_gb(total)}){tried}: use more GPUs (train.launch.num_workers), a shorter "
            "train.seq_len, or (Megatron) more tensor / pipeline parallelism"]


def train_plan(train) -> tuple[TrainPlan, list[str]]:
    from distill.train.config import resolve_precision

    par, problems = _train_parallel(train)
    precision = resolve_precision(train, has_gpu=train.launch.gpus_per_worker > 0)
    megatron = train.backend == "megatron"
    ds = train.deepspeed
    zero = None if megatron else ds.zero_stage
    shape, source, hf_config = _read_student(train.student.model)
    rows = par.dp * train.micro_batch * train.grad_accum if par else None
    steps = (f"{train.max_steps} (train.max_steps)" if train.max_steps else
             f"{train.epochs} epoch(s) over the packed SFT set: known once the sft stage has run")
    plan = TrainPlan(train.backend, par, precision, zero, rows, train.seq_len, steps, train.student.model, source,
                     shape, on_gpu=train.launch.gpus_per_worker > 0)
    if shape is None:
        problems.append(source)
    elif hf_config is not None:  # the launcher's own checks, family included
        from distill.train.launch import student_problems

        problems += student_problems(train, hf_config)
    else:  # known only from KNOWN_MODELS: the checks its shape answers (`distill run` adds the family's)
        from distill.train.shape import shape_problems

        problems += shape_problems(train, shape)
    if shape is not None and par is not None:
        plan.memory = _memory(train, shape, precision, _settings(train))
        if plan.on_gpu:
            plan.fit = fit_lines(train, shape, precision)
    return plan, problems


def resolve_plan(cfg, stages: list[str] | None = None) -> Plan:
    """Everything a dry run reports about a validated RunConfig (for `stages`, default
    run.stages); each problem names the key to change."""
    stages = list(cfg.run.stages if stages is None else stages)
    problems, notes = check_inputs(cfg, stages)
    plan = Plan(stages=stage_resources(cfg, stages), problems=problems, notes=notes)
    if "train" in stages:
        plan.train, train_problems = train_plan(cfg.train)
        plan.problems += train_problems
    return plan


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB"


def format_plan(plan: Plan) -> str:
    lines = ["stages (in order; actors x resources each):"]
    for s in plan.stages:
        res = f"{s.cpus:g} CPU" + (f" + {s.gpus:g} GPU" if s.gpus else "")
        lines.append(f"  {s.name:<9} {s.actors} x ({res})" + (f"  {s.what}" if s.what else "")
                     + (f"  [settings: {s.section}]" if s.section else ""))
    t = plan.train
    if t is not None:
        lines.append(f"train: backend {t.backend}, precision {t.precision}"
                     + (f", ZeRO-{t.zero_stage}" if t.zero_stage is not None else ""))
        if t.parallel:
            p = t.parallel
            lines.append(f"  world {p.world} = dp {p.dp} x tp {p.tp} x pp {p.pp} x cp {p.cp}"
                         + (f" x sp {p.sp}" if p.sp > 1 else ""))
            lines.append(f"  global batch {t.global_rows} rows x {t.seq_len} tokens = "
                         f"{t.global_rows * t.seq_len} tokens per step")
        lines.append(f"  steps: {t.steps}")
        if t.shape is not None:
            sh = t.shape
            lines.append(f"  student {t.model}: {sh.params() / 1e9:.3f}B params, {sh.n_layers} layers, hidden "
                         f"{sh.hidden}, {sh.n_heads} heads ({sh.n_kv_heads} kv), vocab {sh.vocab}, context "
                         f"{sh.max_positions}  [from {t.model_source}]")
        if t.memory is not None:
            m = t.memory
            where = "GPU" if t.on_gpu else "worker (CPU RAM: no GPU in train.launch)"
            lines.append(f"  memory per {where} (estimate): params {_gb(m.params)}, grads {_gb(m.grads)}, optimizer "
                         f"{_gb(m.optimizer)}, activations {_gb(m.activations)}, logits {_gb(m.logits)}; "
                         f"total {_gb(m.gpu_total)}")
            if m.cpu or m.nvme:
                lines.append(f"  offloaded per rank: CPU RAM {_gb(m.cpu)}, NVMe {_gb(m.nvme)}")
        lines += [f"  {line}" for line in t.fit]
    for n in plan.notes:
        lines.append(f"note: {n}")
    for p in plan.problems:
        lines.append(f"problem: {p}")
    return "\n".join(lines)
