"""`distill run CFG --dry-run`: every shipped recipe validates and resolves to a plan (stages,
Ray resources, parallel degrees, memory per GPU) without a GPU or the network; the estimates in
distill/plan.py follow the ZeRO / Megatron arithmetic; an impossible plan names the key to change."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import DATA, REPO, distill_cmd
from distill import plan as P
from distill.cli import main

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
GPU_RECIPES = ["r1_distill_1p5b_vllm.yaml", "r1_distill_1p5b_api.yaml", "zero_infinity_7b.yaml",
               "megatron_tp4_pp2.yaml", "r1_distill_7b_32k.yaml"]


# --------------------------------------------------------------------------- pure estimates


@pytest.mark.parametrize("name, card_params", [
    ("Qwen/Qwen2.5-1.5B", 1.54e9), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78e9),
    ("Qwen/Qwen2.5-7B", 7.62e9), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 32.8e9),
    ("meta-llama/Llama-3.1-8B", 8.03e9), ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6)])
def test_table_shapes_give_the_model_card_parameter_counts(name, card_params):
    assert P.KNOWN_MODELS[name].params() == pytest.approx(card_params, rel=0.005)


def test_shape_formula_equals_the_exact_count_of_a_real_config():
    """The formula behind the table, against a model built from a real config on the meta device."""
    shape, source = P.read_model_shape("smollm2-135m-instruct")
    assert shape is not None and "packaged model" in source
    formula = P.ModelShape(**{**shape.__dict__, "n_params": None})
    assert formula.params() == shape.n_params
    assert shape.max_positions == P.KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"].max_positions


def test_parallel_degrees_split_the_world_or_refuse():
    p = P.parallel_degrees(16, tp=4, pp=2)
    assert (p.dp, p.tp, p.pp, p.cp) == (2, 4, 2, 1) and p.dp * p.tp * p.pp * p.cp == p.world
    with pytest.raises(ValueError, match="not a multiple of tp\\*pp\\*cp"):
        P.parallel_degrees(12, tp=4, pp=2)


def test_zero3_of_7b_over_8_gpus():
    p, g, o, cpu, nvme = P.model_state_bytes(7e9, dp=8, zero_stage=3, precision="bf16")
    assert p == pytest.approx(14e9 / 8) and g == pytest.approx(14e9 / 8) and o == pytest.approx(84e9 / 8)
    assert cpu == nvme == 0


def test_each_zero_stage_saves_memory_and_dp_1_saves_nothing():
    totals = [sum(P.model_state_bytes(7e9, dp=8, zero_stage=z)[:3]) for z in range(4)]
    assert totals[0] == pytest.approx(16 * 7e9)  # 2 + 2 + 12 bytes per parameter, replicated
    assert all(a > b for a, b in zip(totals, totals[1:])), totals
    single = {sum(P.model_state_bytes(7e9, dp=1, zero_stage=z)[:3]) for z in range(4)}
    assert len(single) == 1


def test_offload_moves_state_off_the_gpu_without_losing_any():
    on_gpu = P.model_state_bytes(7e9, dp=4, zero_stage=3)
    opt_cpu = P.model_state_bytes(7e9, dp=4, zero_stage=3, offload_optimizer="cpu")
    both_nvme = P.model_state_bytes(7e9, dp=4, zero_stage=3, offload_optimizer="nvme", offload_param="nvme")
    assert opt_cpu[2] == 0 and opt_cpu[3] == pytest.approx(on_gpu[2]) and opt_cpu[:2] == on_gpu[:2]
    assert both_nvme[0] == both_nvme[2] == 0 and both_nvme[4] == pytest.approx(on_gpu[0] + on_gpu[2])
    assert sum(both_nvme) == pytest.approx(sum(on_gpu))


def test_tensor_and_pipeline_parallel_divide_model_states():
    full = P.model_state_bytes(7e9, dp=1)
    split = P.model_state_bytes(7e9, dp=1, tp=4, pp=2)
    assert all(s == pytest.approx(f / 8) for s, f in zip(split[:3], full[:3]))
    dist = P.model_state_bytes(7e9, dp=2, tp=4, pp=2, distributed_optimizer=True)
    assert dist[2] == pytest.approx(split[2] / 2) and dist[0] == pytest.approx(split[0])


def test_activation_estimate_moves_the_right_way():
    kw = dict(seq_len=16384, micro_batch=1, hidden=1536, n_layers=28)
    base = P.activation_bytes(**kw)
    assert base == pytest.approx(28 * 34 * 16384 * 1536)  # 34 s b h per layer, 16-bit, FlashAttention
    assert P.activation_bytes(**{**kw, "seq_len": 8192}) == pytest.approx(base / 2)
    ckpt = P.activation_bytes(**kw, checkpointing=True)
    assert ckpt < base / 5
    tp = P.activation_bytes(**kw, tp=4)
    sp = P.activation_bytes(**kw, tp=4, sequence_parallel=True)
    assert sp == pytest.approx(base / 4) and sp < tp < base
    assert P.activation_bytes(**kw, cp=2) == pytest.approx(base / 2)
    assert P.activation_bytes(**kw, precision="fp32") == pytest.approx(2 * base)


def test_memory_per_gpu_adds_up():
    shape = P.KNOWN_MODELS["Qwen/Qwen2.5-7B"]
    m = P.memory_per_gpu(shape, P.parallel_degrees(8), zero_stage=3, precision="bf16", seq_len=4096, micro_batch=1)
    assert m.params == pytest.approx(2 * shape.params() / 8)
    assert m.logits == pytest.approx(3 * 4096 * shape.vocab * 4)  # fp32 log-probs + 2 gradients in backward
    assert m.gpu_total == pytest.approx(m.params + m.grads + m.optimizer + m.activations + m.logits)


def test_the_chunked_loss_bounds_the_logits_term():
    kw = dict(seq_len=16384, micro_batch=1, vocab=151936)
    dense = P.logits_bytes(**kw)
    assert dense == pytest.approx(3 * 16384 * 151936 * 4)
    chunked = P.logits_bytes(**kw, chunk=512)
    assert chunked == pytest.approx(2 * 512 * 151936 * 4) and chunked < 1e9
    assert P.logits_bytes(**{**kw, "seq_len": 65536}, chunk=512) == chunked  # whatever the row length
    assert P.logits_bytes(**kw, chunk=16384) == dense  # a chunk holding every target is the dense loss
    assert P.logits_bytes(**kw, chunk=512, tp=4) == pytest.approx(chunked / 4)  # vocabulary-parallel
    assert P.logits_bytes(**kw, ulysses=4) == pytest.approx(dense / 4)  # a quarter of the tokens per rank


def test_ulysses_splits_the_row_and_zero_shards_over_every_rank():
    shape = P.KNOWN_MODELS["Qwen/Qwen2.5-7B"]
    kw = dict(zero_stage=3, precision="bf16", seq_len=32768, micro_batch=1, checkpointing=True)
    one, two = (P.memory_per_gpu(shape, P.parallel_degrees(8, sp=sp), **kw) for sp in (1, 2))
    assert P.parallel_degrees(8, sp=2).dp == 4
    assert two.activations == pytest.approx(one.activations / 2) and two.logits == pytest.approx(one.logits / 2)
    # DeepSpeed's data-parallel group is every rank: the sequence group's ranks shard ZeRO state too.
    assert (two.params, two.grads, two.optimizer) == (one.params, one.grads, one.optimizer)
    with pytest.raises(ValueError, match="tp\\*pp\\*cp\\*sp"):
        P.parallel_degrees(8, sp=3)


# --------------------------------------------------------------------------- the CLI on every recipe


def _dry_run(capsys, path: Path, *overrides: str) -> tuple[int, str, str]:
    rc = main(["run", str(path), *overrides, "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_gpu_recipes_are_shipped():
    assert set(GPU_RECIPES) <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_resolves_its_plan(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name data relative to the repository root
    rc, out, err = _dry_run(capsys, path)
    assert rc == 0, err
    cfg = yaml.safe_load(out.split("\n# plan\n")[0])  # the resolved config comes first
    stages = cfg["run"]["stages"]
    plan = out.split("\n# plan\n")[1]
    listed = re.findall(r"^  (\w+)\s+(\d+) x \(", plan, flags=re.M)
    assert [s for s, _ in listed] == stages
    if "train" in stages:
        world, dp, tp, pp, cp, sp = (int(x or 1) for x in re.search(
            r"world (\d+) = dp (\d+) x tp (\d+) x pp (\d+) x cp (\d+)(?: x sp (\d+))?", plan).groups())
        assert world == cfg["train"]["launch"]["num_workers"] == dp * tp * pp * cp * sp
        total = float(re.search(r"memory per .*total ([\d.]+) GB", plan).group(1))
        assert 0 < total
        if cfg["train"]["launch"]["gpus_per_worker"] > 0:
            assert total < 80, f"{path.name} does not fit an 80 GB GPU by its own estimate:\n{plan}"


def test_recipe_headers_name_hardware_output_and_submission():
    for name in GPU_RECIPES:
        header = "".join(line for line in (REPO / "configs" / name).read_text().splitlines(True)
                         if line.startswith("#"))
        assert re.search(r"GPU|H100|A100|L4", header), name
        assert "Produces" in header and "cluster/submit.sh" in header, name


def test_the_offload_recipe_keeps_state_off_the_gpu(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, out, err = _dry_run(capsys, REPO / "configs" / "zero_infinity_7b.yaml")
    assert rc == 0, err
    assert re.search(r"params 0\.00 GB, .*optimizer 0\.00 GB", out)
    nvme = float(re.search(r"offloaded per rank: CPU RAM [\d.]+ GB, NVMe ([\d.]+) GB", out).group(1))
    shape = P.KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"]
    workers = yaml.safe_load((REPO / "configs" / "zero_infinity_7b.yaml").read_text())["train"]["launch"]["num_workers"]
    assert nvme == pytest.approx((2 + 12) * shape.params() / workers / 1e9, abs=0.01)


def _memory(out: str) -> dict[str, float]:
    line = re.search(r"memory per GPU \(estimate\): (.*)", out).group(1)
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) GB", line)}


def test_the_7b_32k_recipe_fits_80gb_without_parameter_offload(capsys, monkeypatch):
    """ZeRO-3 over 8 GPUs, no offload: the chunked loss and activation checkpointing are what make
    32k rows fit, and the plan says so; the figures are the ones its header states."""
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / "r1_distill_7b_32k.yaml"
    rc, out, err = _dry_run(capsys, path)
    assert rc == 0, err
    mem = _memory(out)
    assert mem["total"] < 80 and mem["params"] > 0 and "offloaded per rank" not in out
    assert "world 8 = dp 8 x tp 1 x pp 1 x cp 1" in out and "ZeRO-3" in out and "32768 tokens" in out
    assert "needs train.loss_chunk=512 to fit 80 GB" in out
    assert "needs train.deepspeed.activation_checkpointing=true to fit 80 GB" in out
    header = path.read_text().split("\nrun:")[0]
    assert f"= {mem['total']:.2f} GB" in header and f"logits {mem['logits']:.2f}" in header
    for key in ("train.loss_chunk=0", "train.deepspeed.activation_checkpointing=false"):
        rc, out, err = _dry_run(capsys, path, key)
        without = _memory(out)["total"]
        assert rc == 0 and without > 80 and f"(without: {without:.2f} GB" in header, key
        assert f"does not fit 80 GB ({without:.2f} GB): it would with" in out


def test_the_1p5b_16k_recipes_keep_the_logits_under_1gb(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    for name in ("r1_distill_1p5b_vllm.yaml", "r1_distill_1p5b_api.yaml"):
        rc, out, err = _dry_run(capsys, REPO / "configs" / name)
        assert rc == 0, err
        assert _memory(out)["logits"] < 1, name
        rc, out, err = _dry_run(capsys, REPO / "configs" / name, "train.loss_chunk=0")
        assert _memory(out)["logits"] > 3 * 9.9, name  # 3 fp32 copies of 16k x 152k logits


def test_a_plan_that_does_not_fit_names_the_cheapest_settings_that_would(capsys, monkeypatch):
    """Cheapest first, each added on top of the last: the chunked loss, checkpointing, then the
    smallest Ulysses degree that divides the world, the row and the heads."""
    monkeypatch.chdir(REPO)
    rc, out, err = _dry_run(capsys, REPO / "configs" / "r1_distill_7b_32k.yaml", "train.student.model=Qwen/Qwen2.5-7B",
                            "train.seq_len=131072", "train.micro_batch=2", "train.loss_chunk=0",
                            "train.deepspeed.activation_checkpointing=false")
    assert rc == 0, err
    fix = re.search(r"does not fit 80 GB \([\d.]+ GB\): it would with (.*) \(([\d.]+) GB\)", out)
    assert fix and fix.group(1) == ("train.loss_chunk=512, train.deepspeed.activation_checkpointing=true, "
                                    "train.deepspeed.sequence_parallel=2"), out
    assert float(fix.group(2)) < 80
    rc, out, err = _dry_run(capsys, REPO / "configs" / "r1_distill_7b_32k.yaml", "train.student.model=Qwen/Qwen2.5-7B",
                            "train.seq_len=131072", "train.micro_batch=2", "train.loss_chunk=512",
                            "train.deepspeed.activation_checkpointing=true", "train.deepspeed.sequence_parallel=2")
    assert rc == 0, err
    assert "needs train.deepspeed.sequence_parallel=2 to fit 80 GB" in out


def test_a_sequence_parallel_degree_that_does_not_divide_names_the_key():
    cfg = "configs/r1_distill_7b_32k.yaml"
    world = _bad("train.deepspeed.sequence_parallel=3", config=cfg)  # 8 ranks
    assert world.returncode == 2 and "train.deepspeed.sequence_parallel=3" in world.stderr
    row = _bad("train.deepspeed.sequence_parallel=4", "train.seq_len=32766", config=cfg)
    assert row.returncode == 2 and "train.deepspeed.sequence_parallel=4" in row.stderr
    heads = _bad("train.deepspeed.sequence_parallel=8", config=cfg)  # 28 heads, 4 kv heads
    assert heads.returncode == 1 and "train.deepspeed.sequence_parallel=8: the model's 28 attention heads" \
        in heads.stderr


def test_zero_stage_lowers_the_planned_memory(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    totals = []
    for z in range(4):
        rc, out, err = _dry_run(capsys, REPO / "configs" / "r1_distill_1p5b_vllm.yaml", f"train.deepspeed.zero_stage={z}")
        assert rc == 0, err
        totals.append(float(re.search(r"memory per GPU .*total ([\d.]+) GB", out).group(1)))
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


# --------------------------------------------------------------------------- impossible plans


def _bad(*overrides: str, config: str = "configs/quickstart.yaml") -> subprocess.CompletedProcess:
    return subprocess.run(distill_cmd("run", config, *overrides, "--dry-run"), cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_an_impossible_plan_exits_1_naming_the_keys(tmp_path):
    out = _bad("train.seq_len=16384", f"run.dir={tmp_path / 'r'}",
               f"curate.decontam.benchmarks=[{{name: aime, path: {DATA}/benchmarks/nope.jsonl}}]")
    assert out.returncode == 1, out.stderr
    assert "train.seq_len=16384 exceeds the context" in out.stderr
    assert "curate.decontam.benchmarks" in out.stderr and "nope.jsonl" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()


def test_an_unknown_student_says_what_to_set():
    out = _bad("train.student.model=acme/never-heard-of-it")
    assert out.returncode == 1
    assert "unknown model 'acme/never-heard-of-it': give train.student.model as a local directory" in out.stderr


def test_megatron_degrees_that_do_not_fit_name_the_key():
    cfg = "configs/megatron_tp4_pp2.yaml"
    # Valid as a config (6 = 3 x 2), impossible for this student: only the plan, which knows the
    # model's 28 heads, can refuse it.
    heads = _bad("train.megatron.tensor_parallel=3", "train.megatron.sequence_parallel=false",
                 "train.launch.num_workers=6", config=cfg)
    assert heads.returncode == 1, heads.stderr
    assert "train.megatron.tensor_parallel=3: the model's 28 attention heads do not divide by it" in heads.stderr
    # A world that tp x pp does not divide is refused by the config itself (exit 2, like every command).
    world = _bad("train.launch.num_workers=12", config=cfg)
    assert world.returncode == 2 and "train.launch.num_workers=12" in world.stderr
