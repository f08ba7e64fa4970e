"""Hugging Face <-> Megatron-core weights for the Llama family (Llama, Mistral, Qwen2). Pure.

These students share one layout: RMSNorm, SwiGLU MLP, grouped-query attention with RoPE
(rotate-half convention, which is also Megatron's `rotary_interleaved=False`, so q/k rows need
no permutation), and differ only in QKV bias (Qwen2) and tied embeddings. `from_hf_shard`
cuts the HF state dict into the shard one (tensor rank, pipeline stage) holds; `to_hf` merges
every shard back. Both are plain tensor indexing, so a round trip is exact.

Megatron layout of one shard (names of `GPTModel` built on the local layer spec):

- `linear_qkv` fuses q, k, v grouped per kv head: for each kv group g the rows are its
  heads_per_group query heads, then k_g, then v_g. Tensor rank r holds groups
  [r * G/tp, (r+1) * G/tp) (G = kv heads, so kv heads must divide by tp).
- `linear_fc1` fuses gate and up: rank r holds [gate_r; up_r], each F/tp rows.
- column-parallel layers (qkv, fc1, embedding, output) split rows; row-parallel layers
  (linear_proj, fc2) split columns; norms are replicated.
- the vocabulary is padded with zero rows to a multiple of `divisible_by * tp` so that it
  splits evenly; padded logits never reach the loss (the backend slices them off).
- pipeline stage p holds layers [p * L/pp, (p+1) * L/pp), renumbered from 0; stage 0 holds the
  embedding, the last stage the final norm and the output layer. With tied embeddings and
  pp > 1 the last stage keeps its own copy of the embedding as `output_layer.weight` (Megatron
  keeps the two equal by summing their gradients); with pp == 1 there is no output weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from distill.train.shape import shape_from_hf_config, split_problems

if TYPE_CHECKING:
    import torch

ARCHITECTURES = {"llama": {"qkv_bias": False}, "mistral": {"qkv_bias": False}, "qwen2": {"qkv_bias": True}}
"""model_type -> what differs between the supported families."""


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of a Llama-family student, read from its HF config."""

    arch: str
    vocab_size: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    tied: bool
    rope_theta: float
    norm_eps: float
    max_positions: int
    init_std: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelSpec":
        return cls(**d)


class UnsupportedModel(ValueError):
    """An HF config this backend cannot build (named with the setting that makes it so)."""


def spec_from_hf_config(config) -> ModelSpec:
    """A ModelSpec from a transformers config (or any object with its attributes): the shape as
    `shape.shape_from_hf_config` reads it, plus what building the family needs."""
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(f"model_type={arch!r}: the megatron backend builds {', '.join(ARCHITECTURES)}; "
                               "use train.backend: deepspeed for other students")
    if config.hidden_act != "silu":
        raise UnsupportedModel(f"hidden_act={config.hidden_act!r}: only SwiGLU (silu) students are supported")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":  # transformers 5 keeps rope scaling in rope_parameters
        raise UnsupportedModel(f"rope_type={rope_type!r}: only plain RoPE is implemented (no scaling)")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    shape = shape_from_hf_config(config)
    return ModelSpec(
        arch=arch, vocab_size=shape.vocab, hidden=shape.hidden, ffn=shape.intermediate, layers=shape.n_layers,
        heads=shape.n_heads, kv_heads=shape.n_kv_heads, head_dim=shape.attn_dim // shape.n_heads,
        qkv_bias=ARCHITECTURES[arch]["qkv_bias"], tied=shape.tied_embeddings, rope_theta=float(theta),
        norm_eps=float(config.rms_norm_eps), max_positions=int(shape.max_positions),
        init_std=float(config.initializer_range))


def padded_vocab(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Vocabulary rounded up to a multiple of divisible_by * tp (Megatron's rule, so every tensor
    rank gets an equal, aligned slice)."""
    unit = divisible_by * tp
    return math.ceil(vocab_size / unit) * unit


def layer_range(layers: int, pp: int, pp_rank: int) -> range:
    """Global layer indices of pipeline stage pp_rank (even split; layers % pp == 0)."""
    if layers % pp:
        raise ValueError(f"{layers} layers do not split evenly over {pp} pipeline stages")
    n = layers // pp
    return range(pp_rank * n, (pp_rank + 1) * n)


def parallel_problems(spec: ModelSpec, *, tp: int, pp: int) -> list[str]:
    """`shape.split_problems` for this spec: what stops it from splitting tp x pp ways."""
    return split_problems(heads=spec.heads, kv_heads=spec.kv_heads, ffn=spec.ffn, layers=spec.layers, tp=tp, pp=pp)


_COLUMN = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias",
           "linear_fc1.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def split_dim(name: str) -> int | None:
    """The dimension a Megatron parameter is split along over tensor ranks (0: column parallel
    and vocabulary, 1: row parallel), None for replicated ones (norms). Pure."""
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def _rows(t, tp: int, r: int):
    n = t.shape[0] // tp
    return t[r * n:(r + 1) * n]


def _cols(t, tp: int, r: int):
    n = t.shape[1] // tp
    return t[:, r * n:(r + 1) * n]


def _pad_rows(t, rows: int):
    import torch

    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _qkv_groups(q, k, v, spec: ModelSpec):
    """[G, (heads_per_group + 2) * head_dim, ...] stacked per kv group (weights or biases)."""
    import torch

    g, d = spec.kv_heads, spec.head_dim
    per = spec.heads // g
    q = q.reshape(g, per * d, *q.shape[1:])
    k = k.reshape(g, d, *k.shape[1:])
    v = v.reshape(g, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1)


def from_hf_shard(hf: Mapping[str, "torch.Tensor"], spec: ModelSpec, *, tp: int, tp_rank: int, pp: int,
                  pp_rank: int, divisible_by: int = 128) -> dict[str, "torch.Tensor"]:
    """The Megatron state dict of shard (tp_rank, pp_rank) from a full HF state dict. The tensors
    are new (contiguous copies), so the HF model can be freed afterwards."""
    import torch

    problems = parallel_problems(spec, tp=tp, pp=pp)
    if problems:
        raise ValueError("; ".join(problems))
    out: dict[str, torch.Tensor] = {}
    vpad = padded_vocab(spec.vocab_size, tp, divisible_by)
    first, last = pp_rank == 0, pp_rank == pp - 1
    embed = hf["model.embed_tokens.weight"]
    if first:
        out["embedding.word_embeddings.weight"] = _rows(_pad_rows(embed, vpad), tp, tp_rank)
    for j, i in enumerate(layer_range(spec.layers, pp, pp_rank)):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{j}."
        att = src + "self_attn."
        qkv = _qkv_groups(hf[att + "q_proj.weight"], hf[att + "k_proj.weight"], hf[att + "v_proj.weight"], spec)
        out[dst + "self_attention.linear_qkv.weight"] = _rows(qkv, tp, tp_rank).flatten(0, 1)
        if spec.qkv_bias:
            bias = _qkv_groups(hf[att + "q_proj.bias"], hf[att + "k_proj.bias"], hf[att + "v_proj.bias"], spec)
            out[dst + "self_attention.linear_qkv.bias"] = _rows(bias, tp, tp_rank).flatten(0, 1)
        out[dst + "self_attention.linear_proj.weight"] = _cols(hf[att + "o_proj.weight"], tp, tp_rank)
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([_rows(gate, tp, tp_rank), _rows(up, tp, tp_rank)])
        out[dst + "mlp.linear_fc2.weight"] = _cols(hf[src + "mlp.down_proj.weight"], tp, tp_rank)
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not spec.tied:
            out["output_layer.weight"] = _rows(_pad_rows(hf["lm_head.weight"], vpad), tp, tp_rank)
        elif pp > 1:
            out["output_layer.weight"] = _rows(_pad_rows(embed, vpad), tp, tp_rank)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def to_hf(shards: Mapping[tuple[int, int], Mapping[str, "torch.Tensor"]], spec: ModelSpec, *, tp: int,
          pp: int) -> dict[str, "torch.Tensor"]:
    """Merge every shard {(tp_rank, pp_rank): state dict} into the full HF state dict. The
    inverse of `from_hf_shard` (vocabulary padding dropped; no lm_head when tied)."""
    return dict(iter_to_hf(lambda t, p: shards[(t, p)], spec, tp=tp, pp=pp))


def iter_to_hf(shard, spec: ModelSpec, *, tp: int, pp: int) -> Iterable[tuple[str, "torch.Tensor"]]:
    """(HF name, tensor) pairs, merged one tensor at a time from `shard(tp_rank, pp_rank)` (a
    callable returning that shard's state dict, e.g. memory-mapped files), in HF order."""
    import torch

    missing = [(t, p) for p in range(pp) for t in range(tp) if shard(t, p) is None]
    if missing:
        raise ValueError(f"shards missing for (tensor rank, pipeline stage) {missing}")

    def cat_rows(name: str, p: int):
        return torch.cat([shard(t, p)[name] for t in range(tp)])

    def cat_cols(name: str, p: int):
        return torch.cat([shard(t, p)[name] for t in range(tp)], dim=1)

    g, d = spec.kv_heads, spec.head_dim
    per = spec.heads // g
    yield "model.embed_tokens.weight", cat_rows("embedding.word_embeddings.weight", 0)[:spec.vocab_size]
    for p in range(pp):
        for j, i in enumerate(layer_range(spec.layers, pp, p)):
            src, dst = f"decoder.layers.{j}.", f"model.layers.{i}."
            att = dst + "self_attn."
            names = ["weight"] + (["bias"] if spec.qkv_bias else [])
            merged = {n: cat_rows(src + "self_attention.linear_qkv." + n, p) for n in names}
            for n, t in merged.items():
                grouped = t.reshape(g, (per + 2) * d, *t.shape[1:])
                q, k, v = grouped.split([per * d, d, d], dim=1)
                yield att + "q_proj." + n, q.reshape(spec.heads * d, *t.shape[1:]).contiguous()
                yield att + "k_proj." + n, k.reshape(g * d, *t.shape[1:]).contiguous()
                yield att + "v_proj." + n, v.reshape(g * d, *t.shape[1:]).contiguous()
            yield att + "o_proj.weight", cat_cols(src + "self_attention.linear_proj.weight", p)
            fc1 = [shard(t, p)[src + "mlp.linear_fc1.weight"].chunk(2) for t in range(tp)]
            yield dst + "mlp.gate_proj.weight", torch.cat([gu[0] for gu in fc1])
            yield dst + "mlp.up_proj.weight", torch.cat([gu[1] for gu in fc1])
            yield dst + "mlp.down_proj.weight", cat_cols(src + "mlp.linear_fc2.weight", p)
            yield dst + "input_layernorm.weight", shard(0, p)[src + "input_layernorm.weight"]
            yield dst + "post_attention_layernorm.weight", shard(0, p)[src + "pre_mlp_layernorm.weight"]
    yield "model.norm.weight", shard(0, pp - 1)["decoder.final_layernorm.weight"]
    if not spec.tied:
        yield "lm_head.weight", cat_rows("output_layer.weight", pp - 1)[:spec.vocab_size]
