"""Resume a Megatron checkpoint under other parallel degrees (tensor, pipeline, data, sharded
optimizer on or off, vocabulary padding).

A user who trained at TP=4 PP=2 on one cluster and continues on a node with other GPUs would
otherwise have to export to HF and restart, losing the optimizer state (Adam moments restart
from zero: a loss spike and a different run). Here every rank rebuilds its own new shard from
the old files, through the same two conversions export and setup use:

    old shards (t, p) --convert.iter_to_hf--> full HF-named tensors --convert.from_hf_shard--> new shard

for the model weights and, the same way, for each per-parameter optimizer tensor (fp32 master
weights, Adam's exp_avg and exp_avg_sq), which have exactly the shapes of the parameters they
belong to. The old optimizer files of one (t, p) are first unioned over data ranks (with the
sharded optimizer each holds only the parameters it owns).

Cost: every rank reads every old file and holds the full model's tensors of one kind at a time
(fp32, 4 bytes per parameter) next to its shard; a one-off at resume, about what `setup`
already pays when it converts the HF model. Vocabulary padding rows are dropped on the way
through HF and come back as zeros, which is what they are in training (the loss never reads
padded logits, so they receive no gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from distill.train.backends.megatron import model_file, optim_file
from distill.train.backends.megatron.convert import ModelSpec, from_hf_shard, iter_to_hf

if TYPE_CHECKING:
    import torch

OPTIM_KINDS = ("master", "exp_avg", "exp_avg_sq")
"""Per-parameter optimizer tensors carried over (Adam's step count is one scalar for all)."""

LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "data_parallel", "distributed_optimizer", "vocab_divisible_by")
"""meta.json keys that may differ between the checkpoint and the resuming run."""


def reshard(shard: Callable[[int, int], Mapping[str, "torch.Tensor"]], spec: ModelSpec, *, old_tp: int, old_pp: int,
            tp: int, tp_rank: int, pp: int, pp_rank: int, divisible_by: int) -> dict[str, "torch.Tensor"]:
    """Shard (tp_rank, pp_rank) of the new layout from the old layout's shards (any tensors with
    the parameters' names and shapes: weights, master copies, Adam moments)."""
    full = dict(iter_to_hf(shard, spec, tp=old_tp, pp=old_pp))
    return from_hf_shard(full, spec, tp=tp, tp_rank=tp_rank, pp=pp, pp_rank=pp_rank, divisible_by=divisible_by)


def optimizer_tensors(states: list[dict]) -> tuple[dict[str, dict[str, "torch.Tensor"]], "torch.Tensor"]:
    """{kind: {param name: tensor}} from the optimizer files of one (tensor, pipeline) shard (one
    per old data rank), and Adam's step count.

    A ShardedAdamW state is {"master": {name: fp32}, "adam": torch AdamW state_dict}, where the
    AdamW state is indexed by position in `master`'s order."""
    out: dict[str, dict] = {k: {} for k in OPTIM_KINDS}
    step = None
    for st in states:
        master, adam = st["master"], st["adam"]
        index = adam["param_groups"][0]["params"]
        if len(index) != len(master):
            raise RuntimeError(f"optimizer state has {len(index)} Adam entries for {len(master)} parameters")
        for name, i in zip(master, index):
            if name in out["master"]:
                raise RuntimeError(f"parameter {name} is in two data ranks' optimizer files")
            moments = adam["state"].get(i)
            if moments is None:  # never stepped: the checkpoint was written before step 1
                raise RuntimeError(f"parameter {name} has no Adam state")
            out["master"][name] = master[name]
            out["exp_avg"][name] = moments["exp_avg"]
            out["exp_avg_sq"][name] = moments["exp_avg_sq"]
            step = moments["step"] if step is None else step
    if step is None:
        raise RuntimeError("no optimizer state in the checkpoint")
    return out, step


def load_resharded(src: Path, meta: dict, *, spec: ModelSpec, tp: int, tp_rank: int, pp: int, pp_rank: int,
                   divisible_by: int) -> tuple[dict[str, "torch.Tensor"], dict[str, dict[str, "torch.Tensor"]], "torch.Tensor", int]:
    """(new model shard, {kind: new optimizer shard}, Adam step, trainer step) for this rank."""
    import torch

    old_tp, old_pp, old_dp = meta["tensor_parallel"], meta["pipeline_parallel"], meta["data_parallel"]
    files = {(t, p): src / model_file(t, p) for t in range(old_tp) for p in range(old_pp)}
    optim = {(t, p): [src / optim_file(t, p, d) for d in range(old_dp)] for t in range(old_tp) for p in range(old_pp)}
    absent = [f.name for f in [*files.values(), *(f for fs in optim.values() for f in fs)] if not f.is_file()]
    if absent:
        raise RuntimeError(f"{src}: cannot reshard, shard files missing: {', '.join(absent)}")

    def load(path: Path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    layout = dict(old_tp=old_tp, old_pp=old_pp, tp=tp, tp_rank=tp_rank, pp=pp, pp_rank=pp_rank, divisible_by=divisible_by)
    weights_cache: dict = {}
    weights = reshard(lambda t, p: weights_cache.setdefault((t, p), load(files[(t, p)])), spec, **layout)
    del weights_cache

    per_shard: dict[tuple[int, int], dict] = {}
    steps = set()
    adam_step = None
    for key, paths in optim.items():
        states = [load(f) for f in paths]
        steps |= {int(s["step"]) for s in states}
        per_shard[key], adam_step = optimizer_tensors([s["optimizer"] for s in states])
    if len(steps) != 1:
        raise RuntimeError(f"{src}: optimizer files disagree on the step ({sorted(steps)})")
    new_optim = {kind: reshard(lambda t, p, kind=kind: per_shard[(t, p)][kind], spec, **layout) for kind in OPTIM_KINDS}
    return weights, new_optim, adam_step, steps.pop()
