"""What megatron-core needs to run on a machine without CUDA (CPU + gloo): three redirects.

1. The local layer spec allocates several tensors on `torch.cuda.current_device()` (the global
   memory buffer for sequence-parallel all-gathers, the rotary embedding's inverse frequencies,
   tensor-parallel gather outputs, DDP gradient buffers). On a CPU-only build that call raises
   "Torch not compiled with CUDA enabled"; the shim makes it return the CPU device.
2. With tied embeddings and pipeline_parallel > 1, GPTModel moves the last stage's copy of
   the embedding with `weight.data.cuda()`; `Tensor.cuda` returns the tensor itself.
3. The pipeline schedules create their token counter with a literal `device="cuda"`. That
   module (only it) sees a `torch` whose `tensor` / `zeros` put a 'cuda' request on the CPU.

(megatron-core's optimizers are not shimmed: they check `param.type()` for `torch.cuda.*`
types in several places, so the backend brings its own, `optimizer.ShardedAdamW`.)

Nothing changes when CUDA is available, and on a CPU-only machine no other code can have relied
on the redirected calls (they could only raise). Attention is the project's own module
(`model.PackedCoreAttention`), so Megatron's CUDA-only fused softmax and TransformerEngine are
never reached.
"""

from __future__ import annotations

import importlib
import types

_MARK = "_distill_cpu_shim"
_CUDA_LITERAL_MODULES = ("megatron.core.pipeline_parallel.schedules",)


def _cpu_torch(torch) -> types.ModuleType:
    """A stand-in for the `torch` module whose tensor/zeros map device 'cuda' to the CPU."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)

    def on_cpu(fn):
        def call(*args, device=None, **kwargs):
            if device is not None and str(device).startswith("cuda"):
                device = "cpu"
            return fn(*args, device=device, **kwargs)
        return call

    proxy.tensor, proxy.zeros = on_cpu(torch.tensor), on_cpu(torch.zeros)
    setattr(proxy, _MARK, True)
    return proxy


def install_cpu_shim() -> bool:
    """Apply both redirects when there is no CUDA (idempotent); True when the shim is active."""
    import torch

    if torch.cuda.is_available():
        return False
    if not getattr(torch.cuda.current_device, _MARK, False):
        def current_device():
            return torch.device("cpu")

        setattr(current_device, _MARK, True)
        torch.cuda.current_device = current_device

        def stay(self, *args, **kwargs):
            return self

        torch.Tensor.cuda = stay
    proxy = _cpu_torch(torch)
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if not getattr(module.torch, _MARK, False):
            module.torch = proxy
    return True
