"""Protocol test against a real OpenAI-compatible server: llama.cpp's, serving the packaged
SmolLM2 GGUF on CPU. Needs `pip install "llama-cpp-python[server]"` (builds llama.cpp from
source, ~9 minutes here; .ci/run installs it). Skipped when it is not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port
from distill.config import OpenAIEngineConfig
from distill.teachers.base import Request, SamplingParams
from distill.teachers.models import packaged_gguf_path
from distill.teachers.openai import OpenAIEngine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python[server] not installed"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    # A file, not a pipe: llama.cpp logs a lot at start-up and blocks once a pipe buffer fills.
    log = open(tmp_path_factory.mktemp("llamacpp") / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(packaged_gguf_path("smollm2-135m-instruct")),
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "2",
         "--model_alias", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{base}/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail(f"llama.cpp server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_engine_speaks_the_protocol_of_a_real_server(server):
    cfg = OpenAIEngineConfig(base_url=server, model="smollm2", api_key_env=None, concurrency=2, timeout_s=120,
                             max_retries=2, backoff_base_s=0.1)
    msgs = [{"role": "user", "content": "What is 7 + 5? Answer with a number."}]
    too_long = [{"role": "user", "content": "word " * 3000}]
    with OpenAIEngine(cfg) as engine:
        params = SamplingParams(temperature=0.8, max_new_tokens=24, seed=0)
        a, b, long_ = engine.generate([Request(msgs, n=2, seed=11), Request(msgs, n=1, seed=11), Request(too_long)], params)
        short = engine.generate([Request(msgs, seed=3)], SamplingParams(temperature=0.8, max_new_tokens=2))[0]
        greedy = engine.generate([Request(msgs), Request(msgs)], SamplingParams(temperature=0.0, max_new_tokens=12))
    assert a.ok and len(a.completions) == 2 and b.ok
    for c in a.completions + b.completions:
        assert c.text and c.prompt_tokens > 5 and 0 < c.completion_tokens <= 24
        assert c.finish_reason in ("stop", "length")
    # llama.cpp's server does not reproduce seeded samples across concurrent requests, so
    # determinism is checked greedily.
    assert greedy[0].completions[0].text == greedy[1].completions[0].text
    assert short.completions[0].finish_reason == "length" and short.completions[0].completion_tokens == 2
    assert not long_.ok and long_.rejected.startswith("http_400"), long_
