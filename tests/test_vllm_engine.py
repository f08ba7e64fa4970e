"""The vLLM engine on the packaged SmolLM2-135M (converted locally, no Hub access needed).

Needs CUDA and vLLM: the `gpu` marker skips it without CUDA; with CUDA but no vLLM it skips
with the install command (a failure under CI=true). Run on a GPU machine with
`pytest -m gpu tests/test_vllm_engine.py`.
"""

from __future__ import annotations

import importlib.util

import pytest

from distill.config import VLLMEngineConfig
from distill.teachers.base import Request, SamplingParams
from distill.teachers.models import resolve_model

pytestmark = pytest.mark.gpu


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # Here, not a skipif mark: without CUDA the gpu marker's "needs CUDA" skip comes first.
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm: pip install 'distill[vllm]'")
    from distill.teachers.vllm import VLLMEngine

    model_dir = resolve_model("smollm2-135m-instruct", tmp_path_factory.mktemp("models"))
    # A small context and memory share: the test model is tiny, and the GPU may be shared.
    eng = VLLMEngine(VLLMEngineConfig(model=model_dir, max_model_len=256, gpu_memory_utilization=0.3))
    yield eng
    eng.close()


def test_greedy_is_deterministic_and_sensible(engine):
    requests = [Request(chat("What is 2+3?")), Request(chat("What is the capital of France?"))]
    params = SamplingParams(temperature=0.0, max_new_tokens=32)
    first, second = engine.generate(requests, params), engine.generate(requests, params)
    assert [r.completions for r in first] == [r.completions for r in second]
    assert "5" in first[0].completions[0].text
    assert "Paris" in first[1].completions[0].text
    for r in first:
        (c,) = r.completions
        assert c.finish_reason == "stop" and 0 < c.completion_tokens <= 32 and c.prompt_tokens > 20


def test_finish_reasons_and_token_counts(engine):
    (long,) = engine.generate([Request(chat("Write a long poem about the sea."))],
                              SamplingParams(temperature=0.0, max_new_tokens=5))
    assert (long.completions[0].finish_reason, long.completions[0].completion_tokens) == ("length", 5)
    (stopped,) = engine.generate([Request(chat("What is 2+3?"))],
                                 SamplingParams(temperature=0.0, max_new_tokens=32, stop=("=",)))
    c = stopped.completions[0]
    assert c.finish_reason == "stop" and "=" not in c.text


def test_sampling_n_and_seed(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    (a,) = engine.generate([Request(chat("Tell me a fun fact."), n=3, seed=11)], params)
    (b,) = engine.generate([Request(chat("Tell me a fun fact."), n=3, seed=11)], params)
    assert len(a.completions) == 3
    assert a.completions == b.completions  # vLLM seeds per request


def test_too_long_prompt_is_rejected_before_vllm(engine):
    huge = "word " * 400  # > 256 - max_new_tokens tokens
    rejected_before = engine.stats()["rejected"]  # the engine is shared by the module's tests
    results = engine.generate([Request(chat("What is 2+3?")), Request(chat(huge))],
                              SamplingParams(temperature=0.0, max_new_tokens=16))
    assert results[0].ok and len(results[0].completions) == 1
    assert results[1].rejected.startswith("prompt_too_long: ") and results[1].rejected.endswith("> limit 240")
    assert engine.stats()["rejected"] == rejected_before + 1
