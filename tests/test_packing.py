"""Packing: best-fit-decreasing bins, packed batches, the step plan, and the packed attention —
a packed batch computes exactly what its samples compute alone (tiny random Llama/Qwen2 models
with the real SmolLM2 tokenizer, fp32 on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.train.attention import block_causal_mask, segment_ids
from distill.train.data import IGNORE_INDEX, build_token_cache
from distill.train.loss import token_loss_sum
from distill.train.model import forward_loss, tiny_student
from distill.train.packing import (
    best_fit_decreasing,
    make_batch,
    packing_efficiency,
    plan_steps,
)
from test_train_data import gsm8k_chats, smollm_dir, write_jsonl  # noqa: F401  (fixture)

SEQ_LEN = 512


@pytest.fixture(scope="module")
def cache(tmp_path_factory, smollm_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("packing")
    data = write_jsonl(tmp / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(48, system=True)])
    return build_token_cache([data], smollm_dir, max_len=SEQ_LEN, out_dir=tmp / "cache")


def long_cot_lengths(n: int, seed: int) -> np.ndarray:
    """Long-CoT-like sample lengths: log-normal around 1200 tokens, from 200 to 4000."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(1200), 0.7, n), 200, 4000).astype(np.int64)


# ----------------------------------------------------------------- bins


@pytest.mark.parametrize("seq_len", [4096, 8192])
def test_best_fit_decreasing_packs_long_cot_lengths_densely(seq_len):
    lengths = long_cot_lengths(2000, seed=seq_len)
    bins = best_fit_decreasing(lengths, seq_len)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each sample exactly once
    assert max(lengths[b].sum() for b in bins) <= seq_len
    efficiency = packing_efficiency(lengths, bins, seq_len)
    assert efficiency >= 0.98, efficiency
    # Lower bound on rows: no packing can beat ceil(total / seq_len); BFD is within 2% of it here.
    assert len(bins) <= np.ceil(lengths.sum() / seq_len) * 1.02 + 1
    assert best_fit_decreasing(lengths, seq_len) == bins  # deterministic


def test_best_fit_chooses_the_tightest_bin():
    # 6 and 5 open two bins (free 4 and 5); 4 must go where it fills a bin exactly (free 4),
    # 5 then into the other; first-fit would put 4 beside 5 and need a third bin for the last 5.
    bins = best_fit_decreasing([6, 5, 4, 5], 10)
    assert sorted(map(sorted, bins)) == [[0, 2], [1, 3]]


def test_best_fit_refuses_samples_longer_than_a_row():
    with pytest.raises(ValueError, match="max_len <= seq_len"):
        best_fit_decreasing([10, 600, 20], 512)


# ----------------------------------------------------------------- batches


def test_make_batch_layout(cache):
    bins = best_fit_decreasing(cache.lengths, SEQ_LEN)[:3]
    batch = make_batch(cache, bins, SEQ_LEN)
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (3, SEQ_LEN)
    assert batch.n_target_tokens == int((batch.labels != IGNORE_INDEX).sum()) == int(cache.n_targets[sum(bins, [])].sum())
    cu = batch.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == 3 * SEQ_LEN and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == max(np.diff(cu))
    # Expected segments, row by row: the bin's samples in order, then one padding segment.
    expected = []
    for r, b in enumerate(bins):
        at = r * SEQ_LEN
        for i in b:
            expected.append((at, at + int(cache.lengths[i]), i))
            at += int(cache.lengths[i])
        if at < (r + 1) * SEQ_LEN:
            expected.append((at, (r + 1) * SEQ_LEN, None))
    assert cu == [0] + [e[1] for e in expected]
    flat_ids, flat_labels, flat_pos = (x.flatten() for x in (batch.input_ids, batch.labels, batch.position_ids))
    for a, b, i in expected:
        assert flat_pos[a:b].tolist() == list(range(b - a))
        if i is None:
            assert (flat_labels[a:b] == IGNORE_INDEX).all()
        else:
            ids, labels = cache.sample(i)
            assert flat_ids[a:b].tolist() == ids.tolist() and flat_labels[a:b].tolist() == labels.tolist()
    # Segments from the position ids (what a caller without cu_seqlens gives) mask the same way.
    assert torch.equal(block_causal_mask(segment_ids(3, SEQ_LEN, cu_seqlens=batch.cu_seqlens)),
                       block_causal_mask(segment_ids(3, SEQ_LEN, position_ids=batch.position_ids)))


def test_block_causal_mask():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = block_causal_mask(seg)[0, 0]
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i and seg[0, i] == seg[0, j])


# ----------------------------------------------------------------- packed == unpacked


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_loss_and_grads_equal_unpacked(cache, smollm_dir, arch):  # noqa: F811
    bins = best_fit_decreasing(cache.lengths, SEQ_LEN)[:3]
    assert max(len(b) for b in bins) >= 2, "the test needs rows holding several samples"
    batch = make_batch(cache, bins, SEQ_LEN)
    total = batch.n_target_tokens

    packed = tiny_student(smollm_dir, arch=arch, seed=1)
    loss_sum, n = forward_loss(packed, batch)
    assert n == total
    (loss_sum / total).backward()

    # Reference: transformers' stock SDPA model with the same weights, one sample at a time.
    alone = tiny_student(smollm_dir, arch=arch, seed=1, attn_implementation="sdpa")
    ref_sum = torch.zeros(())
    for i in (i for b in bins for i in b):
        ids, labels = (torch.from_numpy(x.astype(np.int64))[None] for x in cache.sample(i))
        s, _ = token_loss_sum(alone(input_ids=ids).logits, labels)
        (s / total).backward()
        ref_sum = ref_sum + s.detach()

    torch.testing.assert_close(loss_sum.detach(), ref_sum, rtol=1e-5, atol=0)
    got, want = _grads(packed), _grads(alone)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * scale.item(), msg=name)


def _logits(model, batch):
    return model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                 cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens,
                 max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).logits


def test_logits_do_not_change_when_another_sample_is_packed_before(cache, smollm_dir):  # noqa: F811
    model = tiny_student(smollm_dir, seed=2).eval()
    a, b = 0, 1
    la, lb = int(cache.lengths[a]), int(cache.lengths[b])
    assert la + lb <= SEQ_LEN
    with torch.no_grad():
        first = _logits(model, make_batch(cache, [[a]], SEQ_LEN))[0, :la]
        behind = _logits(model, make_batch(cache, [[b, a]], SEQ_LEN))[0, lb:lb + la]
        torch.testing.assert_close(behind, first, rtol=1e-5, atol=1e-5)
        # The check can fail: the same row as ONE segment lets `a` attend to `b` and moves its logits.
        leaky = make_batch(cache, [[b, a]], SEQ_LEN)
        leaky.cu_seqlens = torch.tensor([0, SEQ_LEN], dtype=torch.int32)
        assert (_logits(model, leaky)[0, lb:lb + la] - first).abs().max() > 1e-3


def test_load_student_from_a_directory_with_activation_checkpointing(cache, smollm_dir, tmp_path):  # noqa: F811
    from distill.train.model import load_student

    batch = make_batch(cache, best_fit_decreasing(cache.lengths, SEQ_LEN)[:2], SEQ_LEN)
    tiny_student(smollm_dir, seed=4).save_pretrained(tmp_path / "student")
    plain = load_student(str(tmp_path / "student"))
    recomputed = load_student(str(tmp_path / "student"), gradient_checkpointing=True)
    assert plain.config._attn_implementation == recomputed.config._attn_implementation == "distill_packed"
    for model in (plain, recomputed):
        model.train()
        forward_loss(model, batch)[0].backward()
    got, want = _grads(recomputed), _grads(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------- the step plan


def test_step_plan_is_deterministic_and_covers_each_epoch(cache):
    plan = plan_steps(cache, SEQ_LEN, seed=3, epochs=2)
    rows = best_fit_decreasing(cache.lengths, SEQ_LEN)
    assert plan.bins == plan_steps(cache, SEQ_LEN, seed=3, epochs=2).bins
    assert plan.bins != plan_steps(cache, SEQ_LEN, seed=4, epochs=2).bins
    n = len(rows)
    for epoch in range(2):
        assert sorted(map(tuple, plan.bins[epoch * n:(epoch + 1) * n])) == sorted(map(tuple, rows))
    assert plan.bins[:n] != plan.bins[n:]  # each epoch reshuffled


@pytest.mark.parametrize("world, micro_batch, grad_accum", [(1, 1, 4), (2, 2, 1), (4, 1, 1), (2, 1, 2)])
def test_global_batch_is_the_same_rows_for_any_split(cache, world, micro_batch, grad_accum):
    plan = plan_steps(cache, SEQ_LEN, seed=0, epochs=1)
    assert plan.num_steps(world, micro_batch, grad_accum) == len(plan.bins) // 4
    for step in range(plan.num_steps(world, micro_batch, grad_accum)):
        got = [b for r in range(world) for mb in plan.micro_batches(step, r, world, micro_batch, grad_accum) for b in mb]
        assert got == plan.bins[step * 4:(step + 1) * 4]
        for r in range(world):
            mbs = plan.micro_batches(step, r, world, micro_batch, grad_accum)
            assert len(mbs) == grad_accum and all(len(mb) == micro_batch for mb in mbs)
        tokens = sum(make_batch(cache, [b], SEQ_LEN).n_target_tokens for b in got)
        assert plan.global_target_tokens(step, world, micro_batch, grad_accum, cache) == tokens
        assert plan.global_target_tokens(step, world, micro_batch, grad_accum, cache.n_targets) == tokens
    with pytest.raises(IndexError):
        plan.micro_batches(plan.num_steps(world, micro_batch, grad_accum), 0, world, micro_batch, grad_accum)


# ----------------------------------------------------------------- flash-attn varlen (GPU only)


@pytest.mark.gpu
def test_flash_varlen_matches_per_sample_sdpa_on_gpu(cache, smollm_dir):  # noqa: F811
    pytest.importorskip("flash_attn")
    bins = best_fit_decreasing(cache.lengths, SEQ_LEN)[:3]
    batch = make_batch(cache, bins, SEQ_LEN).to("cuda")
    packed = tiny_student(smollm_dir, seed=1, dtype="bfloat16").cuda()
    alone = tiny_student(smollm_dir, seed=1, dtype="bfloat16", attn_implementation="sdpa").cuda()
    loss_sum, _ = forward_loss(packed, batch)
    ref = sum(token_loss_sum(alone(input_ids=torch.from_numpy(ids.astype(np.int64))[None].cuda()).logits,
                             torch.from_numpy(labels.astype(np.int64))[None].cuda())[0]
              for ids, labels in (cache.sample(i) for b in bins for i in b))
    torch.testing.assert_close(loss_sum.float(), ref.float(), rtol=2e-2, atol=0)
