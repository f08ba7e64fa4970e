"""The Megatron-core backend: tensor, pipeline, context and data parallelism for students that do
not fit (or run slowly) under ZeRO.

`train.backend: megatron`. Every rank joins one torch.distributed group (NCCL on GPU, gloo on
CPU; Ray Train or torchrun create it, or the backend does), and megatron-core's
`parallel_state` splits it into tensor, context, data and pipeline groups (tensor innermost,
then context: a context group's ranks are neighbours, on one node when they fit).
The loop gives every rank of one tensor/context/pipeline group the same rows (`dp_rank` /
`dp_size`); with context parallelism each rank of a context group then keeps its contiguous
1/cp of every row (model.py: all-gathered K/V in the packed core attention), its loss covers
that shard's targets, and the gradient reduction over data x context ranks sums the shards.

The student is the HF model the loop loaded, converted into this rank's `GPTModel` shard
(`convert.from_hf_shard`); the data path (PackedBatch) and the loss (`loss.chunked_token_loss_sum`
on target positions only, vocabulary-parallel, divided by the global batch's target count) are
the trainer's own.
Micro-batches run through megatron-core's schedule (`get_forward_backward_func`: plain
accumulation at pp=1, 1F1B at pp>1); gradients are reduced by megatron's DDP wrapper (summed
over data-parallel ranks) and scaled by 1 / global target tokens, then megatron's optimizer
(distributed over data-parallel ranks with train.megatron.distributed_optimizer) clips and steps.

Checkpoints (`CHECKPOINT_TAG/` inside the trainer's atomic step directory):

    megatron/meta.json                 degrees, ModelSpec, precision (what export needs)
    megatron/model-tp00-pp00.pt        each (tensor, pipeline) shard's weights, from data rank 0
    megatron/optim-tp00-pp00-dp000.pt  each rank's optimizer state (its distributed shard)

A run resumes from these under other degrees too (reshard.py rebuilds every rank's shard of the
weights, master copies and Adam moments); the student and precision must be the same. Context
parallelism does not enter the layout: the ranks of a context group hold the same weights and
optimizer state (sharded over data ranks only), and context rank 0 writes them, so a checkpoint
is what a cp=1 run with the same data degree writes and resumes under any context degree.

All are plain tensors / dicts written with torch.save and read with weights_only=True.
"""

from __future__ import annotations

import json
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

CHECKPOINT_TAG = "megatron"
"""Subdirectory of a checkpoint holding the Megatron shards."""
META_FILE = "meta.json"


def model_file(tp_rank: int, pp_rank: int) -> str:
    return f"model-tp{tp_rank:02d}-pp{pp_rank:02d}.pt"


def optim_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"optim-tp{tp_rank:02d}-pp{pp_rank:02d}-dp{dp_rank:03d}.pt"


def model_problems(cfg: "TrainConfig", model_config) -> list[str]:
    """Whether this backend builds the student's family (part of launch.student_problems; the
    shape checks against the degrees are `shape.shape_problems`)."""
    from distill.train.backends.megatron.convert import UnsupportedModel, spec_from_hf_config

    try:
        spec_from_hf_config(model_config)
    except UnsupportedModel as e:
        return [f"train.student.model={cfg.student.model!r}: {e}"]
    return []


class MegatronBackend(TorchCollectives):
    """One rank of a Megatron-core run. Construct on every rank; `setup` then shards the model."""

    @staticmethod
    def prepare(cfg: "TrainConfig") -> None:
        """Nothing to build ahead: the local layer spec has no native ops."""

    reshards_on_resume = True
    """Checkpoints load under other tensor / pipeline / data degrees (reshard.py), so the loop
    lets a resumed run keep the global batch with another split over data ranks."""

    def __init__(self, cfg: "TrainConfig", *, precision: str):
        import torch
        from megatron.core import parallel_state

        from distill.train.backends.megatron.shim import install_cpu_shim

        self.cfg, self.precision = cfg, precision
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            install_cpu_shim()
        if not torch.distributed.is_initialized():  # Ray Train has made the group already
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        m = cfg.megatron
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=m.tensor_parallel,
                                                 pipeline_model_parallel_size=m.pipeline_parallel,
                                                 context_parallel_size=m.context_parallel)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp = None  # this rank's context group as seqpar.SeqGroup (for shard_batch), None at cp=1
        if m.context_parallel > 1:
            from distill.train.seqpar import SeqGroup

            self.cp = SeqGroup(group=parallel_state.get_context_parallel_group(), index=self.cp_rank,
                               degree=m.context_parallel)
        self.model = self.optimizer = self.spec = None
        self._total_steps, self._step = 1, 0

    # ------------------------------------------------------------------ setup

    def setup(self, model, *, total_steps: int) -> None:
        """Convert the loaded HF model into this rank's GPTModel shard, wrap it in megatron's DDP
        and build the optimizer. Memory: every rank briefly holds the full HF model (loaded by
        the loop) plus its shard; the HF weights are then released (the model object keeps only
        its config), so steady state is the shard alone (~1/(tp*pp) of the weights)."""
        import torch
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        from distill.train.backends.megatron.optimizer import ShardedAdamW

        from distill.train.backends.megatron.convert import from_hf_shard, spec_from_hf_config
        from distill.train.backends.megatron.model import build_gpt, transformer_config

        cfg, m = self.cfg, self.cfg.megatron
        self.spec = spec_from_hf_config(model.config)
        config = transformer_config(self.spec, tp=m.tensor_parallel, pp=m.pipeline_parallel,
                                    sequence_parallel=m.sequence_parallel, precision=self.precision,
                                    recompute=m.activation_checkpointing)
        gpt = build_gpt(self.spec, config, pre_process=self.first_stage, post_process=self.last_stage,
                        divisible_by=m.vocab_divisible_by, context_parallel=m.context_parallel)
        shard = from_hf_shard(model.state_dict(), self.spec, tp=m.tensor_parallel, tp_rank=self.tp_rank,
                              pp=m.pipeline_parallel, pp_rank=self.pp_rank, divisible_by=m.vocab_divisible_by)
        gpt.load_state_dict(shard, strict=True)
        del shard
        if self.first_stage and model.get_input_embeddings().padding_idx is not None:
            freeze_padding_row(gpt, model.get_input_embeddings().padding_idx)
        with torch.no_grad():
            for p in model.parameters():  # release the HF weights; the loop keeps model.config
                p.data = torch.empty(0, dtype=p.dtype)
        gpt.to(self.device)
        # Gradients all-reduced (summed: calculate_per_token_loss) into fp32 main_grad buffers
        # over data x context ranks (megatron's dp_cp group: each context rank's gradient is its
        # shard's share of the rows' loss); the optimizer shards itself over data ranks only
        # (megatron-core's DistributedOptimizer needs CUDA tensors). The context ranks of a group
        # then repeat the same update on the same summed gradients: optimizer memory is not / cp
        # (megatron shards it over dp x cp), in exchange for a checkpoint that is independent of cp.
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)
        named = list(gpt.named_parameters())
        # Each logical parameter once in the gradient norm: replicated norms on tensor rank 0,
        # a tied embedding on the first stage only.
        counted = {n: param_is_not_tensor_parallel_duplicate(p) and not (spec_tied_copy(n, self.spec) and not self.first_stage)
                   for n, p in named}
        dp_group = parallel_state.get_data_parallel_group()
        opt = cfg.optimizer
        self.optimizer = ShardedAdamW(
            named, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, clip=cfg.grad_clip,
            distributed=m.distributed_optimizer, dp_group=dp_group,
            dp_ranks=torch.distributed.get_process_group_ranks(dp_group), dp_rank=self.dp_rank,
            mp_group=parallel_state.get_model_parallel_group() if self.world_size > self.dp_size else None,
            counted=counted)
        # The schedule skips gradient sync on all but the last micro-batch; gradients are then
        # reduced and scaled in train_step, timed apart from forward/backward.
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = None
        self.config = config
        self._total_steps = total_steps

    # ------------------------------------------------------------------ steps

    def _gpt(self):
        return self.model.module

    def _forward_step(self, data_iterator, model):
        from distill.train.backends.megatron.model import packed_seq_params, row_shards
        from distill.train.seqpar import shard_batch

        batch = next(data_iterator).to(self.device)
        if self.cp is None:
            params = packed_seq_params(batch.cu_seqlens, batch.max_seqlen)
        else:
            rows, row_len = batch.input_ids.shape
            params = row_shards(batch.cu_seqlens, rows, row_len, batch.max_seqlen, index=self.cp.index,
                                degree=self.cp.degree, group=self.cp.group)
            batch = shard_batch(batch, self.cp)  # this rank's tokens, labels and target count
        hidden = model(input_ids=batch.input_ids.reshape(1, -1), position_ids=batch.position_ids.reshape(1, -1),
                       attention_mask=None, packed_seq_params=params)
        return hidden, partial(self._loss, batch)

    def _full_hidden(self, hidden):
        """[tokens, hidden] of the whole flattened micro-batch (undoing the sequence-parallel split),
        entering the tensor-parallel region: the loss's vocabulary slices each give a share of
        the hidden gradient, summed over the tensor group in backward (by the gather's
        reduce-scatter under sequence parallelism, else by an all-reduce). Exactly one of the
        two: both would count the gradient tp times."""
        from megatron.core import tensor_parallel

        if self.config.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        else:
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
        return hidden[:, 0]

    def _loss(self, batch: "PackedBatch", hidden, non_loss_data: bool = False):
        import torch

        from distill.train.backends.megatron.model import vocab_logits, vocab_parallel_loss_sum
        from distill.train.loss import IGNORE_INDEX

        h = self._full_hidden(hidden)
        if non_loss_data:  # logits(): every position
            return vocab_logits(self._gpt(), h, self.spec.vocab_size)
        labels = batch.labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        # Vocabulary-parallel: train.loss_chunk targets at a time, or all at once (0).
        loss_sum = vocab_parallel_loss_sum(self._gpt(), h[keep], labels[keep], self.spec.vocab_size,
                                           self.cfg.loss_chunk)
        # 3 outputs + calculate_per_token_loss: the schedule neither averages over micro-batches
        # nor divides by this count; train_step divides by the global target count.
        return loss_sum, torch.tensor(batch.n_target_tokens, dtype=torch.int), {"loss_sum": loss_sum.detach()}

    def _run_schedule(self, batches: list["PackedBatch"], *, forward_only: bool, collect: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # seq_length: the whole rows' tokens; the pipeline's activation shapes divide it by cp.
        return get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.model],
            num_microbatches=len(batches), seq_length=batches[0].input_ids.numel(), micro_batch_size=1,
            forward_only=forward_only, collect_non_loss_data=collect)

    def accumulate(self, micro_batches: list["PackedBatch"], global_target_tokens: int) -> tuple[list, float, float]:
        """Forward/backward every micro-batch, reduce gradients and scale them to the gradient of
        sum-of-token-losses / global target tokens (left in each parameter's `main_grad`).
        Returns (per-micro-batch loss dicts of the last stage, compute seconds, reduce seconds)."""
        import torch  # noqa: F401
        from megatron.core.distributed import finalize_model_grads

        if len(micro_batches) != self.cfg.grad_accum:
            raise ValueError(f"{len(micro_batches)} micro-batches for grad_accum={self.cfg.grad_accum}")
        if global_target_tokens <= 0:
            raise ValueError("the global batch has no target tokens")
        self.model.train()
        self.model.zero_grad_buffer()
        t0 = time.perf_counter()
        reduced = self._run_schedule(micro_batches, forward_only=False)
        t1 = time.perf_counter()
        # Gradient sum over data-parallel ranks (and tied-embedding stages), then / global targets.
        finalize_model_grads([self.model])
        self.model.scale_gradients(1.0 / global_target_tokens)
        return reduced, t1 - t0, time.perf_counter() - t1

    def train_step(self, micro_batches: list["PackedBatch"], global_target_tokens: int) -> StepStats:
        import torch

        lr = self.cfg.optimizer.lr * lr_factor(self._step, warmup=self.cfg.schedule.warmup_steps,
                                               total=self._total_steps, min_ratio=self.cfg.schedule.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        reduced, compute_s, reduce_s = self.accumulate(micro_batches, global_target_tokens)
        t0 = time.perf_counter()
        grad_norm = self.optimizer.step()
        self._step += 1
        # One scalar all-reduce for the logged loss: summed by the last stage's tensor rank 0 of
        # every data replica and context shard (other ranks add 0).
        local = sum(float(r["loss_sum"]) for r in reduced) if self.last_stage and self.tp_rank == 0 else 0.0
        total = torch.tensor([local], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return StepStats(loss=float(total) / global_target_tokens,
                         grad_norm=grad_norm, lr=lr,
                         compute_s=compute_s, comm_s=reduce_s + time.perf_counter() - t0)

    def shard_grads(self) -> dict[str, "torch.Tensor"]:
        """This rank's reduced gradients by state-dict name (after `accumulate`; with the
        distributed optimizer only this data rank's slice of each buffer is reduced)."""
        names = {id(p): n for n, p in self._gpt().named_parameters()}
        return {names[id(p)]: p.main_grad.detach().clone() for p in self._gpt().parameters()}

    # ------------------------------------------------------------------ helpers

    def logits(self, input_ids: "torch.Tensor") -> "torch.Tensor":
        """Full-vocabulary logits [B, T, V] of unpacked rows (each row one sample), on every rank."""
        import torch

        from distill.train.packing import PackedBatch

        b, t = input_ids.shape
        ids = input_ids.long()
        batch = PackedBatch(ids, torch.full_like(ids, -100), torch.arange(t).repeat(b, 1),
                            torch.arange(0, b * t + 1, t, dtype=torch.int32), t, 0)
        return self.packed_logits(batch)

    def packed_logits(self, batch: "PackedBatch") -> "torch.Tensor":
        """Full-vocabulary logits [B, T, V] of a packed batch, on every rank."""
        import torch
        from megatron.core import parallel_state

        b, t = batch.input_ids.shape
        self.model.eval()
        with torch.no_grad():
            out = self._run_schedule([batch], forward_only=True, collect=True)
        self.model.train()
        logits = None
        if self.last_stage and self.cp is not None:  # each context rank has its 1/cp of every row
            shards = [torch.empty_like(out[0]) for _ in range(self.cp.degree)]
            torch.distributed.all_gather(shards, out[0].contiguous(), group=self.cp.group)
            logits = torch.stack(shards).float().view(self.cp.degree, b, t // self.cp.degree, -1).transpose(0, 1)
        elif self.last_stage:
            logits = out[0].float()
        logits = logits.reshape(b, t, -1) if logits is not None else \
            torch.empty(b, t, self.spec.vocab_size, device=self.device)
        if self.cfg.megatron.pipeline_parallel > 1:
            torch.distributed.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return logits.cpu()

    # ------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict:
        m = self.cfg.megatron
        return {"tensor_parallel": m.tensor_parallel, "pipeline_parallel": m.pipeline_parallel,
                "data_parallel": self.dp_size, "distributed_optimizer": m.distributed_optimizer,
                "vocab_divisible_by": m.vocab_divisible_by, "precision": self.precision, "spec": self.spec.to_dict()}

    def save_checkpoint(self, path: Path) -> None:
        import torch

        out = Path(path) / CHECKPOINT_TAG
        out.mkdir(parents=True, exist_ok=True)
        if self.cp_rank != 0:  # a copy of context rank 0's weights and optimizer shard
            return
        if self.dp_rank == 0:
            state = {k: v for k, v in self._gpt().state_dict().items() if v is not None and not k.endswith("_extra_state")}
            torch.save(state, out / model_file(self.tp_rank, self.pp_rank))
        opt = {"optimizer": self.optimizer.state_dict(), "step": self._step}
        torch.save(opt, out / optim_file(self.tp_rank, self.pp_rank, self.dp_rank))
        if self.rank == 0:
            (out / META_FILE).write_text(json.dumps(self._meta(), indent=1, sort_keys=True))

    def load_checkpoint(self, path: Path) -> None:
        import torch

        from distill.train.backends.megatron.reshard import LAYOUT_KEYS

        src = Path(path) / CHECKPOINT_TAG
        meta = json.loads((src / META_FILE).read_text())
        mine = self._meta()
        changed = [k for k in ("precision", "spec") if meta.get(k) != mine[k]]
        if changed:
            raise RuntimeError(f"cannot resume from {path}: " + ", ".join(
                f"{k} was {meta.get(k)!r}, now {mine[k]!r}" for k in changed)
                + " (the student and train.precision must match the checkpoint)")
        relayout = [k for k in LAYOUT_KEYS if meta.get(k) != mine[k]]
        if relayout:
            if self.rank == 0:
                print(f"resharding {path} for the new layout: " + ", ".join(
                    f"{k} {meta.get(k)} -> {mine[k]}" for k in relayout), flush=True)
            return self._load_resharded(src, meta)
        weights = torch.load(src / model_file(self.tp_rank, self.pp_rank), map_location="cpu", weights_only=True)
        self._load_weights(weights, src)
        opt = torch.load(src / optim_file(self.tp_rank, self.pp_rank, self.dp_rank), map_location="cpu",
                         weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self._step = int(opt["step"])

    def _load_weights(self, weights: dict, src: Path) -> None:
        missing, unexpected = self._gpt().load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"{src}: shard does not match the model (missing {missing}, unexpected {unexpected})")

    def _load_resharded(self, src: Path, meta: dict) -> None:
        """Resume under other degrees than the checkpoint's (reshard.py): this rank's weights,
        fp32 master copies and Adam moments rebuilt from every old shard."""
        from distill.train.backends.megatron.reshard import load_resharded

        m = self.cfg.megatron
        weights, tensors, adam_step, step = load_resharded(
            src, meta, spec=self.spec, tp=m.tensor_parallel, tp_rank=self.tp_rank, pp=m.pipeline_parallel,
            pp_rank=self.pp_rank, divisible_by=m.vocab_divisible_by)
        self._load_weights(weights, src)
        own = list(self.optimizer.master)  # the parameters this data rank's optimizer owns
        template = self.optimizer.optimizer.state_dict()
        index = template["param_groups"][0]["params"]
        self.optimizer.load_state_dict({
            "master": {n: tensors["master"][n] for n in own},
            "adam": {"param_groups": template["param_groups"],
                     "state": {i: {"step": adam_step.clone(), "exp_avg": tensors["exp_avg"][n],
                                   "exp_avg_sq": tensors["exp_avg_sq"][n]} for n, i in zip(own, index)}},
        })
        self._step = step

    def close(self) -> None:
        import torch
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def freeze_padding_row(gpt, pad_id: int) -> None:
    """HF's `nn.Embedding(padding_idx=...)` semantics: the lookup of the pad token contributes no
    gradient to its row (SmolLM2's pad token is <|im_end|>, so this matters for parity with the
    DeepSpeed path). Done by zeroing the embedding output's gradient where the input is the pad
    token; the output projection's gradient (tied models) still reaches the row, as in HF."""
    def hook(module, inputs, output):
        mask = (inputs[0] == pad_id).unsqueeze(-1)
        if output.requires_grad and bool(mask.any()):
            output.register_hook(lambda grad: grad.masked_fill(mask, 0.0))

    gpt.embedding.word_embeddings.register_forward_hook(hook)


def spec_tied_copy(name: str, spec) -> bool:
    """The last stage's copy of a tied embedding (pp > 1), a duplicate of the first stage's."""
    return spec.tied and name == "output_layer.weight"


# --------------------------------------------------------------------------- checkpoint -> HF tensors
# One weights file per (tensor rank, pipeline stage), written by data rank 0, and meta.json with
# the degrees and the model's shapes. Each file is memory-mapped and `convert.iter_to_hf` merges
# one HF tensor at a time from the shards, so peak memory is about one merged tensor plus the
# writer's shard, not the model. The weights are the model's own (bf16 for a bf16 run: the fp32
# master copy lives in the optimizer shards, which export does not read).


def iter_hf_tensors(megatron_dir: Path):
    """(HF name, tensor) pairs of the checkpoint's model, merged from every shard."""
    import torch

    megatron_dir = Path(megatron_dir)
    meta_path = megatron_dir / META_FILE
    if not meta_path.is_file():
        raise ExportError(f"{megatron_dir} has no {META_FILE}: not a complete Megatron checkpoint")
    meta = json.loads(meta_path.read_text())
    from distill.train.backends.megatron.convert import ModelSpec, iter_to_hf

    spec, tp, pp = ModelSpec.from_dict(meta["spec"]), meta["tensor_parallel"], meta["pipeline_parallel"]
    missing = [model_file(t, p) for p in range(pp) for t in range(tp) if not (megatron_dir / model_file(t, p)).is_file()]
    if missing:
        raise ExportError(f"{megatron_dir} lacks shard files {', '.join(missing)} (tensor_parallel={tp}, "
                          f"pipeline_parallel={pp}); the checkpoint is incomplete")
    cache: dict[tuple[int, int], dict] = {}

    def shard(t: int, p: int) -> dict:
        if (t, p) not in cache:
            cache[(t, p)] = torch.load(megatron_dir / model_file(t, p), map_location="cpu", weights_only=True,
                                       mmap=True)
        return cache[(t, p)]

    yield from iter_to_hf(shard, spec, tp=tp, pp=pp)


def hf_tensors(ckpt: Path):
    """(HF name, tensor) of a checkpoint's model, from `ckpt/megatron/`."""
    return iter_hf_tensors(Path(ckpt) / CHECKPOINT_TAG)
