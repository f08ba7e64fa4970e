"""The MFU metric counts attention FLOPs (causal: half of full attention), and its FLOP count is
what torch's own FLOP counter measures on a real forward + backward."""

from __future__ import annotations

import pytest
import torch

from distill.train.metrics import attention_flops, attention_shape, flop_params, mfu


def tiny_qwen2(tied: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                  tie_word_embeddings=tied)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")


@pytest.mark.parametrize("tied", [True, False])
def test_flops_by_hand_for_a_small_shape(tied):
    model = tiny_qwen2(tied)
    # Parameters by hand: embedding 100 x 8 = 800. Per layer: q 8x8 + 8 bias = 72, k and v
    # 8x4 + 4 = 36 each (1 kv head of dim 4), o 8x8 = 64, MLP 3 x 8x16 = 384, two norms 16:
    # 608; 2 layers 1216; final norm 8. Tied: 2024. Untied adds an 800 head, and the input
    # embedding (a lookup) leaves the count: 2024 again.
    assert flop_params(model) == 2024
    assert sum(p.numel() for p in model.parameters()) == (2024 if tied else 2824)
    assert attention_shape(model.config) == (2, 8)  # 2 layers, 2 heads x head dim 4
    # A row of two samples, 3 and 5 tokens: 8 tokens.
    dense = 6 * 2024 * 8  # 97,152
    attn = 6 * 2 * 8 * (3 ** 2 + 5 ** 2)  # 6 x layers x attn_dim x sum L^2 = 3,264
    assert attention_flops([3, 5], 2, 8) == attn
    assert mfu(2024, 8, 2.0, 1e4, 1, attention_flops=attn) == pytest.approx((dense + attn) / 2.0 / 1e4)
    assert mfu(2024, 8, 2.0, 1e4, 2, attention_flops=attn) == pytest.approx((dense + attn) / 2.0 / 2e4)
    assert mfu(2024, 8, 2.0, None, 1, attention_flops=attn) is None


def test_count_matches_torch_flop_counter_on_a_real_step():
    """torch's FlopCounterMode over one forward + backward of a sample of L tokens through the
    eager (full-matrix) attention counts 6 FLOPs per token per weight-matrix entry and FULL
    attention, 12 * layers * attn_dim * L^2: twice the causal count the metric uses. (The counter
    leaves out biases and norm weights, elementwise work that flop_params counts as 6 FLOPs too:
    72 of 2024 parameters here, a rounding error at real widths.)"""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_qwen2(tied=False)
    n = 24
    ids = torch.randint(0, 100, (1, n))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    layers, dim = attention_shape(model.config)
    # The untied input embedding is a lookup: no matmul, and flop_params leaves it out too.
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    assert flop_params(model) - matrices == 2 * (16 + 16) + 8  # q/k/v biases and norms of 2 layers, final norm
    assert counter.get_total_flops() == 6 * matrices * n + 2 * attention_flops([n], layers, dim)
