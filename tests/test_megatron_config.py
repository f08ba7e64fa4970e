"""train.megatron validation: config-only checks in TrainConfig, model checks in the launcher's
preflight (before any worker starts), each naming the key to change. Fast, no processes."""

from __future__ import annotations

import pytest


def _cfg(**train):
    from distill.train.config import TrainConfig

    return TrainConfig.model_validate({"backend": "megatron", **train})


def test_registered_and_defaults():
    from distill.train.backends import BACKENDS, backend_class
    from distill.train.config import BACKEND_NAMES

    assert "megatron" in BACKEND_NAMES and "megatron" in BACKENDS
    assert backend_class("megatron").__name__ == "MegatronBackend"
    m = _cfg().megatron
    assert (m.tensor_parallel, m.pipeline_parallel, m.context_parallel) == (1, 1, 1)


@pytest.mark.parametrize("train,needle", [
    ({"launch": {"launcher": "torchrun", "num_workers": 6}, "megatron": {"tensor_parallel": 4}},
     "train.launch.num_workers=6 is not a multiple of train.megatron.tensor_parallel"),
    ({"megatron": {"context_parallel": 2}, "launch": {"launcher": "torchrun", "num_workers": 3}},
     "train.megatron.context_parallel=2 does not divide train.launch.num_workers=3"),
    ({"megatron": {"sequence_parallel": True}}, "sequence_parallel=true needs train.megatron.tensor_parallel > 1"),
    ({"seq_len": 99, "megatron": {"sequence_parallel": True, "tensor_parallel": 2},
      "launch": {"launcher": "torchrun", "num_workers": 2}}, "must divide by tensor_parallel=2"),
    ({"grad_accum": 2, "megatron": {"tensor_parallel": 2, "global_batch": 8},
      "launch": {"launcher": "torchrun", "num_workers": 4}}, "train.megatron.global_batch=8 but data-parallel degree 2"),
    ({"megatron": {"pipeline_parallel": 2}}, "train.launch.launcher=local runs one process"),
])
def test_config_problems_name_the_key(train, needle):
    if "launch" not in train:
        train = {**train, "launch": {"launcher": "local"}}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("+", r"\+").replace(".", r"\.")):
        _cfg(**train)


def test_global_batch_that_matches_is_accepted():
    cfg = _cfg(grad_accum=2, micro_batch=2, megatron={"tensor_parallel": 2, "global_batch": 8},
               launch={"launcher": "torchrun", "num_workers": 4})
    assert cfg.megatron.global_batch == 8


def test_preflight_checks_heads_and_layers_against_the_model():
    from distill.teachers.models import resolve_model
    from distill.train.launch import student_problems
    from distill.train.model import tiny_student

    model = tiny_student(resolve_model("smollm2-135m-instruct"), num_hidden_layers=3)  # 4 heads, 2 kv heads
    ok = _cfg(megatron={"tensor_parallel": 2, "pipeline_parallel": 3}, launch={"launcher": "torchrun", "num_workers": 6})
    assert student_problems(ok, model.config) == []
    bad = _cfg(megatron={"tensor_parallel": 4, "pipeline_parallel": 2}, launch={"launcher": "torchrun", "num_workers": 8})
    problems = student_problems(bad, model.config)
    assert any("train.megatron.tensor_parallel=4" in p and "key/value heads" in p for p in problems)
    assert any("train.megatron.pipeline_parallel=2" in p and "3 layers" in p for p in problems)


def test_optimizer_owners_balance_and_agree():
    from distill.train.backends.megatron.optimizer import assign_owners

    sizes = [100, 10, 60, 50, 5, 5]
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert load == [115, 115]  # 100+10+5 | 60+50+5
    assert assign_owners(sizes, 1) == [0] * 6
