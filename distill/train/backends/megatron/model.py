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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

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
            if config.context_parallel_size != 1:
                raise NotImplementedError("PackedCoreAttention has no context parallelism")
            self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                raise ValueError("PackedCoreAttention takes packed (thd) sequences with cu_seqlens")
            if attention_bias is not None:
                raise ValueError("PackedCoreAttention has no attention bias")
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


def build_gpt(spec: ModelSpec, config, *, pre_process: bool, post_process: bool, divisible_by: int = 128):
    """This rank's GPTModel shard (parallel_state must be initialised). Its forward returns the
    final hidden states [tokens, 1, hidden] (the output projection is the caller's)."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    class HiddenGPTModel(GPTModel):
        def _postprocess(self, hidden_states, *args, **kwargs):
            return hidden_states

    model = HiddenGPTModel(
        config=config, transformer_layer_spec=layer_spec(),
        vocab_size=padded_vocab(spec.vocab_size, config.tensor_model_parallel_size, divisible_by),
        max_sequence_length=spec.max_positions, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=spec.tied, position_embedding_type="rope", rotary_base=spec.rope_theta,
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
