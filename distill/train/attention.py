"""Attention for packed rows: samples side by side in one row never attend to each other.

Registered with transformers' AttentionInterface as "distill_packed", so an unmodified
transformers model runs it (model code stays free of packing). Two paths, chosen per call:

- CUDA with fp16/bf16 and flash-attn installed: `flash_attn_varlen_func` over the flattened
  row with `cu_seqlens`, which skips the masked blocks entirely (cost ~ sum of segment
  lengths squared, not seq_len squared).
- CUDA without flash-attn: torch's FlexAttention (compiled) with a document mask built from the
  segments: a BlockMask lists, per 128x128 tile, whether it is empty, full or partial, so the
  kernel skips the cross-sample tiles as varlen does (cost ~ sum of segment lengths squared
  rounded up to tiles), with no [T, T] mask in memory. The BlockMask is built once per batch
  and shared by every layer.
- otherwise (CPU, fp32 on GPU): one causal SDPA call per segment of the flattened rows,
  the same cost shape as varlen (`block_causal_mask` remains for tests and callers that want a
  single masked call).

Segments come from `cu_seq_lens_q` (what `forward_loss` passes through the model's kwargs) or,
when a caller gives only position ids, from where the positions restart. No mask function is
registered under this name, so transformers hands the attention its 2D mask untouched (None in
training) instead of materialising a mask of its own.
"""

from __future__ import annotations

import importlib.util

NAME = "distill_packed"


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _half_on_cuda(query) -> bool:
    import torch

    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def _use_flash(query) -> bool:
    return _half_on_cuda(query) and flash_attn_available()


def _use_flex(query) -> bool:
    return _half_on_cuda(query) and not flash_attn_available()


def packed_path(query) -> str:
    """Which kernel `packed_attention_forward` runs for this query: "flash", "flex" or "sdpa"."""
    return "flash" if _use_flash(query) else "flex" if _use_flex(query) else "sdpa"


def segment_ids(batch: int, length: int, *, cu_seqlens=None, position_ids=None, device=None):
    """[B, T] segment index of every token, from cu_seqlens over the flattened B*T tokens or,
    failing that, from position ids (a new segment wherever the position does not go up by 1)."""
    import torch

    if cu_seqlens is not None:
        flat = torch.arange(batch * length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        return torch.searchsorted(cu_seqlens, flat, right=True).view(batch, length)
    if position_ids is not None:
        pos = position_ids.expand(batch, -1)
        step = torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1)
        return (step != 1).cumsum(-1)
    return torch.zeros(batch, length, dtype=torch.long, device=device)


def block_causal_mask(segments):
    """[B, 1, T, T] bool, True where query i may attend key j: same segment and j <= i."""
    import torch

    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def _cu_from_segments(segments):
    import torch

    flat = (segments + torch.arange(segments.shape[0], device=segments.device)[:, None] * segments.shape[1]).flatten()
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1) != 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)


_FLEX: dict = {}
"""The compiled flex_attention per device type, built on first use (compilation costs tens of
seconds once per shape; eager flex materialises the [T, T] scores, which is what it avoids)."""

_MASK_CACHE: list = []
"""[(key tensor, its version, shape, BlockMask)] of the last batch: every layer of one forward
(and the recomputation under activation checkpointing) passes the same cu_seqlens / position-id
tensor, so the mask is built once per batch. Holding the tensor keeps its id from being reused
by a later batch's tensor."""


def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _FLEX:
        import torch

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def document_block_mask(segments, *, compiled: bool = True):
    """FlexAttention BlockMask of the packed rows' block-diagonal causal attention: query i sees
    key j when both are in the same segment and j <= i. `segments`: [B, T] segment ids."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = segments.shape

    def same_sample_causal(batch, head, q_idx, kv_idx):
        return (segments[batch, q_idx] == segments[batch, kv_idx]) & (q_idx >= kv_idx)

    # _compile builds the tile table without materialising the [B, T, T] boolean mask (268 MB
    # per row at 16k tokens); on CPU the eager build is cheaper than compiling it.
    return create_block_mask(same_sample_causal, b, None, t, t, device=segments.device,
                             _compile=compiled and segments.is_cuda)


def _cached_block_mask(b: int, t: int, cu, position_ids, device, compiled: bool):
    key = cu if cu is not None else position_ids
    if key is not None and _MASK_CACHE:
        held, version, shape, mask = _MASK_CACHE[0]
        if held is key and key._version == version and shape == (b, t):
            return mask
    mask = document_block_mask(segment_ids(b, t, cu_seqlens=cu, position_ids=position_ids, device=device),
                               compiled=compiled)
    _MASK_CACHE[:] = [(key, key._version if key is not None else None, (b, t), mask)] if key is not None else []
    return mask


def flex_packed_attention(query, key, value, *, cu_seqlens=None, position_ids=None, scaling=None,
                          compiled: bool | None = None):
    """Packed attention through FlexAttention: query [B, H, T, D], key/value [B, Hkv, T, D]
    (GQA handled by the kernel); returns [B, T, H, D]. Compiled on CUDA; elsewhere (unless told)
    flex's eager reference, which gives the same numbers with dense [T, T] scores (CPU tests)."""
    b, h, t, d = query.shape
    compiled = query.is_cuda if compiled is None else compiled
    cu = cu_seqlens.to(query.device) if cu_seqlens is not None else None
    mask = _cached_block_mask(b, t, cu, position_ids, query.device, compiled)
    out = _flex_attention(compiled)(query, key, value, block_mask=mask, scale=scaling,
                                    enable_gqa=key.shape[1] != h)
    return out.transpose(1, 2).contiguous()


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers attention signature: query [B, H, T, D], key/value [B, Hkv, T, D];
    returns ([B, T, H, D], None).

    Under sequence parallelism (`seqpar.sharded`, turned on by the backend) T is this rank's
    shard of the rows: q/k/v are exchanged for whole rows of H / degree heads, attended with
    the rows' global cu_seqlens, and the output exchanged back to this rank's tokens."""
    from distill.train import seqpar

    seq = seqpar.active()
    if seq is None:
        return _packed_attention(query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("cu_seq_lens_q") is None:
        # Position ids of a shard cannot tell where a sample that began on another rank starts.
        raise ValueError(f"{NAME} attention under sequence parallelism needs the rows' cu_seqlens "
                         "(cu_seq_lens_q), not only position ids")
    q, k, v = seqpar.gather_sequence(query, key, value, seq)
    out, _ = _packed_attention(q, k, v, attention_mask, dropout, scaling, **kwargs)
    return seqpar.scatter_sequence(out, seq), None


def _packed_attention(query, key, value, attention_mask, dropout: float, scaling: float | None, **kwargs):
    import torch
    import torch.nn.functional as F

    b, h, t, d = query.shape
    if key.shape[2] != t:
        raise NotImplementedError(
            f"{NAME} attention is for training forward passes (no KV cache); "
            "load the model with packed=False to generate"
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError(f"{NAME} attention takes packed rows, not padding masks; load with packed=False")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{NAME} attention has no logit soft-capping (Gemma-2); use another attention")
    window = kwargs.get("sliding_window")
    if window is not None and t > window:
        # A row longer than the window could hold a sample longer than it, which the plain
        # causal segments here would let see too far back.
        raise NotImplementedError(f"{NAME} attention ignores sliding windows: rows of {t} tokens > window {window}")
    cu = kwargs.get("cu_seq_lens_q")
    if _use_flash(query):
        from flash_attn import flash_attn_varlen_func

        if cu is None:
            cu = _cu_from_segments(segment_ids(b, t, position_ids=kwargs.get("position_ids"), device=query.device))
        max_len = kwargs.get("max_length_q") or int(torch.diff(cu).max())
        # flash-attn wants [total_tokens, heads, dim] and handles fewer kv heads (GQA) itself.
        q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
        out = flash_attn_varlen_func(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len,
                                     dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.view(b, t, h, d), None

    if _use_flex(query):
        if dropout:
            raise NotImplementedError(f"{NAME} attention through FlexAttention has no dropout; set it to 0")
        return flex_packed_attention(query, key, value, cu_seqlens=cu, position_ids=kwargs.get("position_ids"),
                                     scaling=scaling), None

    if cu is None:
        cu = _cu_from_segments(segment_ids(b, t, position_ids=kwargs.get("position_ids"), device=query.device))
    groups = h // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # One causal SDPA per segment of the flattened rows: cost ~ sum of segment lengths squared,
    # like flash varlen, and torch's fused causal kernel instead of the masked path (a dense
    # block-diagonal mask over a 4096-token row computes every cross-sample block only to
    # discard it: measured 1.5x slower end to end on CPU). `tolist()` is a device sync; this
    # path is for CPU and fp32 runs.
    q, k, v = (x.transpose(1, 2).reshape(b * t, h, d).transpose(0, 1) for x in (query, key, value))
    bounds = cu.tolist()
    parts = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], dropout_p=dropout, scale=scaling,
                                            is_causal=True)
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=1).transpose(0, 1).reshape(b, t, h, d), None


def register_packed_attention() -> str:
    """Register "distill_packed" with transformers (idempotent); returns the name to pass as
    `attn_implementation`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    return NAME
