"""Loss normalisation: the summed token loss divided by the global batch's target count gives
the same gradient for any split of the global batch into micro-batches, accumulation steps and
data-parallel ranks (the 2-rank case runs real gloo processes with an all-reduce SUM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port
from distill.train.data import build_token_cache, load_token_cache
from distill.train.loss import normalised_loss, token_loss_sum
from distill.train.model import forward_loss, tiny_student
from distill.train.packing import make_batch, plan_steps
from test_train_data import gsm8k_chats, smollm_dir, write_jsonl  # noqa: F401  (fixture)

SEQ_LEN = 512
SEED = 5


def test_token_loss_sum_is_summed_fp32_cross_entropy_over_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, -1] = -100
    loss, n = token_loss_sum(logits, labels)
    assert n == 10 and loss.dtype == torch.float32
    logp = torch.log_softmax(logits.float(), -1)
    want = -sum(logp[b, t, labels[b, t]] for b in range(2) for t in range(7) if labels[b, t] != -100)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        normalised_loss(loss, 0)


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory, smollm_dir) -> Path:  # noqa: F811
    tmp = tmp_path_factory.mktemp("loss")
    data = write_jsonl(tmp / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(24, start=100)])
    return build_token_cache([data], smollm_dir, max_len=SEQ_LEN, out_dir=tmp / "cache").path


def rank_grads(tokenizer_dir: str, cache_path: Path, rank: int, world: int, micro_batch: int, grad_accum: int,
               per_micro_batch_mean: bool = False) -> dict[str, torch.Tensor]:
    """One rank's part of optimizer step 0: backward of every micro-batch's normalised loss."""
    cache = load_token_cache(cache_path)
    plan = plan_steps(cache, SEQ_LEN, seed=SEED, epochs=1)
    model = tiny_student(tokenizer_dir, seed=SEED)
    total = plan.global_target_tokens(0, world, micro_batch, grad_accum, cache)
    for bins in plan.micro_batches(0, rank, world, micro_batch, grad_accum):
        batch = make_batch(cache, bins, SEQ_LEN)
        loss_sum, n = forward_loss(model, batch)
        # The naive alternative, for the sensitivity check: mean per micro-batch, averaged.
        loss = loss_sum / n / (grad_accum * world) if per_micro_batch_mean else normalised_loss(loss_sum, total)
        loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _dist_worker(rank: int, world: int, port: int, tokenizer_dir: str, cache_path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        grads = rank_grads(tokenizer_dir, Path(cache_path), rank, world, micro_batch=2, grad_accum=1)
        for g in grads.values():
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
        if rank == 0:
            torch.save(grads, out)
        # Rank 0 hosts the rendezvous store: leaving before rank 1 is done with it aborts rank 1
        # ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err <= rtol, f"{name}: relative difference {err:.2e}"


@pytest.fixture(scope="module")
def one_micro_batch_grads(smollm_dir, cache_path):  # noqa: F811
    """The reference: the whole global batch of step 0 as one micro-batch of 4 rows, 1 rank."""
    cache = load_token_cache(cache_path)
    counts = [int(cache.n_targets[b].sum()) for b in plan_steps(cache, SEQ_LEN, seed=SEED, epochs=1).bins[:4]]
    assert len(set(counts)) > 1, "rows with equal target counts would not test the normalisation"
    return rank_grads(smollm_dir, cache_path, 0, 1, micro_batch=4, grad_accum=1)


def test_gradient_is_independent_of_accumulation(smollm_dir, cache_path, one_micro_batch_grads):  # noqa: F811
    accumulated = rank_grads(smollm_dir, cache_path, 0, 1, micro_batch=1, grad_accum=4)
    assert_same_grads(accumulated, one_micro_batch_grads)
    # The check can fail: a mean per micro-batch weights tokens of short rows more.
    naive = rank_grads(smollm_dir, cache_path, 0, 1, micro_batch=1, grad_accum=4, per_micro_batch_mean=True)
    with pytest.raises(AssertionError):
        assert_same_grads(naive, one_micro_batch_grads, rtol=1e-3)


def test_gradient_is_independent_of_data_parallel_ranks(tmp_path, smollm_dir, cache_path, one_micro_batch_grads):  # noqa: F811
    """Two real gloo processes (loopback, free port), micro-batch 2 each, all-reduce SUM."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_dist_worker, args=(2, free_port(), smollm_dir, str(cache_path), str(out)), nprocs=2, join=True)
    assert_same_grads(torch.load(out), one_micro_batch_grads)


def test_global_batch_loss_is_the_mean_over_its_targets(smollm_dir, cache_path):  # noqa: F811
    cache = load_token_cache(cache_path)
    plan = plan_steps(cache, SEQ_LEN, seed=SEED, epochs=1)
    model = tiny_student(smollm_dir, seed=SEED)
    total = plan.global_target_tokens(0, 2, 1, 2, cache)
    with torch.no_grad():
        step_loss = sum(normalised_loss(forward_loss(model, make_batch(cache, mb, SEQ_LEN))[0], total)
                        for r in range(2) for mb in plan.micro_batches(0, r, 2, 1, 2))
        # Reference: every target of the step's samples, one sample at a time, plain mean.
        losses = []
        for i in (i for b in plan.bins[:4] for i in b):
            ids, labels = (torch.from_numpy(x.astype(np.int64))[None] for x in cache.sample(i))
            logp = torch.log_softmax(model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits, -1)
            keep = labels[0] != -100
            losses.append(-logp[0, keep].gather(-1, labels[0, keep][:, None]).squeeze(-1))
    all_losses = torch.cat(losses)
    assert len(all_losses) == total
    torch.testing.assert_close(step_loss, all_losses.mean(), rtol=1e-5, atol=0)
