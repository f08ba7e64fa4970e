"""HF <-> Megatron weight conversion (pure tensor code, no process group): a round trip through
tensor and pipeline shards reproduces every HF tensor bit for bit, and the shard layout is the
one Megatron's fused QKV / fc1 expects."""

from __future__ import annotations

import pytest

from distill.train.backends.megatron.convert import (ModelSpec, from_hf_shard, layer_range, padded_vocab,
                                                     parallel_problems, spec_from_hf_config, to_hf)


@pytest.fixture(scope="module")
def tok_dir():
    from distill.teachers.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def _hf_state(model) -> dict:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("mistral", True)])
@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2), (1, 2), (4, 1)])
def test_round_trip_is_exact(tok_dir, arch, tied, tp, pp):
    import torch

    from distill.train.model import tiny_student

    # 4 query heads over 4 kv heads at tp=4; vocab 49152 + 5 forces padding.
    kv = 4 if tp == 4 else 2
    model = tiny_student(tok_dir, arch=arch, seed=3, tie_word_embeddings=tied, num_key_value_heads=kv,
                         vocab_size=49157, num_hidden_layers=4)
    hf = _hf_state(model)
    spec = spec_from_hf_config(model.config)
    assert spec.qkv_bias == (arch == "qwen2") and spec.tied == tied
    shards = {(t, p): from_hf_shard(hf, spec, tp=tp, tp_rank=t, pp=pp, pp_rank=p) for t in range(tp) for p in range(pp)}
    back = to_hf(shards, spec, tp=tp, pp=pp)
    assert sorted(back) == sorted(hf)
    for name, t in hf.items():
        assert back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    # Shard shapes: the padded vocabulary splits evenly; each stage holds its layers only.
    vpad = padded_vocab(49157, tp)
    assert vpad % (128 * tp) == 0 and vpad >= 49157
    assert shards[(0, 0)]["embedding.word_embeddings.weight"].shape == (vpad // tp, 64)
    n_local = {k.split(".")[2] for k in shards[(0, pp - 1)] if k.startswith("decoder.layers.")}
    assert len(n_local) == 4 // pp
    assert ("output_layer.weight" in shards[(0, pp - 1)]) == (not tied or pp > 1)


def test_qkv_layout_is_grouped_per_kv_head(tok_dir):
    """Rank r's fused QKV rows are [q heads of group g, k_g, v_g] for its kv groups g."""
    import torch

    from distill.train.model import tiny_student

    model = tiny_student(tok_dir, arch="qwen2", seed=1)
    hf, spec = _hf_state(model), spec_from_hf_config(model.config)
    d = spec.head_dim  # 16; 4 heads, 2 kv heads: one group per rank at tp=2
    for r in range(2):
        shard = from_hf_shard(hf, spec, tp=2, tp_rank=r, pp=1, pp_rank=0)
        qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]
        att = "model.layers.0.self_attn."
        expect = torch.cat([hf[att + "q_proj.weight"][2 * r * d:(2 * r + 2) * d], hf[att + "k_proj.weight"][r * d:(r + 1) * d],
                            hf[att + "v_proj.weight"][r * d:(r + 1) * d]])
        assert torch.equal(qkv, expect)
        fc1 = shard["decoder.layers.0.mlp.linear_fc1.weight"]
        assert torch.equal(fc1[:64], hf["model.layers.0.mlp.gate_proj.weight"][r * 64:(r + 1) * 64])
        assert torch.equal(fc1[64:], hf["model.layers.0.mlp.up_proj.weight"][r * 64:(r + 1) * 64])


def test_parallel_problems_name_the_key():
    spec = ModelSpec(arch="llama", vocab_size=100, hidden=64, ffn=128, layers=3, heads=6, kv_heads=2, head_dim=16,
                     qkv_bias=False, tied=True, rope_theta=1e4, norm_eps=1e-6, max_positions=512, init_std=0.02)
    problems = parallel_problems(spec, tp=4, pp=2)
    assert any("train.megatron.tensor_parallel=4" in p and "attention heads" in p for p in problems)
    assert any("key/value heads" in p for p in problems)
    assert any("train.megatron.pipeline_parallel=2" in p and "3 layers" in p for p in problems)
    assert parallel_problems(spec, tp=2, pp=3) == []
    assert list(layer_range(6, 3, 1)) == [2, 3]


def test_unsupported_family_is_refused(tok_dir):
    from distill.train.backends.megatron.convert import UnsupportedModel
    from distill.train.model import tiny_student

    with pytest.raises(UnsupportedModel, match="model_type='qwen3'"):
        spec_from_hf_config(tiny_student(tok_dir, arch="qwen3").config)
