"""The OpenAI-compatible engine against a real loopback server (distill.testing.fault_server):
clean runs, injected faults, per-prompt rejection, exhausted retries, and API-key hygiene."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from distill.config import OpenAIEngineConfig
from distill.teachers import ENGINES, Request, SamplingParams, TeacherEngine, build_engine
from distill.teachers.openai import (
    MalformedResponse,
    OpenAIEngine,
    OpenAIEngineError,
    backoff_s,
    chat_body,
    error_message,
    parse_chat_completion,
    retry_after_s,
)
from distill.testing.fault_server import FaultPlan, FaultServer, respond

pytestmark = pytest.mark.timeout(60)

SECRET = "sk-test-0123456789abcdef-do-not-log"


def config(server: FaultServer, **overrides) -> OpenAIEngineConfig:
    fields = dict(base_url=server.base_url, model="teacher", api_key_env=None, concurrency=16,
                  timeout_s=1.0, max_retries=10, backoff_base_s=0.005, backoff_max_s=0.05)
    return OpenAIEngineConfig(**(fields | overrides))


def prompts(n: int, base_seed: int = 1000) -> list[Request]:
    return [Request(messages=[{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": f"question {i}: what is {i} + {i}?"}],
                    n=2, seed=base_seed + 10 * i) for i in range(n)]


def check_answers(requests: list[Request], results, params: SamplingParams) -> None:
    """Every result holds, in order, exactly the completions the server's rule gives."""
    assert len(results) == len(requests)
    for req, res in zip(requests, results):
        assert res.ok and len(res.completions) == req.n
        prompt = req.messages[-1]["content"]
        for j, c in enumerate(res.completions):
            text, finish, n_tokens = respond(prompt, req.seed + j, params.max_new_tokens, params.stop)
            assert (c.text, c.finish_reason, c.completion_tokens) == (text, finish, n_tokens)
            assert c.prompt_tokens == len("Be brief.".split()) + len(prompt.split())


def wait_for(predicate, timeout_s: float = 2.0) -> bool:
    """The server counts a client hang-up when its loop gets to it, a moment after the client."""
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


# --------------------------------------------------------------------------- pure helpers


def test_chat_body_is_one_sample_and_omits_unset_fields():
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=77, stop=("###",))
    body = chat_body("m", [{"role": "user", "content": "hi"}], params, seed=5)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 0.6, "top_p": 0.95, "max_tokens": 77, "n": 1, "seed": 5,
                    "stop": ["###"]}
    bare = chat_body("m", [], SamplingParams(), seed=None)
    extra = chat_body("m", [], params, seed=1, extra={"top_k": 20, "seed": 99, "chat_template_kwargs": {"x": 1}})
    assert extra["top_k"] == 20 and extra["seed"] == 1 and extra["chat_template_kwargs"] == {"x": 1}
    assert "seed" not in bare and "stop" not in bare


def test_parse_chat_completion():
    ok = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "eos"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    c, had_usage = parse_chat_completion(ok)
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens, had_usage) == (
        "hi", "stop", 3, 1, True)
    for raw_reason, reason in [("length", "length"), ("stop_sequence", "stop"), (None, "stop")]:
        body = json.dumps({"choices": [{"message": {"content": ""}, "finish_reason": raw_reason}]})
        c, had_usage = parse_chat_completion(body)
        assert c.finish_reason == reason and not had_usage and c.completion_tokens == 0

    # A server with a reasoning parser splits the think block out; it is put back.
    split = json.dumps({"choices": [{"message": {"content": "42", "reasoning_content": "r"}}]})
    assert parse_chat_completion(split)[0].text == "<think>r</think>42"
    cut = json.dumps({"choices": [{"message": {"content": None, "reasoning": "r"},
                                   "finish_reason": "length"}]})
    assert parse_chat_completion(cut)[0].text == "<think>r</think>"

    for bad in [b"not json", b"[]", b"{}", b'{"choices": []}', b'{"choices": [{}]}',
                b'{"choices": [{"message": {"role": "assistant"}}]}', b"\xff\xfe",
                b'{"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": "?"}}']:
        with pytest.raises(MalformedResponse):
            parse_chat_completion(bad)


def test_backoff_is_full_jitter_capped_and_honours_retry_after():
    ceiling = lambda lo, hi: hi  # noqa: E731  (the top of the jitter range)
    assert [backoff_s(a, 0.5, 3.0, uniform=ceiling) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_s(10_000, 0.5, 3.0, uniform=ceiling) == 3.0
    waits = [backoff_s(3, 1.0, 60.0) for _ in range(200)]
    assert all(0.0 <= w <= 8.0 for w in waits) and min(waits) < 2.0 < max(waits)
    assert backoff_s(0, 1.0, 60.0, retry_after=0.0) == 0.0
    assert backoff_s(0, 1.0, 60.0, retry_after=7.0) == 7.0
    assert backoff_s(0, 1.0, 60.0, retry_after=3600.0) == 60.0


def test_retry_after_and_error_message_parsing():
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("0") == 0.0 and retry_after_s(" 2.5 ") == 2.5
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412500.0) == 0.0

    assert error_message(b'{"error": {"message": "too\\n long", "code": 400}}') == "too long"
    assert error_message('{"object": "error", "message": "vllm says"}') == "vllm says"
    assert error_message('{"detail": "fastapi says"}') == "fastapi says"
    assert error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert len(error_message("x" * 1000)) == 200


def test_fault_plan_is_deterministic_and_validated():
    plan = FaultPlan.uniform(0.5, seed=3, rate_slow=0.1)
    draws = [plan.fault(f"p{i}", k) for i in range(400) for k in range(3)]
    assert draws == [FaultPlan.uniform(0.5, seed=3, rate_slow=0.1).fault(f"p{i}", k)
                     for i in range(400) for k in range(3)]
    assert 0.5 < sum(d is not None for d in draws) / len(draws) < 0.7
    assert {d for d in draws if d} == {"429", "500", "503", "slow", "drop", "malformed"}
    with pytest.raises(ValueError):
        FaultPlan(rate_500=0.6, rate_429=0.6)


def test_server_rule_truncates_and_stops():
    full, finish, n = respond("q", 1, max_tokens=10_000)
    assert finish == "stop" and n == len(full.split()) and "\\boxed{" in full
    text, finish, n = respond("q", 1, max_tokens=3)
    assert (finish, n, text) == ("length", 3, " ".join(full.split()[:3]))
    text, finish, _ = respond("q", 1, max_tokens=10_000, stop=("</think>",))
    assert finish == "stop" and text == full[: full.index("</think>")]
    assert respond("q", 2, 10_000)[0] != full  # the seed matters


# --------------------------------------------------------------------------- against the server


def test_registered_and_built_by_name():
    assert ENGINES["openai"] == "distill.teachers.openai:OpenAIEngine"
    engine = build_engine("openai", OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    try:
        assert isinstance(engine, OpenAIEngine) and isinstance(engine, TeacherEngine)
        assert engine.generate([], SamplingParams()) == []
    finally:
        engine.close()
        engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="after close"):
        engine.generate(prompts(1), SamplingParams())


def test_clean_run_in_order_with_seeds_and_tokens():
    requests = prompts(40)
    params = SamplingParams(temperature=0.7, max_new_tokens=64)
    with FaultServer(latency_s=0.01) as server, OpenAIEngine(config(server, concurrency=8)) as engine:
        results = engine.generate(requests, params)
        stats = engine.stats()
    check_answers(requests, results, params)
    assert set(server.completions) == {
        (r.messages[-1]["content"], r.seed + j) for r in requests for j in range(2)}
    assert set(server.completions.values()) == {1}
    assert 1 < server.max_in_flight <= 8
    assert stats["requests"] == 40 and stats["samples"] == stats["http_requests"] == 80
    assert stats["rejected"] == stats["missing_usage"] == 0
    assert all(v == 0 for k, v in stats.items() if k.startswith("retries_"))
    assert stats["completion_tokens"] == sum(c.completion_tokens for r in results for c in r.completions)
    assert stats["prompt_tokens"] > 0


def test_length_stop_unseeded_and_missing_usage():
    plan = FaultPlan(rate_no_usage=1.0)
    with FaultServer(faults=plan) as server, OpenAIEngine(config(server)) as engine:
        short = SamplingParams(max_new_tokens=4, stop=("never",))
        [res] = engine.generate([Request([{"role": "user", "content": "q"}], n=1, seed=7)], short)
        [unseeded] = engine.generate([Request([{"role": "user", "content": "q"}], n=3)],
                                     SamplingParams(max_new_tokens=1000, stop=("</think>",)))
        stats = engine.stats()
    assert res.completions[0].finish_reason == "length"
    assert res.completions[0].text == respond("q", 7, 4)[0]
    assert res.completions[0].completion_tokens == 0  # no usage sent: counted as 0 ...
    assert stats["missing_usage"] == 4  # ... and noticed
    assert [c.text for c in unseeded.completions] == [respond("q", None, 1000, ("</think>",))[0]] * 3
    assert server.completions[("q", None)] == 3


def test_every_sample_completes_exactly_once_under_faults():
    plan = FaultPlan(rate_429=0.07, rate_500=0.06, rate_503=0.06, rate_slow=0.05, rate_drop=0.07,
                     rate_malformed=0.07, slow_s=10.0, seed=1)
    requests = prompts(40)
    params = SamplingParams(max_new_tokens=48)
    # timeout_s far above a normal answer's latency, so that only the slow faults time out.
    with FaultServer(faults=plan) as server, OpenAIEngine(config(server, timeout_s=2.0)) as engine:
        t0 = time.monotonic()
        results = engine.generate(requests, params)
        elapsed = time.monotonic() - t0
        stats = engine.stats()
        assert wait_for(lambda: server.abandoned == server.faults["slow"])

    check_answers(requests, results, params)
    # Exactly once: the server wrote one successful answer per (prompt, seed), and that is the
    # one the client returned (check_answers). Slow answers were abandoned by the client (its
    # timeout) before the server wrote them, so they are not deliveries.
    expected = {(r.messages[-1]["content"], r.seed + j) for r in requests for j in range(2)}
    assert set(server.completions) == expected and set(server.completions.values()) == {1}
    faults = server.faults
    assert all(faults[k] > 0 for k in ("429", "500", "503", "slow", "drop", "malformed")), faults
    # Every injected fault cost exactly one retry of the right cause.
    assert stats["retries_429"] == faults["429"]
    assert stats["retries_5xx"] == faults["500"] + faults["503"]
    assert stats["retries_timeout"] == faults["slow"]
    assert stats["retries_connection"] == faults["drop"]
    assert stats["retries_malformed"] == faults["malformed"]
    assert stats["http_requests"] == server.requests == 80 + sum(faults.values())
    assert elapsed < 15


def test_too_long_prompt_is_rejected_alone():
    requests = prompts(6)
    requests[3] = Request([{"role": "user", "content": "TOO_LONG " * 50}], n=2, seed=1)
    params = SamplingParams(max_new_tokens=32)
    plan = FaultPlan.uniform(0.2, seed=5)
    with FaultServer(faults=plan) as server, OpenAIEngine(config(server)) as engine:
        results = engine.generate(requests, params)
        stats = engine.stats()
    assert not results[3].ok and results[3].completions == []
    assert results[3].rejected.startswith("http_400: This model's maximum context length")
    check_answers(requests[:3] + requests[4:], results[:3] + results[4:], params)
    assert stats["rejected"] == 1 and server.rejections["too_long"] == 2


def test_exhausted_retries_raise():
    with FaultServer(faults=FaultPlan(rate_500=1.0)) as server:
        with OpenAIEngine(config(server, max_retries=2)) as engine:
            with pytest.raises(OpenAIEngineError, match=r"after max_retries=2 retries, last: 5xx: http_500"):
                engine.generate([Request([{"role": "user", "content": "q"}], seed=1)],
                                SamplingParams())
            assert engine.stats()["retries_5xx"] == 2
        assert server.requests == 3 and not server.completions


def test_dropping_an_unclosed_engine_stops_its_thread():
    def loop_threads() -> int:
        return sum(t.name == "openai-engine" for t in threading.enumerate())

    before = loop_threads()
    with FaultServer() as server:
        engine = OpenAIEngine(config(server))
        engine.generate(prompts(1), SamplingParams(max_new_tokens=8))
        assert loop_threads() == before + 1
        del engine
        gc.collect()
    assert loop_threads() == before


def test_works_from_a_running_event_loop_and_other_threads():
    params = SamplingParams(max_new_tokens=16)
    with FaultServer() as server, OpenAIEngine(config(server)) as engine:
        async def inside_a_loop():
            return engine.generate(prompts(3), params)

        check_answers(prompts(3), asyncio.run(inside_a_loop()), params)
        with ThreadPoolExecutor(4) as pool:  # as Ray's threaded actors call it
            batches = list(pool.map(lambda k: engine.generate(prompts(5, k), params), range(4)))
        for k, results in enumerate(batches):
            check_answers(prompts(5, k), results, params)


def test_api_key_is_sent_and_never_leaks(monkeypatch, caplog):
    caplog.set_level("DEBUG")
    monkeypatch.setenv("DISTILL_TEST_OPENAI_KEY", SECRET)
    params = SamplingParams(max_new_tokens=16)
    leaks: list[str] = []

    # The right key: accepted, through retries that log.
    with FaultServer(api_key=SECRET, faults=FaultPlan.uniform(0.5, seed=2)) as server:
        cfg = config(server, api_key_env="DISTILL_TEST_OPENAI_KEY")
        with OpenAIEngine(cfg) as engine:
            check_answers(prompts(5), engine.generate(prompts(5), params), params)
            leaks += [repr(engine), str(vars(engine).get("cfg")), json.dumps(engine.stats())]
        assert not server.rejections and sum(server.faults.values()) > 0

    # A wrong key, echoed back unmasked by the server: rejected, reason redacted.
    with FaultServer(api_key="sk-the-right-one") as server:
        cfg = config(server, api_key_env="DISTILL_TEST_OPENAI_KEY")
        with OpenAIEngine(cfg) as engine:
            [res] = engine.generate(prompts(1), params)
        assert server.rejections["unauthorized"] == 2
        assert res.rejected == "http_401: Incorrect API key provided: ***"
        leaks.append(res.rejected)

    # Retries run out: the exception and its traceback.
    with FaultServer(faults=FaultPlan(rate_503=1.0)) as server:
        cfg = config(server, api_key_env="DISTILL_TEST_OPENAI_KEY", max_retries=1)
        with OpenAIEngine(cfg) as engine, pytest.raises(OpenAIEngineError) as err:
            engine.generate(prompts(1), params)
        leaks += [str(err.value), "".join(traceback.format_exception(err.value))]

    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying" in m for m in messages)
    assert any("http_401 (Incorrect API key provided: ***)" in m for m in messages)
    leaks.append(caplog.text)
    assert all(SECRET not in text for text in leaks)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_fault_server_command_line(sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill.testing.fault_server", "--port", "0", "--fail-rate", "0.2",
         "--model", "chaos"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        base_url = line.split()[1]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with urllib.request.urlopen(base_url + "/models", timeout=5) as resp:
            assert json.load(resp)["data"][0]["id"] == "chaos"
    finally:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "requests=0" in out
