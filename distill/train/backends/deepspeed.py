"""The DeepSpeed backend: ZeRO stages 0-3, CPU/NVMe offload (ZeRO-Infinity), bf16 or fp32.

The model stays an unmodified transformers model: it is wrapped in a small module whose
forward is the project's packed loss (`forward_loss`), and DeepSpeed wraps that. On a machine
without CUDA, DeepSpeed runs with its CPU accelerator and gloo.

Loss scaling: the loop gives each micro-batch the loss `loss_sum / global_target_tokens`, whose
sum over micro-batches and ranks is the global mean. DeepSpeed divides every micro-batch's
gradient by the accumulation steps and averages gradients over ranks; multiplying the loss by
world * grad_accum before `backward` undoes both, so the step's gradient is exactly that of
sum-loss / global target tokens (checked against a plain-PyTorch reference in the tests).

Sequence parallelism (`train.deepspeed.sequence_parallel`, Ulysses, `distill.train.seqpar`):
groups of `degree` consecutive ranks read the same rows (the loop shards data over dp_rank =
rank // degree) and each trains on its 1/degree of every row. DeepSpeed is not told: it still
treats all world ranks as data parallel, so ZeRO partitions over all of them (more memory saved
than partitioning over data ranks only) and averages gradients over all of them. A group's rank
gradients SUM to its rows' gradient, so the same world * grad_accum factor makes the step exact.

Checkpoints are DeepSpeed's own per-rank files (what its ZeRO loaders expect), written with
`torch.save`. They are read back only through `torch.load(weights_only=True)` with an explicit
allowlist of the three DeepSpeed classes its optimizer state holds (`_DS_SAFE_GLOBALS`); the
trainer's own state is JSON (see `distill.train.checkpoint`).
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from distill.train.backends import ExportError, StepStats, TorchCollectives, lr_factor

if TYPE_CHECKING:
    import torch

    from distill.train.config import TrainConfig
    from distill.train.packing import PackedBatch

CHECKPOINT_TAG = "ds"
"""Subdirectory of a checkpoint holding DeepSpeed's files."""


def deepspeed_config(cfg: "TrainConfig", *, world_size: int, precision: str) -> dict:
    """The DeepSpeed config dict for this TrainConfig. Pure (unit-tested without DeepSpeed)."""
    ds = cfg.deepspeed
    offloading = ds.offload_optimizer != "none"
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Keep every parameter partitioned: the default persistence threshold would keep all of
        # a tiny model's parameters whole on every rank, so tests would not exercise partitioning.
        zero["stage3_param_persistence_threshold"] = 0
    for key, device in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if device == "none":
            continue
        # Pinned host memory speeds GPU<->CPU copies; there is nothing to pin for on a CPU run.
        entry = {"device": device, "pin_memory": precision == "bf16"}
        if device == "nvme":
            entry["nvme_path"] = str(ds.nvme_path)
        zero[key] = entry
    opt = cfg.optimizer
    params = {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
    if not offloading:
        # torch.optim.AdamW: DeepSpeed's FusedAdam needs a CUDA build. With optimizer offload
        # DeepSpeed picks DeepSpeedCPUAdam itself (a C++ op built on first use).
        params["torch_adam"] = True
    out = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        # DeepSpeed counts every rank as data parallel, sequence-parallel ones too (its batch is
        # then degree x ours; only this consistency check reads it).
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": params},
        "steps_per_print": 2**62,  # the loop logs; DeepSpeed's own step log would be noise
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip is not None:
        out["gradient_clipping"] = cfg.grad_clip
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    return out


def _ds_safe_globals() -> list:
    """DeepSpeed classes its checkpoint files pickle, allowed for torch.load(weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_weights_only(path: str | os.PathLike, *, mmap: bool = False):
    """torch.load of a DeepSpeed checkpoint file without executing arbitrary pickled code."""
    import torch

    with torch.serialization.safe_globals(_ds_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _weights_only_engine():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, loading with weights_only=True instead of full unpickling."""

        def __init__(self):
            super().__init__(None)
            # The zip format is what lets export memory-map the files (torch.load(mmap=True)).
            self.zipfile_serialization = True

        def load(self, path: str, map_location=None):
            return load_weights_only(path)

    return WeightsOnlyCheckpointEngine()


def _loss_module(model, loss_chunk: int):
    import torch

    from distill.train.model import forward_loss
    from distill.train.packing import PackedBatch

    class PackedLoss(torch.nn.Module):
        """The student plus its packed loss as one module, so DeepSpeed's forward hooks (ZeRO-3
        parameter gathering) wrap the whole computation. Parameter names gain `student.`."""

        def __init__(self, student):
            super().__init__()
            self.student = student

        def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen: int, n_target_tokens: int):
            batch = PackedBatch(input_ids, labels, position_ids, cu_seqlens, max_seqlen, n_target_tokens)
            return forward_loss(self.student, batch, loss_chunk=loss_chunk)[0]

    return PackedLoss(model)


def _set_accelerator_env() -> None:
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; without this it probes for CUDA and warns,
        # and some ops then assume a GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class DeepSpeedBackend(TorchCollectives):
    """One rank's DeepSpeed engine. Construct on every rank; `setup` then wraps the model."""

    @staticmethod
    def prepare(cfg: "TrainConfig") -> None:
        """Once, in the driver: build the C++ ops offloading needs (DeepSpeedCPUAdam, async I/O
        for NVMe), so N ranks do not compile the same op at once on first use (minutes, and a
        rank killed mid-build leaves a lock that hangs the next run)."""
        _set_accelerator_env()
        ds = cfg.deepspeed
        needed = []
        if ds.offload_optimizer != "none":
            needed.append("CPUAdamBuilder")
        if "nvme" in (ds.offload_optimizer, ds.offload_param):
            needed.append("AsyncIOBuilder")
        if not needed:
            return
        from deepspeed.accelerator import get_accelerator

        for name in needed:
            builder = get_accelerator().create_op_builder(name)
            if builder is None or not builder.is_compatible():
                raise RuntimeError(f"DeepSpeed cannot build {name} here (train.deepspeed offload settings need it); "
                                   "for NVMe install libaio-dev and a C++ compiler")
            builder.load()

    def __init__(self, cfg: "TrainConfig", *, precision: str):
        import torch

        self.cfg, self.precision = cfg, precision
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
        _set_accelerator_env()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        from datetime import timedelta

        import deepspeed

        # A no-op when the launcher (Ray Train) already made the group with its own timeout.
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   timeout=timedelta(seconds=cfg.fault.collective_timeout_s))
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        from distill.train import seqpar

        sp = cfg.deepspeed.sequence_parallel
        self.seq = seqpar.new_groups(sp)  # collective: every rank builds every group
        # ZeRO is pure data parallelism; with sequence parallelism a group's ranks share rows.
        self.dp_rank, self.dp_size = self.rank // sp, self.world_size // sp
        self.engine = None

    def setup(self, model, *, total_steps: int) -> None:
        import deepspeed
        import torch

        from distill.train.attention import NAME as PACKED

        cfg = self.cfg
        if self.seq is not None and model.config._attn_implementation != PACKED:
            # Only the packed attention exchanges heads for sequence: any other would attend
            # within this rank's shard and silently train on a different model.
            raise ValueError(f"train.deepspeed.sequence_parallel={cfg.deepspeed.sequence_parallel} needs "
                             f"train.student.attention=packed (got {model.config._attn_implementation})")
        sched = partial(lr_factor, warmup=cfg.schedule.warmup_steps, total=total_steps,
                        min_ratio=cfg.schedule.min_lr_ratio)
        wrapped = _loss_module(model, cfg.loss_chunk)
        self.engine, _, _, _ = deepspeed.initialize(
            model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, world_size=self.world_size, precision=self.precision),
            # A partial keeps the schedule's arguments out of LambdaLR's state_dict, so a
            # resumed run follows the schedule of its own config.
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, sched),
        )
        self.engine.checkpoint_engine = _weights_only_engine()

    def _forward(self, batch: "PackedBatch"):
        from distill.train.seqpar import shard_batch

        b = shard_batch(batch, self.seq).to(self.device)
        return self.engine(b.input_ids, b.labels, b.position_ids, b.cu_seqlens, b.max_seqlen, b.n_target_tokens)

    def train_step(self, micro_batches: list["PackedBatch"], global_target_tokens: int) -> StepStats:
        import torch

        from distill.train.seqpar import sharded

        if len(micro_batches) != self.cfg.grad_accum:
            raise ValueError(f"{len(micro_batches)} micro-batches for grad_accum={self.cfg.grad_accum}")
        if global_target_tokens <= 0:
            raise ValueError("the global batch has no target tokens")
        self.engine.train()
        lr = self.engine.get_lr()[0]
        undo = self.world_size * self.cfg.grad_accum
        local = torch.zeros((), dtype=torch.float64)
        compute_s = comm_s = 0.0
        for batch in micro_batches:
            t0 = time.perf_counter()
            # Backward inside too: activation checkpointing recomputes attention there.
            with sharded(self.seq):
                # Under sequence parallelism: this rank's shard's loss sum, so the world-wide
                # sum below still counts each target once.
                loss = self._forward(batch) / global_target_tokens
                # .cpu() waits for the device, so the clock reads finished work (a sync per
                # micro-batch; the loss is needed on the host anyway).
                local += loss.detach().double().cpu()
                self.engine.backward(loss * undo)
            t1 = time.perf_counter()
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            compute_s, comm_s = compute_s + (t1 - t0), comm_s + (time.perf_counter() - t1)
        t0 = time.perf_counter()
        # One scalar all-reduce per step for the logged loss (the mean over the global batch).
        total = local.to(self.device)
        torch.distributed.all_reduce(total)
        norm = self.engine.get_global_grad_norm()
        loss = float(total)  # host copy: the all-reduce has finished when the clock stops
        comm_s += time.perf_counter() - t0
        # Backward's time includes the gradient reductions ZeRO-2/3 overlap with it; they cannot
        # be split from compute by wall clock without serialising them.
        return StepStats(loss=loss, grad_norm=float(norm) if norm is not None else float("nan"), lr=lr,
                         compute_s=compute_s, comm_s=comm_s)

    def save_checkpoint(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, save_latest=False)

    def load_checkpoint(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {path}/{CHECKPOINT_TAG}")

    def logits(self, input_ids: "torch.Tensor") -> "torch.Tensor":
        import torch

        self.engine.eval()
        with torch.no_grad():
            # Calling the inner student directly: under ZeRO-3 its submodules' hooks still
            # gather each layer's parameters (every rank must make the same call).
            out = self.engine.module.student(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float().cpu()

    def close(self) -> None:
        import torch

        if self.engine is not None:
            self.engine.destroy()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- checkpoint -> HF tensors
# ZeRO partitions read back without DeepSpeed (torch.load of its files), one parameter at a time.
#
# Weights come from the fp32 master copy in the optimizer partitions (ZeRO 1-3), consolidated one
# parameter at a time: each rank's partition file is memory-mapped (`torch.load(mmap=True,
# weights_only=True)`), a parameter's pieces are copied out of every rank's file, and a shard is
# written as soon as it reaches the size limit. Peak memory is one shard plus one parameter, never
# the whole model twice. ZeRO-0 has no partitions: its (replicated) module weights are used.
#
# - ZeRO-1/2: each rank's file maps every parameter that overlaps its partition to a fragment
#   (`param_slice_mappings`: name -> start, numel); a parameter is its fragments in rank order.
# - ZeRO-3: every parameter is split evenly: rank r holds elements [r*p, (r+1)*p) with
#   p = ceil(numel / world), in `param_shapes` order; the last rank's piece is zero-padded.

_PREFIX = "student."  # the training wrapper's attribute (PackedLoss)


def _rank_files(ds_dir: Path, kind: str) -> list[Path]:
    files = sorted(ds_dir.glob(f"*zero_pp_rank_*_mp_rank_00_{kind}.pt"),
                   key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))
    return files


def _span(groups: list, start: int, length: int):
    """Elements [start, start+length) of the concatenation of flat tensors, without building it."""
    import torch

    pieces, at = [], 0
    for g in groups:
        n = g.numel()
        lo, hi = max(start, at), min(start + length, at + n)
        if lo < hi:
            pieces.append(g.narrow(0, lo - at, hi - lo))
        at += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def iter_fp32_params(ds_dir: Path):
    """(name, fp32 tensor) for every trainable parameter, consolidated one at a time, in the
    model's parameter order; then frozen parameters and buffers from the module state."""
    import torch

    ds_dir = Path(ds_dir)
    optim_files = _rank_files(ds_dir, "optim_states")
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        model_file = next(iter(_rank_files(ds_dir, "model_states")), None)
    if model_file is None:
        raise ExportError(f"{ds_dir} holds no DeepSpeed model states file")
    model_state = load_weights_only(model_file, mmap=True)
    if not optim_files:  # ZeRO-0: the module state is the full model
        for name, t in model_state["module"].items():
            yield name, t.float()
        return
    world = len(optim_files)
    parts = [load_weights_only(f, mmap=True)["optimizer_state_dict"] for f in optim_files]
    stage = int(parts[0]["zero_stage"])
    shapes = model_state["param_shapes"]
    if stage == 3:
        flats = [p["fp32_flat_groups"] for p in parts]
        offset = 0
        for name, shape in ((n, s) for group in shapes for n, s in group.items()):
            numel = math.prod(shape)
            per_rank = math.ceil(numel / world)
            full = torch.cat([_span(flats[r], offset, per_rank) for r in range(world)])
            offset += per_rank
            yield name, full.narrow(0, 0, numel).view(*shape).clone()
    else:
        flats = [p["single_partition_of_fp32_groups"] for p in parts]
        maps = [p["param_slice_mappings"] for p in parts]
        for g, group in enumerate(shapes):
            for name, shape in group.items():
                pieces = []
                for r in range(world):
                    frag = maps[r][g].get(name)
                    if frag is not None:
                        pieces.append(flats[r][g].narrow(0, frag.start, frag.numel))
                full = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
                if full.numel() != math.prod(shape):
                    raise ExportError(f"{name}: fragments hold {full.numel()} elements, shape {tuple(shape)} needs "
                                      f"{math.prod(shape)}; the checkpoint in {ds_dir} is inconsistent")
                yield name, full.view(*shape)
    # Frozen parameters and persistent buffers are not in the optimizer: the module state has them.
    trainable = {n for group in shapes for n in group}
    for name, t in model_state["module"].items():
        if name not in trainable and t.numel() > 0:
            yield name, t.float()


def _hf_name(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _shared_params(ds_dir: Path) -> set[str]:
    """Names DeepSpeed recorded as aliases of another parameter (tied weights)."""
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        model_file = next(iter(_rank_files(ds_dir, "model_states")), None)
    state = load_weights_only(model_file, mmap=True)
    return set(state.get("shared_params", {}))


def hf_tensors(ckpt: Path):
    """(HF name, fp32 tensor) of a checkpoint's model, from `ckpt/ds/`, one at a time."""
    import json

    ds_dir = Path(ckpt) / CHECKPOINT_TAG
    shared = _shared_params(ds_dir)
    # lm_head shares the embedding; transformers ties it again on load
    tied = bool(json.loads((Path(ckpt) / "hf" / "config.json").read_text()).get("tie_word_embeddings", False))
    return ((_hf_name(name), t) for name, t in iter_fp32_params(ds_dir) if not (tied and name in shared))
