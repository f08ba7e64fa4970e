"""An OpenAI-compatible chat server on loopback that answers deterministically and misbehaves
on purpose: rate limits, 5xx, responses slower than any sane timeout, dropped connections and
malformed bodies. Tests, benchmarks and users chaos-test a pipeline against it:

    with FaultServer(faults=FaultPlan.uniform(0.2)) as server:
        engine = OpenAIEngine(OpenAIEngineConfig(base_url=server.base_url, model="m"))
        ...
        assert all(n == 1 for n in server.completions.values())

or from a shell: `python -m distill.testing.fault_server --port 8000 --fail-rate 0.2`.

Which fault (if any) the k-th request for a (prompt, seed) gets is a pure function of the plan's
seed, the prompt, the seed and k, so a run is reproducible however requests interleave.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

from aiohttp import web

from distill.loopback import LoopbackServer

FAULT_KINDS = ("429", "500", "503", "slow", "drop", "malformed")


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) fixed by `parts`."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


@dataclass(frozen=True)
class FaultPlan:
    """Probability of each fault per request (they are exclusive; the rest succeed)."""

    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_slow: float = 0.0
    rate_drop: float = 0.0
    rate_malformed: float = 0.0
    rate_no_usage: float = 0.0
    """Not a fault: a successful answer without `usage`, as some servers send."""
    slow_s: float = 30.0
    """How long a slow response stalls; set it above the client's timeout."""
    reject_marker: str | None = "TOO_LONG"
    """Prompts containing it get a 400 `context_length_exceeded`, every time."""
    seed: int = 0

    def __post_init__(self) -> None:
        rates = [getattr(self, f"rate_{k}") for k in FAULT_KINDS] + [self.rate_no_usage]
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates[:-1]) > 1.0 + 1e-9:
            raise ValueError(f"fault rates must lie in [0, 1] and sum to at most 1: {self}")

    @classmethod
    def uniform(cls, rate: float, seed: int = 0, **kwargs) -> FaultPlan:
        """`rate` spread evenly over 429, 500, 503, dropped and malformed (slow is opt-in: it
        only makes sense relative to the client's timeout)."""
        each = rate / 5
        return cls(rate_429=each, rate_500=each, rate_503=each, rate_drop=each,
                   rate_malformed=each, seed=seed, **kwargs)

    def fault(self, key: str, attempt: int) -> str | None:
        """The fault injected into the `attempt`-th request (0-based) for `key`, or None."""
        u = _unit(self.seed, "fault", key, attempt)
        for kind in FAULT_KINDS:
            u -= getattr(self, f"rate_{kind}")
            if u < 0:
                return kind
        return None


def judge_reply(problem: str) -> str:
    """The server's well-posedness verdict on a `validate` judge prompt, fixed by the problem:
    about 80% OK, 5% each CONTRADICTORY / MISSING_INFORMATION / AMBIGUOUS, 5% a reply in no
    verdict format (to exercise `judge_unparsable`)."""
    u = _unit("judge", problem, None)
    for limit, reply in ((0.80, "OK. It is well posed."), (0.85, "CONTRADICTORY: the conditions clash."),
                         (0.90, "MISSING_INFORMATION: a quantity is not given."),
                         (0.95, "AMBIGUOUS: it can be read two ways.")):
        if u < limit:
            return reply
    return "I think this problem is probably fine, maybe."


def synthesis_reply(prompt: str, seed: int | None) -> str:
    """The server's reply to a `synthesize` prompt, fixed by (prompt, seed): about 85% a new
    question in the asked `QUESTION:` / `ANSWER:` format (a word problem the validate rules keep),
    then 5% each a reply with no QUESTION: line, two QUESTION: fields, and an empty question (to
    exercise `no_question` and `unparsable`)."""
    u = _unit("synthesize", prompt, seed)
    a, b = 2 + int(_unit("a", prompt, seed) * 90), 2 + int(_unit("b", prompt, seed) * 20)
    tag = int(_unit("tag", prompt, seed) * 10**6)
    question = (f"Shop number {tag} packs {a} boxes with {b} pencils in each box. "
                "How many pencils does it pack in all?")
    if u < 0.85:
        return f"<think>The seed asks for a product.</think>QUESTION: {question}\nANSWER: {a * b}"
    if u < 0.90:
        return f"Here is a new problem about {a} boxes of pencils; I hope it helps."
    if u < 0.95:
        return f"QUESTION: {question}\nQUESTION: How many boxes are there?\nANSWER: {a}"
    return "QUESTION:\nANSWER: 0"


_TOPICS = ("arithmetic", "algebra", "geometry", "probability", "number theory", "rates")
_POINTS = ("multiplication", "fractions", "percentages", "linear equations", "area of a rectangle",
           "unit conversion", "ratios", "divisibility", "averages", "counting", "speed and time", "remainders")


def concepts_reply(prompt: str) -> str:
    """The server's reply to a concept-extraction prompt, fixed by the prompt: about 80% a JSON
    object with one or two topics and two or three knowledge points from small fixed lists (so
    seeds share concepts and the co-occurrence graph is connected), 10% text that is not JSON and
    10% JSON with no concept (to exercise `unparsable` and `no_concepts`)."""
    u = _unit("concepts", prompt, None)
    if u >= 0.90:
        return '{"topics": [], "knowledge_points": []}'
    if u >= 0.80:
        return "Topics: arithmetic; knowledge points: multiplication"
    pick = lambda names, k, tag: sorted({names[int(_unit(tag, prompt, i) * len(names))] for i in range(k)})  # noqa: E731
    return json.dumps({"topics": pick(_TOPICS, 2, "topic"), "knowledge_points": pick(_POINTS, 3, "point")})


def completion_text(prompt: str, seed: int | None) -> str:
    """The full answer to `prompt` under `seed`: a think block of varying length, then a boxed
    number, both fixed by (prompt, seed). A `validate` judge prompt gets `judge_reply`, a
    `synthesize` prompt `synthesis_reply`, a concept-extraction prompt `concepts_reply`."""
    from distill.curate.questions import JUDGE_MARKER
    from distill.curate.synthesis import EXTRACT_MARKER, SYNTH_MARKER

    if prompt.startswith(JUDGE_MARKER):
        return judge_reply(prompt.rsplit("Problem:\n", 1)[-1])
    if prompt.startswith(SYNTH_MARKER):
        return synthesis_reply(prompt, seed)
    if prompt.startswith(EXTRACT_MARKER):
        return concepts_reply(prompt)
    u = _unit("completion", prompt, seed)
    steps = 2 + int(u * 20)
    answer = int(_unit("answer", prompt, seed) * 1000)
    reasoning = " ".join(f"step {i}." for i in range(1, steps + 1))
    return f"<think>Reasoning for {prompt}: {reasoning}</think> The answer is \\boxed{{{answer}}}."


def respond(
    prompt: str, seed: int | None, max_tokens: int, stop: tuple[str, ...] = ()
) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) the server sends; tokens are whitespace words.

    A stop string cuts first (finish "stop"); if what remains is longer than `max_tokens`, it
    is cut to that many words (finish "length"), as a model that runs out of budget would be.
    """
    text, finish = completion_text(prompt, seed), "stop"
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
    words = text.split()
    if len(words) > max_tokens:
        text, words, finish = " ".join(words[:max_tokens]), words[:max_tokens], "length"
    return text, finish, len(words)


def _error(status: int, message: str, type_: str, code: str | None = None, **headers: str):
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _last_user_message(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


class FaultServer(LoopbackServer):
    """The server, run on its own thread and event loop (LoopbackServer); use it as a context
    manager.

    Counters (read them after the client is done; the server thread writes them):
    `requests` POSTs received, `faults` injected by kind, `rejections` by reason,
    `completions` successful answers fully written per (prompt, seed), `abandoned` answers
    whose client hung up first (a slow response past the client's timeout), `max_in_flight`.
    """

    thread_name = "fault-server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        latency_s: float = 0.0,
        tokens_per_s: float | None = None,
        model: str = "fault-server",
        api_key: str | None = None,
    ):
        """`latency_s` is added to every request, `tokens_per_s` (None: instant) paces answers.
        With `api_key` set, requests without that bearer token get a 401 that echoes the key
        they sent, unmasked, so a client's redaction can be tested."""
        super().__init__(host, port)
        self.plan = faults or FaultPlan()
        self.latency_s, self.tokens_per_s = latency_s, tokens_per_s
        self.model = model
        self._api_key = api_key
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.completions: Counter[tuple[str, int | None]] = Counter()
        self.abandoned = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._attempts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"FaultServer({self.base_url if self.running else 'stopped'}, {self.plan})"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        return app

    # ----------------------------------------------------------------------- handlers

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "distill"}]}
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self._api_key is not None:
            given = request.headers.get("Authorization", "")
            if given != f"Bearer {self._api_key}":
                self.rejections["unauthorized"] += 1
                return _error(401, f"Incorrect API key provided: {given.removeprefix('Bearer ')}",
                              "invalid_request_error", "invalid_api_key")
        try:
            body = await request.json()
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise TypeError("messages must be a list of objects")
            seed = body.get("seed")
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            stop = body.get("stop") or ()
            stop = (stop,) if isinstance(stop, str) else tuple(stop)
            n = int(body.get("n", 1))
        except (ValueError, KeyError, TypeError) as e:
            self.rejections["bad_request"] += 1
            return _error(400, f"invalid request body: {e}", "invalid_request_error")
        if n != 1:
            # Like llama.cpp's server; it also keeps one (prompt, seed) per request countable.
            self.rejections["bad_request"] += 1
            return _error(400, "only n=1 is supported", "invalid_request_error")
        marker = self.plan.reject_marker
        if marker and any(marker in str(m.get("content", "")) for m in messages):
            self.rejections["too_long"] += 1
            return _error(400, "This model's maximum context length is 4096 tokens. However, your "
                          "messages resulted in 9000 tokens. Please reduce the length of the "
                          "messages.", "invalid_request_error", "context_length_exceeded")

        prompt = _last_user_message(messages)
        key = f"{prompt}\0{seed}"
        fault = self.plan.fault(key, self._attempts[key])
        self._attempts[key] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault is not None:
            self.faults[fault] += 1
        if fault == "429":
            return _error(429, "Rate limit reached; please retry.", "rate_limit_error",
                          "rate_limit_exceeded", **{"Retry-After": "0"})
        if fault == "500":
            return _error(500, "The server had an error while processing your request.",
                          "server_error")
        if fault == "503":
            return _error(503, "The engine is currently overloaded.", "server_error",
                          **{"Retry-After": "0"})
        if fault == "drop":
            request.transport.close()
            # The client sees the connection close; this handler is cancelled meanwhile.
            await asyncio.sleep(3600)
        if fault == "malformed":
            variant = int(_unit(self.plan.seed, "malformed", key) * 3)
            if variant == 0:
                return web.Response(text='{"id": "chatcmpl-x", "choices": [{"mess',
                                    content_type="application/json")
            if variant == 1:
                return web.json_response({"id": "chatcmpl-x", "object": "chat.completion"})
            return web.json_response({"id": "chatcmpl-x", "object": "chat.completion",
                                      "choices": [{"index": 0, "message": {"role": "assistant"},
                                                   "finish_reason": "stop"}]})

        text, finish, n_tokens = respond(prompt, seed, max_tokens, stop)
        try:
            if fault == "slow":
                await asyncio.sleep(self.plan.slow_s)
            if self.tokens_per_s:
                await asyncio.sleep(n_tokens / self.tokens_per_s)
            payload = {
                "id": f"chatcmpl-{hashlib.sha256(key.encode()).hexdigest()[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": text}}],
            }
            if _unit(self.plan.seed, "usage", key) >= self.plan.rate_no_usage:
                n_prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
                payload["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_tokens,
                                    "total_tokens": n_prompt + n_tokens}
            response = web.json_response(payload)
            await response.prepare(request)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.abandoned += 1
            raise
        self.completions[(prompt, seed)] += 1
        return response


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m distill.testing.fault_server",
        description="OpenAI-compatible chat server with deterministic answers and injected faults.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--fail-rate", type=float, default=0.0,
                   help="share of requests failed, spread over 429, 500, 503, dropped, malformed")
    p.add_argument("--slow-rate", type=float, default=0.0,
                   help="share of requests that stall for --slow-s before answering")
    p.add_argument("--slow-s", type=float, default=FaultPlan.slow_s)
    p.add_argument("--latency-s", type=float, default=0.0, help="added to every request")
    p.add_argument("--tokens-per-s", type=float, default=None, help="pace answers (default: instant)")
    p.add_argument("--reject-marker", default=FaultPlan.reject_marker,
                   help="prompts containing it get a 400 context_length_exceeded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="fault-server")
    p.add_argument("--api-key-env", default=None,
                   help="require the bearer token held in this environment variable")
    args = p.parse_args(argv)

    plan = FaultPlan.uniform(args.fail_rate, seed=args.seed, rate_slow=args.slow_rate,
                             slow_s=args.slow_s, reject_marker=args.reject_marker or None)
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    # SIGTERM too (docker stop, supervisors), and SIGINT explicitly: a shell starts background
    # jobs with SIGINT ignored, which would leave Ctrl-C's KeyboardInterrupt unarmed.
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    with FaultServer(args.host, args.port, plan, args.latency_s, args.tokens_per_s,
                     args.model, api_key) as server:
        print(f"serving {server.base_url} (model {args.model!r}); Ctrl-C to stop", flush=True)
        stopping.wait()
        print(f"requests={server.requests} completions={sum(server.completions.values())} "
              f"faults={dict(server.faults)} rejections={dict(server.rejections)}")


if __name__ == "__main__":
    main()
