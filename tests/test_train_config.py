"""TrainConfig validation, the DeepSpeed config it becomes, the LR schedule and the backend
registry: pure, no DeepSpeed process."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distill.train.backends import BACKENDS, backend_class, lr_factor
from distill.train.backends.deepspeed import deepspeed_config
from distill.train.config import BACKEND_NAMES, TrainConfig, resolve_precision
from distill.train.shape import ModelShape, shape_problems


def _errors(tree: dict) -> str:
    with pytest.raises(ValidationError) as e:
        TrainConfig.model_validate(tree)
    return str(e.value)


def test_defaults_validate_and_every_field_has_help():
    cfg = TrainConfig()
    assert cfg.backend == "deepspeed" and cfg.deepspeed.zero_stage == 2

    def walk(cls):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(TrainConfig)


@pytest.mark.parametrize("tree, expected", [
    ({"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}},
     "train.deepspeed.offload_param=cpu needs train.deepspeed.zero_stage=3"),
    ({"deepspeed": {"zero_stage": 3, "offload_param": "nvme"}},
     "train.deepspeed.offload_param=nvme needs train.deepspeed.nvme_path"),
    ({"deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu"}},
     "train.deepspeed.offload_optimizer=cpu needs train.deepspeed.zero_stage >= 1"),
    ({"backend": "colossal"}, "train.backend='colossal': unknown"),
    ({"launch": {"launcher": "local", "num_workers": 2}}, "train.launch.launcher=local runs one process"),
    ({"deepspeed": {"precision": "bf16"}, "student": {"dtype": "float32"}}, "contradicts"),
    ({"max_steps": 5, "schedule": {"warmup_steps": 10}}, "train.schedule.warmup_steps=10 exceeds train.max_steps=5"),
    ({"optimizer": {"betas": [0.9, 1.5]}}, "train.optimizer.betas[1]=1.5"),
])
def test_cross_field_errors_name_the_keys(tree, expected):
    assert expected in _errors(tree)


def test_all_problems_reported_at_once():
    msg = _errors({"deepspeed": {"zero_stage": 1, "offload_param": "nvme", "offload_optimizer": "nvme"}})
    assert "offload_param=nvme needs train.deepspeed.zero_stage=3" in msg
    assert "offload_optimizer=nvme needs train.deepspeed.nvme_path" in msg


def _shape(**kw) -> ModelShape:
    return ModelShape(**{**dict(n_layers=6, hidden=64, n_heads=6, n_kv_heads=2, intermediate=128, vocab=100,
                                max_positions=2048, tied_embeddings=True), **kw})


def test_seq_len_beyond_model_context_names_both():
    cfg = TrainConfig(seq_len=8192, student={"model": "smollm2-135m-instruct"})
    (problem,) = shape_problems(cfg, _shape())
    assert "train.seq_len=8192" in problem and "max_position_embeddings=2048" in problem
    assert "smollm2-135m-instruct" in problem
    assert shape_problems(TrainConfig(seq_len=2048), _shape()) == []


def test_shape_problems_cover_the_window_and_the_megatron_split():
    (window,) = shape_problems(TrainConfig(seq_len=2048), _shape(sliding_window=1024))
    assert "sliding window" in window and "1024" in window
    assert shape_problems(TrainConfig(seq_len=1024), _shape(sliding_window=1024)) == []
    megatron = TrainConfig(seq_len=512, backend="megatron",
                           megatron={"tensor_parallel": 4, "pipeline_parallel": 4},
                           launch={"num_workers": 16, "launcher": "torchrun"})
    problems = shape_problems(megatron, _shape())
    assert any("tensor_parallel=4" in p and "6 attention heads" in p for p in problems)
    assert any("pipeline_parallel=4" in p and "6 layers" in p for p in problems)
    # The deepspeed backend does not split the model: the same shape has no problem there.
    assert shape_problems(TrainConfig(seq_len=512), _shape()) == []


def test_precision_auto_is_bf16_on_gpu_fp32_on_cpu():
    assert resolve_precision(TrainConfig(), has_gpu=True) == "bf16"
    assert resolve_precision(TrainConfig(), has_gpu=False) == "fp32"
    assert resolve_precision(TrainConfig(deepspeed={"precision": "fp32"}), has_gpu=True) == "fp32"
    assert resolve_precision(TrainConfig(student={"dtype": "bfloat16"}), has_gpu=False) == "bf16"


def test_deepspeed_config_offload_and_optimizer_choice():
    cfg = TrainConfig(micro_batch=2, grad_accum=3, grad_clip=0.5,
                      deepspeed={"zero_stage": 3, "offload_param": "nvme", "offload_optimizer": "cpu",
                                 "nvme_path": "/nvme"})
    ds = deepspeed_config(cfg, world_size=4, precision="bf16")
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["offload_param"] == {"device": "nvme", "nvme_path": "/nvme", "pin_memory": True}
    assert zero["offload_optimizer"]["device"] == "cpu"
    # With optimizer offload DeepSpeed must choose DeepSpeedCPUAdam, so torch_adam is not forced.
    assert "torch_adam" not in ds["optimizer"]["params"]
    plain = deepspeed_config(TrainConfig(grad_clip=None), world_size=1, precision="fp32")
    assert plain["optimizer"]["params"]["torch_adam"] is True
    assert "bf16" not in plain and "gradient_clipping" not in plain
    assert "offload_optimizer" not in plain["zero_optimization"]


def test_lr_schedule_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone decay after warmup
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 8 / 15)))
    assert lr_factor(0, warmup=0, total=1, min_ratio=0.0) == 1.0


def test_every_configurable_backend_is_registered():
    assert set(BACKEND_NAMES) <= set(BACKENDS)
    for name in BACKEND_NAMES:
        assert callable(backend_class(name))
