"""Training backends: a backend turns packed micro-batches into optimizer steps and checkpoints.

The loop (`distill.train.loop`) sees only this protocol; a backend wraps an unmodified model
from outside and is the only place that imports its framework (DeepSpeed today; Megatron can be
added under a new name without touching the loop). Registered names map to "module:Class"
strings, so a CPU install never imports a backend it does not use.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from distill.train.config import TrainConfig
    from distill.train.packing import PackedBatch

BACKENDS: dict[str, str] = {
    "deepspeed": "distill.train.backends.deepspeed:DeepSpeedBackend",
    "megatron": "distill.train.backends.megatron:MegatronBackend",
}
"""Each backend's module also defines `CHECKPOINT_TAG` (the folder its shards take inside a
checkpoint) and `hf_tensors(ckpt)`: the checkpoint as (HF name, tensor) pairs, read without the
framework. Export dispatches on the folder and writes what the backend yields."""


class ExportError(ValueError):
    """A checkpoint that cannot be exported, phrased for the user."""


def _backend_module(name: str):
    return importlib.import_module(BACKENDS[name].partition(":")[0])


def checkpoint_backend(ckpt: Path) -> str | None:
    """The backend whose shards the checkpoint directory holds, or None."""
    return next((n for n in BACKENDS if (Path(ckpt) / _backend_module(n).CHECKPOINT_TAG).is_dir()), None)


def hf_tensors(ckpt: Path):
    """(HF name, tensor) pairs of a checkpoint, from the backend that wrote it."""
    name = checkpoint_backend(ckpt)
    if name is None:
        raise ExportError(f"{ckpt} holds no backend's shards ({', '.join(BACKENDS)})")
    return _backend_module(name).hf_tensors(Path(ckpt))


@dataclass
class StepStats:
    loss: float
    """Mean token loss of the whole global batch (identical on every rank)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate the step used."""
    compute_s: float = 0.0
    """Seconds this rank spent in forward + backward of its micro-batches."""
    comm_s: float = 0.0
    """Seconds this rank spent after backward: gradient reduction, optimizer step and the loss
    all-reduce (where a slow peer shows up as waiting)."""


class Backend(Protocol):
    rank: int
    world_size: int
    dp_rank: int
    """This rank's index among the data-parallel replicas (== rank without model parallelism)."""
    dp_size: int
    """Data-parallel replicas: world_size / (tensor * pipeline * context parallel degrees). The
    loop shards each global batch over dp_size, not world_size."""

    @staticmethod
    def prepare(cfg: "TrainConfig") -> None:
        """Once per run, in the driver before any worker starts (e.g. compile native ops)."""

    def setup(self, model, *, total_steps: int) -> None:
        """Wrap `model` and build optimizer and LR schedule for `total_steps` optimizer steps."""

    def train_step(self, micro_batches: list["PackedBatch"], global_target_tokens: int) -> StepStats:
        """Forward/backward every micro-batch of this rank and take one optimizer step."""

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (a stop decision all ranks agree on)."""

    def barrier(self) -> None: ...

    def save_checkpoint(self, path: Path) -> None:
        """Every rank writes its part of model, optimizer and scheduler state under `path`."""

    def load_checkpoint(self, path: Path) -> None: ...

    def logits(self, input_ids: "torch.Tensor") -> "torch.Tensor":
        """Full-vocabulary logits of the current weights (every rank must call it)."""

    def close(self) -> None: ...


class TorchCollectives:
    """`any_rank` and `barrier` over the default torch.distributed group, shared by the backends
    (each sets `self.device`: a CUDA device under NCCL, the CPU under gloo)."""

    device: "torch.device"

    def any_rank(self, flag: bool) -> bool:
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        import torch

        torch.distributed.barrier()


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise KeyError(f"unknown training backend {name!r}; registered: {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(cfg: "TrainConfig", *, precision: str) -> Backend:
    """The configured backend with its process group initialised (rank and world known)."""
    return backend_class(cfg.backend)(cfg, precision=precision)


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup reaching 1 at
    step `warmup - 1`, then cosine from 1 down to `min_ratio` at the last step `total - 1`. Pure."""
    if step < warmup:
        return (step + 1) / warmup
    span = total - warmup - 1
    if span <= 0:
        return 1.0
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
