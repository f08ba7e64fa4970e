"""Resuming a Megatron checkpoint under other degrees (reshard.py).

- Pure: a TP=2 x PP=2 shard set resharded to TP=1 x PP=1 and back reproduces every tensor
  exactly, for weights and for optimizer-shaped tensors unioned from sharded data ranks.
- End to end (gloo, 2 processes, the trainer's loop): 2 steps at TP=2, then 2 more at PP=2 and
  at DP=2 with the sharded optimizer -> the same losses as 4 steps straight at TP=2, up to the
  float reordering other splits cause. Dropping the Adam moments instead changes step 3's loss
  (step 4) by far more than that tolerance (checked below), so the test sees whether they were
  carried.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megatron_probe import tiny
from train_probe import make_assets, make_job, read_losses, run_probe

N = 2


def _shards(hf: dict, spec, tp: int, pp: int) -> dict:
    from distill.train.backends.megatron.convert import from_hf_shard

    return {(t, p): from_hf_shard(hf, spec, tp=tp, tp_rank=t, pp=pp, pp_rank=p, divisible_by=8)
            for t in range(tp) for p in range(pp)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reshard_round_trip_is_exact(arch):
    import torch

    from distill.train.backends.megatron.convert import spec_from_hf_config
    from distill.train.backends.megatron.reshard import optimizer_tensors, reshard

    model = tiny(arch)
    spec = spec_from_hf_config(model.config)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old = _shards(hf, spec, tp=2, pp=2)
    merged = {(0, 0): reshard(lambda t, p: old[(t, p)], spec, old_tp=2, old_pp=2, tp=1, tp_rank=0, pp=1, pp_rank=0,
                              divisible_by=8)}
    assert merged[(0, 0)].keys() == _shards(hf, spec, tp=1, pp=1)[(0, 0)].keys()
    for (t, p), shard in old.items():
        back = reshard(lambda a, b: merged[(a, b)], spec, old_tp=1, old_pp=1, tp=2, tp_rank=t, pp=2, pp_rank=p,
                       divisible_by=8)
        assert back.keys() == shard.keys()
        for name in shard:
            assert torch.equal(back[name], shard[name]), (arch, t, p, name)

    # Optimizer files of one (t, p) shard, split over two data ranks as the sharded optimizer does.
    shard = old[(1, 1)]
    names = list(shard)
    states = []
    for d in range(2):
        mine = names[d::2]
        states.append({"master": {n: shard[n] * 1 for n in mine},
                       "adam": {"param_groups": [{"params": list(range(len(mine)))}],
                                "state": {i: {"step": torch.tensor(7.0), "exp_avg": shard[n] * 2,
                                              "exp_avg_sq": shard[n] * 3} for i, n in enumerate(mine)}}})
    tensors, step = optimizer_tensors(states)
    assert float(step) == 7.0 and set(tensors["master"]) == set(names)
    for n in names:
        assert torch.equal(tensors["exp_avg"][n], shard[n] * 2) and torch.equal(tensors["exp_avg_sq"][n], shard[n] * 3)
    with pytest.raises(RuntimeError, match="two data ranks"):
        optimizer_tensors([states[0], states[0]])


@pytest.fixture(scope="module")
def assets(tmp_path_factory, gsm8k_train):
    # 4 layers so that PP=2 has two per stage.
    return make_assets(tmp_path_factory.mktemp("reshard"), gsm8k_train, rows=48, num_hidden_layers=4,
                       backend="megatron", **{"megatron.tensor_parallel": 2})


@pytest.mark.slow
def test_resume_under_other_degrees_continues_the_same_run(assets):
    common = {"schedule.total_steps": 2 * N, "checkpoint.every_steps": N}
    straight = make_job(assets, "straight", max_steps=2 * N, **common)
    run_probe(straight)
    first = make_job(assets, "first", max_steps=N, **common)
    run_probe(first)
    want = read_losses(straight)

    layouts = {
        "pp2": {"megatron.tensor_parallel": 1, "megatron.pipeline_parallel": 2},
        # 2 data ranks x grad_accum 1: the same global batch as 1 data rank x grad_accum 2.
        "dp2-sharded": {"megatron.tensor_parallel": 1, "megatron.distributed_optimizer": True, "grad_accum": 1},
    }
    for name, layout in layouts.items():
        job = make_job(assets, name, max_steps=2 * N, **{**common, **layout})
        shutil.copytree(first.checkpoint_dir, job.checkpoint_dir, dirs_exist_ok=True)
        run_probe(job)
        got = read_losses(job)
        assert sorted(got) == list(range(N + 1, 2 * N + 1)), (name, got)
        for step in got:
            # rel 2e-4: the tolerance test_megatron_train uses between TP=2 and DP=2 splits.
            assert got[step] == pytest.approx(want[step], rel=2e-4), (name, step, got, want)
        ckpt = Path(job.checkpoint_dir) / f"step-{2 * N:08d}" / "megatron"
        assert (ckpt / "meta.json").is_file()

    # Control: the same resume with the Adam moments zeroed must miss that tolerance, or the
    # comparison above could not tell carried moments from fresh ones.
    import torch

    from distill.fsio import atomic_write_json
    from distill.train.checkpoint import MANIFEST, build_manifest

    job = make_job(assets, "zeroed-moments", max_steps=2 * N, **{**common, **layouts["pp2"]})
    shutil.copytree(first.checkpoint_dir, job.checkpoint_dir, dirs_exist_ok=True)
    step_dir = Path(job.checkpoint_dir) / f"step-{N:08d}"
    for f in (step_dir / "megatron").glob("optim-*.pt"):
        st = torch.load(f, weights_only=True)
        for moments in st["optimizer"]["adam"]["state"].values():
            moments["exp_avg"].zero_()
            moments["exp_avg_sq"].zero_()
        torch.save(st, f)
    atomic_write_json(step_dir / MANIFEST, build_manifest(step_dir, checksums=True))  # deliberate, not corruption
    run_probe(job)
    got = read_losses(job)
    # Step N+1's loss is computed before the first update with the zeroed moments; step 2N's after.
    assert got[N + 1] == pytest.approx(want[N + 1], rel=2e-4), (got, want)
    assert got[2 * N] != pytest.approx(want[2 * N], rel=2e-4), (got, want)
