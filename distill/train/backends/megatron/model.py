"""A Llama-family student as a megatron-core `GPTModel`, with the project's packed attention.

`build_gpt` makes this rank's shard (its tensor slice of its pipeline stage's layers) from a
`ModelSpec`; weights come from `convert.from_hf_shard`. Two things differ from a stock
GPTModel built on the local layer spec:

- core attention is `PackedCoreAttention`, which hands q/k/v in Megatron's packed `thd` layout
  to the project's attention (`distill.train.attention.packed_attention_forward`): flash-attn
  varlen over `cu_seqlens` on GPU, one causal SDPA per packed sample on CPU. Megatron's own
  DotProductAttention refuses packed sequences and its fused softmax needs CUDA.
- `_postprocess` returns the final hidden states instead of full-vocabulary logits: the backend
  projects only the target positions (as `distill.train.model.forward_loss` does), so prompts
  and padding never reach the [tokens, vocab] logits.
- context parallelism is the project's own (megatron-core's needs TransformerEngine attention
  on CUDA and cuts every sample into zig-zag chunks): contiguous row shards, `RowShards` params,
  K/V all-gathered in `context_parallel_attention`, RoPE fed each token's true position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron.core.packed_seq_params import PackedSeqParams

from distill.train.backends.megatron.convert import ModelSpec, padded_vocab, split_dim

if TYPE_CHECKING:
    import torch


def transformer_config(spec: ModelSpec, *, tp: int, pp: int, sequence_parallel: bool, precision: str,
                       recompute: bool = False):
    """The megatron-core TransformerConfig of this student (fusions that need apex/TE off)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = precision == "bf16"
    extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1} \
        if recompute else {}
    return TransformerConfig(
        num_layers=spec.layers, hidden_size=spec.hidden, ffn_hidden_size=spec.ffn,
        num_attention_heads=spec.heads, num_query_groups=spec.kv_heads, kv_channels=spec.head_dim,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=spec.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=spec.init_std, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16, pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # The fused kernels below come from apex / TransformerEngine, which this install lacks.
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        # Weights are overwritten from the HF checkpoint right after; CPU init avoids the CUDA RNG tracker.
        use_cpu_initialization=True, perform_initialization=False,
        # Loss = sum of token losses; Megatron divides gradients by the global target count.
        calculate_per_token_loss=True,
        # batch_isend_irecv needs no device sync on current PyTorch (and a CPU run has no CUDA to sync).
        batch_p2p_sync=False,
        **extra,
    )


def _core_attention_class():
    from megatron.core.transformer.module import MegatronModule

    from distill.train.attention import packed_attention_forward

    class PackedCoreAttention(MegatronModule):
        """Causal attention within each packed sample (megatron-core core-attention signature)."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)
            # Context parallelism reaches this module through RowShards (see build_gpt): the
            # model's own config and process groups stay at cp=1.
            if config.context_parallel_size != 1:
                raise NotImplementedError("PackedCoreAttention takes context parallelism from RowShards, not the "
                                          "TransformerConfig")
            self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                raise ValueError("PackedCoreAttention takes packed (thd) sequences with cu_seqlens")
            if attention_bias is not None:
                raise ValueError("PackedCoreAttention has no attention bias")
            if isinstance(packed_seq_params, RowShards):
                return context_parallel_attention(query, key, value, packed_seq_params, self.scale)
            # thd: [tokens, heads, dim] -> the transformers layout [1, heads, tokens, dim].
            q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
            out, _ = packed_attention_forward(
                self, q, k, v, None, scaling=self.scale, cu_seq_lens_q=packed_seq_params.cu_seqlens_q,
                max_length_q=packed_seq_params.max_seqlen_q)
            return out.reshape(query.shape[0], -1)  # [tokens, heads * dim]

    return PackedCoreAttention


def layer_spec():
    """megatron-core's local GPT layer spec (RMSNorm) with the project's core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = _core_attention_class()
    return spec


def build_gpt(spec: ModelSpec, config, *, pre_process: bool, post_process: bool, divisible_by: int = 128,
              context_parallel: int = 1):
    """This rank's GPTModel shard (parallel_state must be initialised). Its forward returns the
    final hidden states [tokens, 1, hidden] (the output projection is the caller's).

    With context_parallel > 1 (collective: every rank builds at the same time) the model is
    built with a one-rank `cp` group: megatron-core's packed (thd) RoPE assumes its own CP
    layout (every sample cut into 2 x cp zig-zag chunks) whenever its cp group is larger, and
    this backend shards rows contiguously instead (`RowShards`), so RoPE must see no CP; the
    real CP group travels in the forward's RowShards to `context_parallel_attention`."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    class HiddenGPTModel(GPTModel):
        def _preprocess(self, input_ids, position_ids, *args, **kwargs):
            out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
            rows = kwargs.get("packed_seq_params")
            if isinstance(rows, RowShards) and out[1] is not None:
                # One rotary row per local token at its position within its sample (a sample that
                # began on the previous shard continues from there). Its length equals the local
                # cu_seqlens' last entry, which makes megatron's thd RoPE map rows to tokens 1:1.
                freqs = self.rotary_pos_emb(rows.row_max_seqlen, packed_seq=True)
                out = (out[0], freqs[rows.positions], *out[2:])
            return out

        def _postprocess(self, hidden_states, *args, **kwargs):
            return hidden_states

    pg_collection = None
    if context_parallel > 1:
        import torch.distributed as dist
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        pg_collection.cp, _ = dist.new_subgroups(group_size=1)
    model = HiddenGPTModel(
        config=config, transformer_layer_spec=layer_spec(),
        vocab_size=padded_vocab(spec.vocab_size, config.tensor_model_parallel_size, divisible_by),
        max_sequence_length=spec.max_positions, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=spec.tied, position_embedding_type="rope", rotary_base=spec.rope_theta,
        pg_collection=pg_collection,
    )
    # Megatron marks split parameters only in its weight initialisers, which perform_initialization
    # =False skips; gradient norms and grad syncs read these marks to count replicas once.
    for name, param in model.named_parameters():
        dim = split_dim(name)
        if dim is not None and not getattr(param, "tensor_model_parallel", False):
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(param, attr):
                    delattr(param, attr)
            tensor_parallel.set_tensor_model_parallel_attributes(param, True, dim, 1)
    return model


def packed_seq_params(cu_seqlens: "torch.Tensor", max_seqlen: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    import torch

    cu = cu_seqlens.to(dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                           max_seqlen_kv=max_seqlen)


# --------------------------------------------------------------------------- context parallelism
# Each of the cp ranks of a group holds a contiguous 1/cp of every row (tokens [i*T/cp, (i+1)*T/cp)
# of each row for CP rank i; seqpar.shard_batch). Everything but attention is per token. In
# attention every rank all-gathers the group's keys and values (one all-gather per layer; its
# backward is a reduce-scatter that sums each shard's key/value gradients from every rank's
# queries) and attends its own queries against the whole rows with the rows' GLOBAL
# cu_seqlens: causal within each sample, nothing across samples.
#
# All-gather rather than ring attention: K/V of the whole row are held per rank during one
# layer's attention (2 x T x kv_heads x head_dim, and saved for backward), but every other
# activation and the logits are / cp, the exchange is one collective per layer instead of cp - 1
# overlapped steps, and the arithmetic is plain attention, so parity with the unsplit run is
# exact up to float reordering. For GQA students K/V are a small part of the activations
# (kv_heads << heads), which is where this wins; ring attention would bound K/V too at
# 100k-token rows. Contiguous shards leave the causal work unbalanced (the last rank's queries see
# the most keys); a zig-zag split (rank i holds chunks i and 2cp-1-i) would even it out on GPU.


@dataclass
class RowShards(PackedSeqParams):
    """PackedSeqParams of one CP rank's shard of the rows. cu_seqlens_q/kv cut the local tokens
    per row (for megatron's RoPE, which with one rotary row per token just maps rows to tokens);
    the attention reads `pieces` and the CP group."""

    positions: "torch.Tensor | None" = None
    """[local tokens] each token's position within its sample."""
    row_max_seqlen: int = 0
    """The longest sample of the whole rows (rotary table length)."""
    pieces: tuple = ()
    """(local query start, query count, key start, key end) per sample piece on this shard, key
    bounds in the whole rows' flattened tokens (see `shard_pieces`)."""
    rows: int = 1
    cp_size: int = 1


def shard_pieces(cu_seqlens: list[int], row_len: int, index: int, degree: int) -> list[tuple[int, int, int, int]]:
    """The parts of the packed samples that CP rank `index` of `degree` holds: per sample (in
    order) that overlaps the rank's tokens [b*T + index*T/degree, b*T + (index+1)*T/degree) of its
    row b, (local start of its queries, how many, first key, end of keys) where the keys are the
    sample's tokens up to the last local query, in flattened whole-row coordinates. The pieces
    tile the local tokens in order. Pure."""
    if row_len % degree:
        raise ValueError(f"rows of {row_len} tokens do not split into train.megatron.context_parallel={degree} "
                         "equal shards: make train.seq_len a multiple of it")
    n = row_len // degree
    out = []
    for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if e <= s:
            continue
        row = s // row_len
        if (e - 1) // row_len != row:
            raise ValueError(f"segment [{s}, {e}) crosses a row boundary ({row_len} tokens per row)")
        lo = row * row_len + index * n
        qs, qe = max(s, lo), min(e, lo + n)
        if qs < qe:
            out.append((row * n + qs - lo, qe - qs, s, qe))
    return out


def row_shards(cu_seqlens: "torch.Tensor", rows: int, row_len: int, max_seqlen: int, *, index: int, degree: int,
               group) -> RowShards:
    """The RowShards of CP rank `index` for packed rows [rows, row_len] with whole-row cu_seqlens.
    Positions come from the segments (as the cp=1 path's RoPE restarts at each cu_seqlens entry),
    not from position ids. One host read of cu_seqlens per micro-batch."""
    import torch

    pieces = tuple(shard_pieces(cu_seqlens.tolist(), row_len, index, degree))
    n = row_len // degree
    positions = torch.cat([torch.arange(k1 - m - k0, k1 - k0) for _, m, k0, k1 in pieces]).to(cu_seqlens.device)
    cu = torch.arange(0, rows * n + 1, n, dtype=torch.int32, device=cu_seqlens.device)
    return RowShards(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n,
                     cp_group=group, positions=positions, row_max_seqlen=max_seqlen, pieces=pieces, rows=rows,
                     cp_size=degree)


def context_parallel_attention(query, key, value, rows: RowShards, scale: float):
    """Causal attention of this rank's queries [t, heads, dim] against the group's keys/values
    (thd layout, t = rows * T / cp); returns [t, heads * dim]. One SDPA per sample piece, with the
    causal diagonal offset by the keys that precede the piece's first query (on other ranks).
    CPU-friendly and exact; on GPU flash-attn's varlen kernel with separate cu_seqlens_k (whose
    causal mask is aligned bottom-right, as here) would skip the per-piece Python loop (not done:
    no CUDA here to test it)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    t, heads, dim = query.shape
    kv_heads = key.shape[1]
    # K and V in one all-gather; its backward reduce-scatters the gradients to their owners.
    kv = tensor_parallel.gather_from_sequence_parallel_region(torch.cat([key, value], dim=-1),
                                                              tensor_parallel_output_grad=True, group=rows.cp_group)
    # [cp ranks, rows, T / cp, ...] -> the whole rows' flattened order [rows * T, ...].
    kv = kv.view(rows.cp_size, rows.rows, t // rows.rows, kv_heads, 2 * dim).transpose(0, 1)
    k_all, v_all = kv.reshape(-1, kv_heads, 2 * dim).transpose(0, 1).split(dim, dim=-1)
    q = query.transpose(0, 1)  # [heads, t, dim]
    groups = heads // kv_heads
    parts = []
    for start, m, k0, k1 in rows.pieces:
        k, v = k_all[:, k0:k1], v_all[:, k0:k1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        span = k1 - k0
        mask = None if span == m else torch.ones(m, span, dtype=torch.bool, device=q.device).tril(span - m)
        parts.append(F.scaled_dot_product_attention(q[:, start:start + m], k, v, attn_mask=mask, scale=scale,
                                                    is_causal=mask is None))
    return torch.cat(parts, dim=1).transpose(0, 1).reshape(t, heads * dim)


def output_weight(model) -> "torch.Tensor":
    """The (vocab-parallel) output projection of the last stage: the embedding when tied at pp=1."""
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight


def vocab_logits(model, hidden: "torch.Tensor", vocab_size: int) -> "torch.Tensor":
    """Full-vocabulary logits [n, vocab] of hidden states [n, hidden] (a full sequence, not a
    sequence-parallel slice): each tensor rank projects onto its vocabulary slice, then the
    slices are all-gathered and the padding columns dropped. For `logits()` only (n x vocab per
    rank); the loss uses `vocab_parallel_loss_sum`, which never gathers the vocabulary."""
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    local = F.linear(hidden, output_weight(model))
    return tensor_parallel.gather_from_tensor_model_parallel_region(local)[:, :vocab_size]


def vocab_parallel_loss_sum(model, hidden: "torch.Tensor", labels: "torch.Tensor", vocab_size: int,
                            chunk: int) -> "torch.Tensor":
    """Summed cross-entropy of the targets' hidden states [n, hidden] (full sequence) against
    labels [n], over the tensor ranks' vocabulary slices: per chunk of `chunk` targets, the row
    max and sum of exponentials are all-reduced over the tensor group and the target logit comes
    from the rank that owns it (`loss.chunked_token_loss_sum`), so no rank holds more than
    chunk x vocab / tp logits (n x vocab / tp when chunk = 0: the dense loss, kept for backward).

    `hidden` must already be in the tensor-parallel region (its backward sums the ranks'
    gradient shares: the all-reduce of copy_to_tensor_model_parallel_region, or the
    reduce-scatter of the sequence-parallel gather)."""
    from megatron.core import parallel_state

    from distill.train.loss import chunked_token_loss_sum

    weight = output_weight(model)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    return chunked_token_loss_sum(hidden, weight, labels, chunk, vocab_start=start, vocab_size=vocab_size,
                                  group=group)
