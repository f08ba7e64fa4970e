"""Ulysses sequence parallelism on the DeepSpeed backend (distill.train.seqpar), on CPU with gloo.

- real processes, degree 2 and 4: the loss and every parameter gradient of a row split over the
  group equal the unsplit run's, on packed rows whose samples cross every shard boundary;
- DeepSpeed end to end: 2 ranks x sp 2 give the same per-step losses as 1 rank without it on the
  same global batches, split differently over accumulation steps (global-token normalisation and
  accumulation invariance still hold); a sample longer than seq_len is still dropped and counted;
- refusals: a degree that does not divide the heads, key/value heads, workers or row length.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from test_train_data import smollm_dir  # noqa: F401  (fixture)

SEQ = 32
# Samples per row (token counts; a row's rest is a padding segment). Row 0's second sample runs
# from 3 to 29, across every shard boundary at degree 2 (16) and 4 (8, 16, 24); row 1's from 10
# to 23 crosses 16, and a padding segment ends it.
ROWS = [[3, 26, 3], [10, 13]]
PROMPT = 2  # the first tokens of each sample are prompt: not targets


def packed_batch(vocab: int, seed: int = 0):
    """Two packed rows of SEQ tokens: per-sample position ids, shifted labels with prompts and
    padding masked, cu_seqlens over the flattened rows."""
    import torch

    from distill.train.packing import PackedBatch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(len(ROWS), SEQ))
    labels = np.full_like(ids, -100)
    pos = np.zeros_like(ids)
    bounds = [0]
    for r, lengths in enumerate(ROWS):
        at = 0
        for n in lengths:
            pos[r, at:at + n] = np.arange(n)
            labels[r, at + PROMPT - 1:at + n - 1] = ids[r, at + PROMPT:at + n]
            at += n
            bounds.append(r * SEQ + at)
        pos[r, at:] = np.arange(SEQ - at)
        bounds.append((r + 1) * SEQ)
    cu = torch.tensor(sorted(set(bounds)), dtype=torch.int32)
    return PackedBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos), cu,
                       int(torch.diff(cu).max()), int((labels != -100).sum()))


def loss_and_grads(model, batch):
    from distill.train.model import forward_loss

    model.zero_grad()
    loss, _ = forward_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _seqpar_worker(rank: int, world: int, port: int, model, batch, out: str) -> None:
    import torch
    import torch.distributed as dist

    from distill.train.seqpar import new_groups, shard_batch, sharded

    torch.set_num_threads(1)  # four ranks share the machine's cores
    # A rank stuck in a collective fails the test in a minute instead of CI's 15.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        want_loss, want = loss_and_grads(model, batch)  # the unsplit run, in this process
        report = {}
        for degree in (2, 4):
            seq = new_groups(degree)
            with sharded(seq):
                loss, got = loss_and_grads(model, shard_batch(batch, seq))
            # Each rank holds its shard's loss and gradients: the group's sum is the row's.
            dist.all_reduce(loss, group=seq.group)
            for g in got.values():
                dist.all_reduce(g, group=seq.group)
            report[degree] = {"loss": [float(loss), float(want_loss)],
                              "grads": {n: [float((got[n] - want[n]).abs().max()), float(want[n].abs().max())]
                                        for n in want}}
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()  # rank 0 hosts the rendezvous store: it must not leave first
    finally:
        dist.destroy_process_group()


def test_split_rows_give_the_unsplit_loss_and_gradients(tmp_path, smollm_dir):  # noqa: F811
    """4 real gloo processes: groups of 2 (two groups) and of 4, each against the unsplit run."""
    import torch.multiprocessing as mp

    from distill.train.model import tiny_student

    crossing = [sum(ROWS[0][:1]), sum(ROWS[0][:2])]
    assert crossing[0] < SEQ // 4 and crossing[1] > 3 * SEQ // 4, "a sample must span every shard of row 0"
    # 8 query heads over 4 kv heads: at degree 4 each rank holds 2 query heads and their 1 kv head.
    model = tiny_student(smollm_dir, seed=3, num_attention_heads=8, num_key_value_heads=4)
    batch = packed_batch(model.config.vocab_size)
    # Forked, not spawned: the ranks inherit the imports and the model instead of each paying
    # ~10 s to import transformers and build it again on a 2-core machine.
    mp.start_processes(_seqpar_worker, args=(4, free_port(), model, batch, str(tmp_path)), nprocs=4, join=True,
                       start_method="fork")
    for rank in range(4):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for degree, r in report.items():
            got, want = r["loss"]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (rank, degree)
            assert len(r["grads"]) > 10
            for name, (err, scale) in r["grads"].items():
                assert scale > 0, name
                assert err <= 1e-5 * max(1.0, scale), (rank, degree, name, err, scale)


def test_shard_batch_slices_tokens_and_keeps_the_rows_segments():
    import torch

    from distill.train.seqpar import SeqGroup, shard_batch

    batch = packed_batch(1000)
    parts = [shard_batch(batch, SeqGroup(group=None, index=i, degree=4)) for i in range(4)]
    for name in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts], dim=1), getattr(batch, name))
    assert all(p.cu_seqlens is batch.cu_seqlens and p.max_seqlen == batch.max_seqlen for p in parts)
    assert sum(p.n_target_tokens for p in parts) == batch.n_target_tokens
    # The second sample of row 0 continues on shard 1 at position 5, not 0.
    assert parts[1].position_ids[0, 0] == SEQ // 4 - ROWS[0][0]
    assert shard_batch(batch, None) is batch


# ----------------------------------------------------------------------------- refusals


def _cfg(**overrides):
    from distill.train.config import TrainConfig

    base = {"seq_len": 256, "launch": {"launcher": "torchrun", "num_workers": 4}, "deepspeed": {}}
    for key, value in overrides.items():
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.model_validate(base)


@pytest.mark.parametrize(("overrides", "fix"), [
    ({"launch.num_workers": 3, "deepspeed.sequence_parallel": 2}, "train.launch.num_workers=3"),
    ({"seq_len": 250, "deepspeed.sequence_parallel": 4}, "train.seq_len=250"),
    ({"backend": "megatron", "deepspeed.sequence_parallel": 2}, "train.backend=deepspeed"),
])
def test_config_refuses_a_degree_that_does_not_divide(overrides, fix):
    with pytest.raises(ValueError) as e:
        _cfg(**overrides)
    assert "train.deepspeed.sequence_parallel" in str(e.value) and fix in str(e.value)


def test_preflight_refuses_a_degree_that_does_not_divide_the_heads():
    from transformers import AutoConfig

    from distill.train.launch import student_problems

    def problems(heads: int, kv: int, sp: int) -> list[str]:
        student = AutoConfig.for_model("llama", hidden_size=8 * heads, num_attention_heads=heads,
                                       num_key_value_heads=kv, max_position_embeddings=4096)
        return student_problems(_cfg(**{"deepspeed.sequence_parallel": sp}), student)

    assert problems(8, 4, 4) == problems(4, 2, 2) == []
    heads, kv = problems(6, 2, 4)
    assert heads.startswith("train.deepspeed.sequence_parallel=4") and "6 attention heads" in heads
    assert kv.startswith("train.deepspeed.sequence_parallel=4") and "2 key/value heads" in kv
    assert problems(8, 2, 4) == [kv]


# ----------------------------------------------------------------------------- DeepSpeed end to end


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gsm8k_train):
    """A tiny llama (4 heads, 2 kv heads), GSM8K chats plus one chat longer than seq_len, one
    token cache built by `prepare` with sequence parallelism on."""
    from train_probe import TrainAssets, make_tiny_model, tiny_train_config, write_sft_jsonl

    from distill.train.config import TrainConfig
    from distill.train.launch import prepare

    root = tmp_path_factory.mktemp("sp")
    model = make_tiny_model(root / "tiny")
    data = write_sft_jsonl(gsm8k_train, root / "sft.jsonl", 24)
    long_reply = " ".join(f"step {i}: add {i} and {i + 1}." for i in range(200))
    with open(data, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Count."},
                                         {"role": "assistant", "content": long_reply}]}) + "\n")
    base = {"deepspeed.sequence_parallel": 2}
    job = prepare(TrainConfig.model_validate(tiny_train_config(model, data, **base)), root / "base")
    return TrainAssets(root=root, model=model, data=data, cache=job.cache_path, base={})


STEPS = 3


def _run(assets, name: str, world: int, **overrides) -> dict[int, tuple[float, float]]:
    """step -> (loss, gradient norm) of a job of STEPS steps on `world` ranks."""
    from train_probe import make_job, run_probe

    from distill.fsio import read_jsonl

    job = make_job(assets, name, max_steps=STEPS, **{"schedule.total_steps": STEPS, "checkpoint.every_steps": STEPS,
                                                      "launch.num_workers": world, **overrides})
    run_probe(job, world=world)
    steps = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_jsonl(Path(job.out_dir) / "metrics.jsonl")}
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


@pytest.mark.slow
def test_deepspeed_sequence_parallel_steps_equal_the_unsplit_run(assets):
    """The same global batches of 2 rows: 1 rank, grad_accum 2 x 1 row (the reference) and 2 ranks
    in one sequence group, grad_accum 1 x 2 rows, with activation checkpointing (attention
    recomputed inside backward) and the chunked loss (over each rank's shard of targets). Equal
    losses and gradient norms at every step: the split over ranks and accumulation steps changes
    neither the normalisation (each target counted once) nor the gradient (the norm sees its
    scale, which Adam's update would mostly hide)."""
    from distill.train.data import load_token_cache

    cache = load_token_cache(Path(assets.cache))
    # Over-long chats (the one added and a few of GSM8K's at 256 tokens) are dropped and counted, never cut.
    assert cache.n_samples + cache.n_dropped == 25 and cache.reasons == {"too_long": cache.n_dropped}
    assert cache.n_dropped >= 1 and int(cache.lengths.max()) <= 256
    want = _run(assets, "sp1", 1, grad_accum=2, micro_batch=1)
    split = _run(assets, "sp2", 2, grad_accum=1, micro_batch=2, loss_chunk=64,
                 **{"deepspeed.sequence_parallel": 2, "deepspeed.activation_checkpointing": True})
    for step in want:
        assert split[step] == pytest.approx(want[step], rel=1e-5), (step, want, split)
    assert want[STEPS][0] < want[1][0]  # the steps changed the weights, so later losses test the updates
