"""The packed attention's FlexAttention path (CUDA without flash-attn) computes what the other
paths compute: on CPU, flex's eager reference against the per-segment SDPA path and the dense
block-diagonal mask, in fp32, forward only (torch 2.13 has no FlexAttention backward on CPU:
"FlexAttention does not support backward on CPU"); on CUDA (gpu-marked), the compiled kernel in
bf16 through a whole model, loss and gradients, against the samples run one at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.testing.batches import packed_rows
from distill.train import attention
from distill.train.attention import (
    block_causal_mask,
    document_block_mask,
    flex_packed_attention,
    packed_attention_forward,
    segment_ids,
)

# flex_attention warns on every eager call that it materialises the scores: that is what the CPU
# reference does on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def packed_qkv(lengths: list[list[int]], heads=4, kv_heads=2, dim=16, seed=0, dtype=torch.float32):
    """Random q/k/v for rows holding samples of the given lengths (a row's rest is padding, a
    segment of its own as make_batch writes it), with cu_seqlens and restarting position ids."""
    t = max(sum(r) for r in lengths) + 5
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    q = torch.randn(b, heads, t, dim, generator=g, dtype=dtype)
    k = torch.randn(b, kv_heads, t, dim, generator=g, dtype=dtype)
    v = torch.randn(b, kv_heads, t, dim, generator=g, dtype=dtype)
    bounds, pos = [0], torch.zeros(b, t, dtype=torch.long)
    for r, row in enumerate(lengths):
        at = 0
        for n in row + [t - sum(row)]:
            pos[r, at:at + n] = torch.arange(n)
            at += n
            bounds.append(r * t + at)
    return q, k, v, torch.tensor(bounds, dtype=torch.int32), pos


def dense_reference(q, k, v, cu, scaling):
    """One SDPA call with the [B, 1, T, T] block-diagonal causal mask."""
    b, h, t, _ = q.shape
    groups = h // k.shape[1]
    mask = block_causal_mask(segment_ids(b, t, cu_seqlens=cu))
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


ROWS = [[7, 20, 3], [31, 1, 9]]


@pytest.mark.parametrize("scaling", [None, 0.3])
def test_flex_equals_per_segment_sdpa_and_dense_mask(scaling):
    q, k, v, cu, pos = packed_qkv(ROWS)
    flex = flex_packed_attention(q, k, v, cu_seqlens=cu, scaling=scaling)
    sdpa, _ = packed_attention_forward(None, q, k, v, None, scaling=scaling, cu_seq_lens_q=cu)
    dense = dense_reference(q, k, v, cu, scaling)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    # From position ids alone (no cu_seqlens): the same segments, the same output.
    attention._MASK_CACHE.clear()
    torch.testing.assert_close(flex_packed_attention(q, k, v, position_ids=pos, scaling=scaling), flex,
                               rtol=0, atol=0)


def test_block_mask_skips_cross_sample_tiles_and_is_built_once_per_batch():
    # Two rows of two 256-token samples: of each row's 4x4 tiles of 128, 2 per sample are full
    # (on the diagonal band) or partial; the 4 tiles pairing the samples are empty.
    segments = torch.tensor([[0] * 256 + [1] * 256, [2] * 256 + [3] * 256])
    mask = document_block_mask(segments, compiled=False)
    dense = mask.to_dense()[:, 0]
    assert dense.shape == (2, 4, 4)
    assert int(dense.sum()) == 2 * 6  # per row: 3 tiles per sample (a causal 2x2 triangle)
    assert not dense[:, 2:, :2].any()  # the second sample never reads the first's tiles

    q, k, v, cu, _ = packed_qkv(ROWS)
    attention._MASK_CACHE.clear()
    flex_packed_attention(q, k, v, cu_seqlens=cu)
    first = attention._MASK_CACHE[0][3]
    flex_packed_attention(q, k, v, cu_seqlens=cu)  # the next layer of the same forward
    assert attention._MASK_CACHE[0][3] is first
    flex_packed_attention(q, k, v, cu_seqlens=cu.clone())  # the next batch: a new tensor
    assert attention._MASK_CACHE[0][3] is not first


def loss_and_grads(model, batch):
    from distill.train.model import forward_loss

    model.zero_grad()
    loss, _ = forward_loss(model, batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}


def test_whole_model_flex_equals_cpu_path(monkeypatch):
    """A tiny Qwen2 (GQA, QKV bias) on packed rows: the flex path (forced on CPU, eager) gives the
    loss of the per-segment SDPA path, fp32, 1e-5 (forward: see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.train.model import forward_loss

    config = AutoConfig.for_model("qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation=attention.register_packed_attention())
    batch = packed_rows(2, 192, 512, seed=1, min_len=192 // 8, max_len=192 // 2 - 1)
    with torch.no_grad():
        ref, _ = forward_loss(model, batch)
        monkeypatch.setattr(attention, "_use_flex", lambda query: True)
        calls = []
        monkeypatch.setattr(attention, "document_block_mask",
                            lambda seg, **kw: calls.append(seg) or document_block_mask(seg, **kw))
        attention._MASK_CACHE.clear()
        loss, _ = forward_loss(model, batch)
    assert len(calls) == 1  # one BlockMask for both layers
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


def test_path_choice_on_cpu():
    q = torch.zeros(1, 1, 4, 8)
    assert attention.packed_path(q) == "sdpa"
    assert attention.packed_path(q.bfloat16()) == "sdpa"  # flex and flash are CUDA-only here


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_packed_equals_unpacked_bf16_on_gpu():
    """bf16 on CUDA through the path this machine has (flash-attn varlen, else compiled flex): a
    packed batch's loss and gradients equal the sum over its samples run alone with stock SDPA.
    Tolerance: loss rel 1e-2, each gradient's relative error norm 3e-2 (bf16 keeps 8 bits of
    mantissa, ~4e-3 per rounding; the two runs sum in different orders)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.train.loss import token_loss_sum

    config = AutoConfig.for_model("qwen2", vocab_size=4096, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                  max_position_embeddings=4096, tie_word_embeddings=True)
    batch = packed_rows(2, 1024, 4096, seed=2, min_len=1024 // 8, max_len=1024 // 2 - 1).to("cuda")
    torch.manual_seed(0)
    packed = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                              attn_implementation=attention.register_packed_attention()).cuda()
    alone = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    alone.load_state_dict(packed.state_dict())
    assert attention.packed_path(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) in ("flash", "flex")
    loss, grads = loss_and_grads(packed, batch)

    alone.zero_grad()
    cu = batch.cu_seqlens.tolist()
    ids, labels = batch.input_ids.flatten(), batch.labels.flatten()
    ref = 0.0
    for s, e in zip(cu[:-1], cu[1:]):
        logits = alone(input_ids=ids[s:e][None]).logits
        part, _ = token_loss_sum(logits, labels[s:e][None])
        part.backward()
        ref += float(part)
    assert float(loss) == pytest.approx(ref, rel=1e-2)
    for name, p in alone.named_parameters():
        err = (grads[name] - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-12)
        assert err < 3e-2, (name, float(err))
