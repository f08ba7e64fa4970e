"""AdamW over one rank's Megatron shard, optionally sharded over data-parallel ranks (ZeRO-1).

megatron-core's own optimizers cannot run without CUDA: they accept parameters only when
`param.type()` is a `torch.cuda.*Tensor` and clipping asserts CUDA gradients. This one works on
both, with the same semantics the DeepSpeed backend has (AdamW on fp32 master weights, weight
decay on every parameter, global-norm clipping):

- gradients are read from `param.main_grad`, where megatron's DDP wrapper leaves them reduced
  over data-parallel ranks (and summed over the stages that share a tied embedding);
- the global norm counts each logical parameter once: replicated norms only on tensor rank 0,
  the last stage's copy of a tied embedding not at all; one all-reduce over the model-parallel
  group makes it the norm of the whole model;
- `distributed=True`: every parameter has one owning data-parallel rank (greedy by size), which
  alone keeps its fp32 master copy and Adam moments (optimizer memory / dp) and, after its
  update, broadcasts the new value to the other data ranks (one broadcast per parameter: fine
  for the tens of tensors per stage of these models, bucketed it would be one collective).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def assign_owners(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the least-loaded rank (ties: lowest
    rank, then parameter order). Deterministic, so every rank computes the same map. Pure."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


class ShardedAdamW:
    """AdamW on fp32 master weights for `named_params` (name -> model parameter with `main_grad`)."""

    def __init__(self, named_params: list[tuple[str, "torch.Tensor"]], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, clip: float | None, distributed: bool, dp_group, dp_ranks: list[int],
                 dp_rank: int, mp_group, counted: dict[str, bool]):
        import torch

        self.params = named_params
        self.clip, self.counted = clip, counted
        self.dp_group, self.mp_group = dp_group, mp_group
        ranks = len(dp_ranks) if distributed else 1
        owners = assign_owners([p.numel() for _, p in named_params], ranks)
        self.owner = {name: dp_ranks[o] for (name, _), o in zip(named_params, owners)} if ranks > 1 else {}
        mine = [(n, p) for (n, p), o in zip(named_params, owners) if ranks == 1 or o == dp_rank]
        self.master = {n: p.detach().float().clone() for n, p in mine}
        self.optimizer = torch.optim.AdamW(list(self.master.values()), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def grad_norm(self) -> float:
        import torch

        device = self.params[0][1].device
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for name, p in self.params:
            if self.counted[name]:
                sq += p.main_grad.double().pow(2).sum()
        if self.mp_group is not None:
            torch.distributed.all_reduce(sq, group=self.mp_group)
        return math.sqrt(float(sq))

    def step(self) -> float:
        """Clip, update, share the updated weights; returns the global norm before clipping."""
        import torch

        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise RuntimeError(f"gradient norm is {norm}: the step would corrupt the weights")
        scale = min(1.0, self.clip / (norm + 1e-6)) if self.clip else 1.0
        by_name = dict(self.params)
        for name, master in self.master.items():
            master.grad = by_name[name].main_grad.float() * scale
        self.optimizer.step()
        with torch.no_grad():
            for name, master in self.master.items():
                by_name[name].copy_(master)
                master.grad = None
            for name, p in self.params:
                if self.owner:
                    torch.distributed.broadcast(p.data, src=self.owner[name], group=self.dp_group)
        return norm

    def state_dict(self) -> dict:
        return {"adam": self.optimizer.state_dict(), "master": dict(self.master)}

    def load_state_dict(self, state: dict) -> None:
        import torch

        if sorted(state["master"]) != sorted(self.master):
            raise RuntimeError("optimizer shard holds other parameters than this rank owns (degrees changed?)")
        with torch.no_grad():
            for name, t in state["master"].items():
                self.master[name].copy_(t)
        self.optimizer.load_state_dict(state["adam"])
