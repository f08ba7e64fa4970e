"""Context parallelism on the Megatron backend (train.megatron.context_parallel): each rank of a
context group holds a contiguous 1/cp of every packed row, attention all-gathers K/V.

- Pure: which sample pieces a shard holds, their keys and RoPE positions, for a sample that
  spans the shard boundary; config refusals name train.megatron.context_parallel.
- Parity (gloo, torchrun): at CP=2 and CP=2 x TP=2 the logits, the loss of one accumulated step
  (2 micro-batches, summed token losses / global target count) and every gradient equal the
  unsplit HF model's on packed rows of real chats where samples span the shard boundary.
- Resume across context degrees (the trainer's loop): a run checkpointed at CP=2 continues at
  CP=1 (2 data ranks, grad_accum 1: the same global batch) with the losses of the run that
  stayed at CP=2, and wrote the same files a CP=1 run writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from train_probe import make_assets, make_job, read_losses, run_probe

N = 2

PROBE = """
import sys

import numpy as np

import megatron_probe as probe


def main():
    import torch

    from distill.train.backends.megatron import MegatronBackend
    from distill.train.backends.megatron.convert import to_hf
    from distill.train.config import TrainConfig
    from distill.train.model import forward_loss

    arch, tp, cp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    mbs = probe.batches(2)
    cfg = TrainConfig.model_validate({
        "backend": "megatron", "seq_len": probe.SEQ_LEN, "grad_accum": len(mbs), "grad_clip": None,
        "megatron": {"tensor_parallel": tp, "context_parallel": cp},
        "launch": {"launcher": "torchrun", "num_workers": tp * cp}})
    be = MegatronBackend(cfg, precision="fp32")
    be.setup(probe.tiny(arch), total_steps=1)
    ref = probe.tiny(arch)
    total = sum(b.n_target_tokens for b in mbs)
    res = {"megatron_logits": be.packed_logits(mbs[0]).numpy()}
    reduced, _, _ = be.accumulate(mbs, total)
    local = sum(float(r["loss_sum"]) for r in reduced) if be.tp_rank == 0 else 0.0
    loss = torch.tensor([local], dtype=torch.float64)
    torch.distributed.all_reduce(loss)
    res["megatron_loss"] = (loss / total).numpy()
    shards = [None] * be.world_size
    torch.distributed.all_gather_object(shards, ((be.tp_rank, be.pp_rank, be.cp_rank), be.shard_grads()))
    mine = {(t, p): g for (t, p, c), g in shards if c == 0}
    res["cp_copies_agree"] = np.array(all(
        all(torch.equal(g[n], mine[(t, p)][n]) for n in g) for (t, p, c), g in shards))
    merged = to_hf(mine, be.spec, tp=tp, pp=1)
    res["norm_megatron"] = np.array(be.optimizer.grad_norm())
    with torch.no_grad():
        b = mbs[0]
        base = ref.base_model(input_ids=b.input_ids, position_ids=b.position_ids, cu_seq_lens_q=b.cu_seqlens,
                              cu_seq_lens_k=b.cu_seqlens, max_length_q=b.max_seqlen, max_length_k=b.max_seqlen,
                              use_cache=False)
        res["hf_logits"] = ref.get_output_embeddings()(base.last_hidden_state).numpy()
    hf_loss = sum(forward_loss(ref, b)[0] for b in mbs) / total
    hf_loss.backward()
    res["hf_loss"] = np.array([float(hf_loss)])
    res["norm_hf"] = np.array(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()) ** 0.5)
    for name, p in ref.named_parameters():
        res["hf/" + name] = p.grad.numpy()
        res["megatron/" + name] = merged[name].numpy()
    # Samples that span a shard boundary with targets after it: their queries read keys of the
    # previous shard (what the all-gather and the RoPE offsets must get right).
    t = probe.SEQ_LEN
    spans = 0
    for b in mbs:
        cu, labels = b.cu_seqlens.tolist(), b.labels.reshape(-1)
        for s, e in zip(cu[:-1], cu[1:]):
            for cut in range(s // t * t + t // cp, s // t * t + t, t // cp):
                spans += int(s < cut < e and bool((labels[cut:e] != -100).any()))
    res["spanning"] = np.array(spans)
    if be.rank == 0:
        np.savez(out, **res)
    be.close()


main()
"""


# --------------------------------------------------------------------------- pure


def test_shard_pieces_cover_the_shard_and_continue_samples_across_the_boundary():
    import torch

    from distill.train.backends.megatron.model import row_shards, shard_pieces

    # 2 rows of 8 tokens, 2 shards of 4: row 0 = samples [0,3) [3,8); row 1 = [8,14) and padding [14,16).
    cu = [0, 3, 8, 14, 16]
    assert shard_pieces(cu, 8, 0, 2) == [(0, 3, 0, 3), (3, 1, 3, 4), (4, 4, 8, 12)]
    assert shard_pieces(cu, 8, 1, 2) == [(0, 4, 3, 8), (4, 2, 8, 14), (6, 2, 14, 16)]
    for index in range(2):  # the pieces tile the local tokens in order
        pieces = shard_pieces(cu, 8, index, 2)
        assert [p[0] for p in pieces] == list(np.cumsum([0] + [p[1] for p in pieces])[:-1])
        assert sum(p[1] for p in pieces) == 8
    # Positions continue the sample that began on the other shard (token 4 is position 1 of [3,8)).
    rows = row_shards(torch.tensor(cu, dtype=torch.int32), 2, 8, 6, index=1, degree=2, group=None)
    assert rows.positions.tolist() == [1, 2, 3, 4, 4, 5, 0, 1]
    assert rows.cu_seqlens_q.tolist() == [0, 4, 8] and rows.max_seqlen_q == 4
    with pytest.raises(ValueError, match="train.megatron.context_parallel=3"):
        shard_pieces(cu, 8, 0, 3)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        shard_pieces([0, 10, 16], 8, 0, 2)


@pytest.mark.parametrize("train,needle", [
    ({"megatron": {"context_parallel": 2}, "launch": {"launcher": "torchrun", "num_workers": 3}},
     "train.megatron.context_parallel=2 does not divide train.launch.num_workers=3"),
    ({"seq_len": 99, "megatron": {"context_parallel": 2}, "launch": {"launcher": "torchrun", "num_workers": 2}},
     "train.megatron.context_parallel=2 does not divide train.seq_len=99"),
    ({"seq_len": 100, "megatron": {"context_parallel": 2, "tensor_parallel": 4, "sequence_parallel": True},
      "launch": {"launcher": "torchrun", "num_workers": 8}}, "seq_len / context_parallel * train.micro_batch = 50"),
])
def test_config_refuses_degrees_that_do_not_divide(train, needle):
    from distill.train.config import TrainConfig

    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("*", r"\*")):
        TrainConfig.model_validate({"backend": "megatron", **train})
    ok = TrainConfig.model_validate({"backend": "megatron", "seq_len": 96, "megatron": {"context_parallel": 2},
                                     "launch": {"launcher": "torchrun", "num_workers": 4}})
    assert ok.megatron.context_parallel == 2


# --------------------------------------------------------------------------- parity


def _probe(tmp_path, arch: str, tp: int, cp: int):
    out = tmp_path / f"{arch}-tp{tp}-cp{cp}.npz"
    script = tmp_path / "cp_probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp * cp}",
           str(script), arch, str(tp), str(cp), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return np.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("arch,tp,cp", [("llama", 1, 2), ("qwen2", 2, 2)], ids=["llama-cp2", "qwen2-cp2-tp2"])
def test_context_parallel_equals_the_unsplit_model(tmp_path, arch, tp, cp):
    d = _probe(tmp_path, arch, tp, cp)
    assert int(d["spanning"]) >= 2
    np.testing.assert_allclose(d["megatron_logits"], d["hf_logits"], rtol=0, atol=1e-5)
    assert float(d["megatron_loss"][0]) == pytest.approx(float(d["hf_loss"][0]), rel=1e-6)
    assert bool(d["cp_copies_agree"])  # the context ranks hold the same summed gradients
    names = [k[3:] for k in d.files if k.startswith("hf/")]
    for name in names:
        np.testing.assert_allclose(d["megatron/" + name], d["hf/" + name], rtol=0, atol=1e-5, err_msg=name)
    assert float(d["norm_megatron"]) == pytest.approx(float(d["norm_hf"]), rel=1e-5)
    assert max(np.abs(d["hf/" + n]).max() for n in names) > 1e-2


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gsm8k_train):
    return make_assets(tmp_path_factory.mktemp("cp"), gsm8k_train, rows=24, backend="megatron",
                       **{"megatron.context_parallel": 2})


@pytest.mark.slow
def test_resume_across_context_degrees_continues_the_same_run(assets):
    """2N steps at CP=2 (1 data rank x grad_accum 2), checkpointed at N; its step-N checkpoint
    resumed at CP=1 as 2 data ranks x grad_accum 1 (the same rows per step) gives the CP=2 run's
    losses for steps N+1..2N."""
    common = {"schedule.total_steps": 2 * N, "checkpoint.every_steps": N, "max_steps": 2 * N}
    from distill.train.data import load_token_cache

    # Chats longer than train.seq_len were dropped whole before any row was packed or sharded.
    assert load_token_cache(Path(assets.cache)).n_dropped > 0
    cp2 = make_job(assets, "cp2", **common)
    run_probe(cp2)
    want = read_losses(cp2)
    assert sorted(want) == list(range(1, 2 * N + 1)) and want[2 * N] < want[1]
    first = Path(cp2.checkpoint_dir) / f"step-{N:08d}"
    # Context parallelism left no trace in the layout: one data rank's files, as at CP=1.
    assert sorted(p.name for p in (first / "megatron").iterdir()) == [
        "meta.json", "model-tp00-pp00.pt", "optim-tp00-pp00-dp000.pt"]

    cp1 = make_job(assets, "cp1", grad_accum=1, **{**common, "megatron.context_parallel": 1})
    shutil.copytree(first, Path(cp1.checkpoint_dir) / first.name)
    (Path(cp1.checkpoint_dir) / "latest").write_text(first.name + "\n")
    run_probe(cp1)
    got = read_losses(cp1)
    assert sorted(got) == list(range(N + 1, 2 * N + 1)), got
    for step in got:
        # Measured: step N+1 equal, step 2N within 5e-8 (another reduction order); a different
        # data order or lost Adam moments move step 2N by > 1e-4.
        assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)
