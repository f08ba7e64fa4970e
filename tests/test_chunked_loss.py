"""The chunked cross-entropy (`loss.chunked_token_loss_sum`, train.loss_chunk) computes the dense
loss and its gradients without ever holding the [targets x vocab] logits: the same loss and
gradients (hidden, weight) within 1e-6 relative at Llama / Qwen2 vocabulary sizes, with chunks
that do and do not divide the target count, softcapping, ignored positions and bf16 inputs; the
same packed-model loss and parameter gradients as forward_loss's dense path; vocabulary-parallel
over two gloo ranks; and an autograd graph that saves nothing of size targets x vocab."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, free_port
from distill.train.data import IGNORE_INDEX, build_token_cache
from distill.train.loss import chunked_token_loss_sum
from distill.train.model import forward_loss, tiny_student
from distill.train.packing import best_fit_decreasing, make_batch
from test_train_data import gsm8k_chats, smollm_dir, write_jsonl  # noqa: F401  (fixture)

HIDDEN = 16
N = 300  # target positions


def _case(vocab: int, dtype=torch.float64, seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HIDDEN, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, HIDDEN, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = IGNORE_INDEX
    return hidden, weight, labels


def _dense(hidden, weight, labels, softcap=None):
    """The reference: full logits, then token_loss_sum's cross-entropy (in the inputs' precision
    for fp64, fp32 otherwise)."""
    logits = hidden @ weight.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _rel(a, b) -> float:
    return float((a - b).double().norm() / b.double().norm())


CASES = {"divides": (100, None), "remainder": (128, None), "softcap": (128, 30.0), "dense": (0, None)}
GRID = [(32000, dtype, case) for dtype in ("fp64", "fp32") for case in CASES] + \
    [(151936, "fp32", case) for case in CASES] + [(151936, "fp64", "remainder")]  # fp64 at 152k: slow


@pytest.mark.parametrize("vocab, dtype, case", GRID, ids=[f"{round(v / 1000)}k-{d}-{c}" for v, d, c in GRID])
def test_chunked_loss_and_grads_equal_the_dense_loss(vocab, dtype, case):
    dtype, (chunk, softcap) = getattr(torch, {"fp64": "float64", "fp32": "float32"}[dtype]), CASES[case]
    hidden, weight, labels = _case(vocab, dtype)
    loss = chunked_token_loss_sum(hidden, weight, labels, chunk, softcap)
    got = torch.autograd.grad(loss, (hidden, weight))
    ref = _dense(hidden, weight, labels, softcap)
    want = torch.autograd.grad(ref, (hidden, weight))
    # fp32 inputs: the reference is fp32 too; chunking reorders sums of up to `chunk` rows.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert loss.dtype == ref.dtype and abs(float(loss.detach() - ref.detach())) <= tol * abs(float(ref.detach()))
    assert _rel(got[0], want[0]) <= tol and _rel(got[1], want[1]) <= tol
    # Ignored positions get no gradient; the others do.
    assert got[0][labels == IGNORE_INDEX].abs().max() == 0 and got[0][labels != IGNORE_INDEX].abs().min() > 0


def test_bf16_inputs_keep_a_fp32_softmax():
    """bf16 hidden states and weight (a training run's dtypes): the loss is fp32 and matches the
    dense path's bf16 matmul + fp32 cross-entropy; the weight gradient, accumulated in bf16 one
    chunk at a time, within bf16 rounding of the dense one."""
    hidden, weight, labels = _case(32000, torch.bfloat16)
    loss = chunked_token_loss_sum(hidden, weight, labels, 64)
    got = torch.autograd.grad(loss, (hidden, weight))
    ref = _dense(hidden, weight, labels)
    want = torch.autograd.grad(ref, (hidden, weight))
    assert loss.dtype == torch.float32 and float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert _rel(got[0], want[0]) < 1e-4 and _rel(got[1], want[1]) < 1e-2


def test_tied_weight_gets_both_gradients():
    """A tied embedding is the same tensor as the head: its gradient is the embedding's plus the
    loss's, as with the dense loss."""
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(500, HIDDEN, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 500, (60,), generator=g)
    labels = torch.roll(ids, -1)

    def grad(loss_fn):
        (w,) = torch.autograd.grad(loss_fn(torch.tanh(emb[ids]), emb, labels), emb)
        return w

    chunked = grad(lambda h, w, y: chunked_token_loss_sum(h, w, y, 16))
    assert _rel(chunked, grad(_dense)) < 1e-12


def test_the_graph_saves_nothing_of_size_targets_x_vocab():
    """What autograd keeps between forward and backward: the dense loss saves its logits
    (targets x vocab), the chunked loss only hidden, weight, labels and one value per target; and
    nothing it allocates in forward or backward is larger than chunk x vocab."""
    n, vocab, chunk = 256, 4096, 32
    hidden, weight, labels = _case(vocab, torch.float32, n=n)

    def saved_numels(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
        return sizes

    assert max(saved_numels(lambda: _dense(hidden, weight, labels))) >= n * vocab
    sizes = saved_numels(lambda: chunked_token_loss_sum(hidden, weight, labels, chunk))
    assert max(sizes) == weight.numel() < n * vocab

    # Every tensor the chunked loss creates, forward and backward, via the dispatcher.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.shape not in (weight.shape, hidden.shape):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    with Largest():
        chunked_token_loss_sum(hidden, weight, labels, chunk).backward()
    assert 0 < Largest.largest <= chunk * vocab


def test_peak_memory_is_a_chunk_not_the_targets():
    """Resident memory measured (tools/bench_chunked_loss.py, a fresh process, Linux VmHWM): forward
    + backward over 8192 targets of a 32k vocabulary, whose dense logits alone would be 1000 MiB,
    peaks at about one chunk of 512 x 32k x 4 bytes (62.5 MiB), as over 2048 targets. (A chunk
    above glibc's 32 MiB mmap threshold: smaller ones may be kept by the heap after use.)"""
    def peak_mib(targets: int) -> int:
        out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_chunked_loss.py"), "--worker", "chunked",
                              str(targets), "--vocab", "32000", "--hidden", "8", "--chunk", "512", "--threads", "1"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        row = json.loads(out.stdout.splitlines()[-1])
        assert row["dense_logits_fp32_mib"] == round(targets * 32000 * 4 / 2**20)
        return row["loss_peak_mib"]

    chunk_mib = 512 * 32000 * 4 / 2**20
    small, large = peak_mib(2048), peak_mib(8192)
    assert chunk_mib * 0.9 < large < 2 * chunk_mib, large  # the dense loss: ~3 x 1000 MiB
    assert abs(large - small) < chunk_mib / 4, (small, large)


# ----------------------------------------------------------------- the packed model's loss


@pytest.fixture(scope="module")
def batch(tmp_path_factory, smollm_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("chunked")
    data = write_jsonl(tmp / "sft.jsonl", [{"messages": c} for c in gsm8k_chats(12, start=40)])
    cache = build_token_cache([data], smollm_dir, max_len=256, out_dir=tmp / "cache")
    return make_batch(cache, best_fit_decreasing(cache.lengths, 256)[:2], 256)


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen2", {"tie_word_embeddings": False}),
                                             ("llama", {"final_logit_softcapping": 5.0})],
                         ids=["llama-tied", "qwen2-untied", "softcap"])
def test_forward_loss_chunked_equals_dense(smollm_dir, batch, arch, overrides):  # noqa: F811
    """forward_loss(loss_chunk=k) against the dense loss_chunk=0: loss and every parameter's
    gradient (the tied embedding's included), with a chunk that does not divide the targets."""
    results = []
    for chunk in (0, 37):
        model = tiny_student(smollm_dir, arch=arch, seed=2, **overrides)
        loss, n = forward_loss(model, batch, loss_chunk=chunk)
        loss.backward()
        results.append((float(loss.detach()), n, {k: p.grad for k, p in model.named_parameters()}))
    (dense, n0, want), (chunked, n1, got) = results
    assert n0 == n1 == batch.n_target_tokens and n0 % 37 != 0
    assert chunked == pytest.approx(dense, rel=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        assert _rel(got[name], want[name]) < 1e-5, name


# ----------------------------------------------------------------- vocabulary parallel


def _vocab_parallel_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        vocab, padded = 1000, 1024  # Megatron pads the vocabulary to a multiple of 128 x tp
        hidden, weight, labels = _case(vocab, torch.float64, seed=4, n=90)
        full = torch.cat([weight.detach(), torch.randn(padded - vocab, HIDDEN, dtype=torch.float64)])
        rows = padded // world
        local = full[rank * rows:(rank + 1) * rows].clone().requires_grad_()
        h = hidden.detach().clone().requires_grad_()
        loss = chunked_token_loss_sum(h, local, labels, 32, vocab_start=rank * rows, vocab_size=vocab,
                                      group=dist.group.WORLD)
        loss.backward()
        dist.all_reduce(h.grad)  # the caller's parallel region sums the hidden gradient
        np.savez(f"{out}.{rank}", loss=loss.detach().numpy(), grad_h=h.grad.numpy(), grad_w=local.grad.numpy())
    finally:
        dist.destroy_process_group()


def test_vocabulary_parallel_equals_the_dense_loss(tmp_path):
    """Two ranks, each holding half of a padded vocabulary (the second half ends in padding
    rows): the same loss on both ranks, and the hidden and weight gradients of the dense loss."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "vp")
    mp.start_processes(_vocab_parallel_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    ranks = [np.load(f"{out}.{r}.npz") for r in range(2)]
    hidden, weight, labels = _case(1000, torch.float64, seed=4, n=90)
    ref = _dense(hidden, weight, labels)
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    for r in ranks:
        assert float(r["loss"]) == pytest.approx(float(ref.detach()), rel=1e-12)
        assert _rel(torch.from_numpy(r["grad_h"]), ref_h) < 1e-12
    grad_w = np.concatenate([r["grad_w"] for r in ranks])
    assert np.abs(grad_w[1000:]).max() == 0  # padding rows: no probability, no gradient
    assert _rel(torch.from_numpy(grad_w[:1000]), ref_w) < 1e-12
    assert os.path.exists(f"{out}.1.npz")
