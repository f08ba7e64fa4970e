"""Teacher engine for any OpenAI-compatible chat server: vLLM, SGLang, llama.cpp's server,
hosted APIs.

Every sample is its own HTTP request (n=1): llama.cpp's server has no n>1, and one request per
sample gives each sample its own seed and token counts. Requests run on a private event loop
thread, so `generate` is a plain blocking call that works the same from a script, a Ray actor
thread, or code that already runs an event loop.

Failures are sorted three ways. Transient ones (429, 5xx, timeouts, dropped connections,
malformed bodies) are retried with full-jitter exponential backoff. A 4xx that is about the
prompt (400, 413, 422, also 401/403/404) rejects that one request with the server's reason and
leaves the batch alone. A request that is still failing after `max_retries` raises
`OpenAIEngineError`: the stage then retries the whole shard, so nothing is silently dropped.

The API key is sent as a bearer header only; it is scrubbed from every server message the
engine repeats (rejection reasons, logs, exceptions).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Callable

import aiohttp

from distill.teachers.base import Completion, Message, Request, Result, SamplingParams

if TYPE_CHECKING:
    from distill.config import OpenAIEngineConfig

log = logging.getLogger(__name__)

REJECT_STATUSES = frozenset({400, 401, 403, 404, 413, 422})
"""Statuses that say this request will never succeed as sent: it is rejected, not retried."""

RETRY_CAUSES = ("429", "5xx", "timeout", "connection", "malformed")

_WARN_EVERY_S = 10.0
_MAX_MESSAGE_CHARS = 200


class OpenAIEngineError(RuntimeError):
    """A request kept failing after every retry; the shard it belongs to must be redone."""


class MalformedResponse(ValueError):
    """A 2xx body that is not a chat completion (not JSON, no choices, no content)."""


class _Transient(Exception):
    def __init__(self, cause: str, detail: str, retry_after_s: float | None = None):
        super().__init__(detail)
        self.cause, self.detail, self.retry_after_s = cause, detail, retry_after_s


# --------------------------------------------------------------------------- pure helpers


def chat_body(model: str, messages: list[Message], params: SamplingParams, seed: int | None,
              extra: dict | None = None) -> dict:
    """The JSON body of one single-sample chat completion request. `extra` (server-specific
    fields such as top_k or chat_template_kwargs) is merged first so it cannot override the
    fields the stage controls."""
    body = {**(extra or {}),
        "model": model,
        "messages": messages,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_new_tokens,
        "n": 1,
    }
    if seed is not None:
        body["seed"] = seed
    if params.stop:
        body["stop"] = list(params.stop)
    return body


def finish_reason(raw: object) -> str:
    """"length" stays "length"; everything else ("stop", "eos", "stop_sequence", None) is a
    normal end and becomes "stop"."""
    return "length" if raw == "length" else "stop"


def parse_chat_completion(raw: bytes | str) -> tuple[Completion, bool]:
    """(completion, had_usage) from a chat completion body; `MalformedResponse` otherwise.

    Servers that split reasoning out (vLLM/SGLang reasoning parsers, DeepSeek) put it in
    `reasoning_content` or `reasoning`; it is put back as a `<think>` block so that
    `split_reasoning` sees the same text whichever way the server was started.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedResponse(f"body is not JSON ({e})") from None
    if not isinstance(body, dict):
        raise MalformedResponse(f"body is a JSON {type(body).__name__}, not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse("body has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise MalformedResponse("choices[0] has no message")
    content = message.get("content")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if not isinstance(content, str) and not (isinstance(reasoning, str) and content is None):
        raise MalformedResponse("choices[0].message has no content")
    text = content or ""
    if isinstance(reasoning, str) and reasoning:
        text = f"<think>{reasoning}</think>{text}"
    usage = body.get("usage")
    had_usage = isinstance(usage, dict)
    usage = usage if had_usage else {}
    try:
        tokens = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        raise MalformedResponse(f"usage is not a pair of token counts: {usage}") from None
    finish = finish_reason(choices[0].get("finish_reason"))
    return Completion(text, finish, *tokens), had_usage


def retry_after_s(header: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not header:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_s(
    attempt: int,
    base_s: float,
    max_s: float,
    retry_after: float | None = None,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Wait before retry number `attempt` (0-based): the server's Retry-After when it sent one,
    else full jitter, uniform(0, min(max_s, base_s * 2**attempt)); never above `max_s`.

    Full jitter spreads the retries of many requests that failed together (a 503 burst), so
    they do not come back as one burst.
    """
    if retry_after is not None:
        return min(retry_after, max_s)
    return uniform(0.0, min(max_s, base_s * 2.0 ** min(attempt, 62)))


def error_message(raw: bytes | str, limit: int = _MAX_MESSAGE_CHARS) -> str:
    """The short human message out of an error body (OpenAI `{"error": {"message"}}`, vLLM and
    FastAPI `message`/`detail`, or plain text), on one line."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif body.get("message"):
            text = str(body["message"])
        elif body.get("detail"):
            text = str(body["detail"])
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


# --------------------------------------------------------------------------- the engine


class _Runtime:
    """The private event loop on a daemon thread, and the HTTP session that lives on it.

    Apart from the engine so that a finalizer can close it without keeping the engine alive:
    an engine dropped without close() (a Ray actor torn down at shutdown) still closes its
    connections, instead of leaving "Unclosed client session" warnings behind.
    """

    def __init__(self, concurrency: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-engine",
                                       daemon=True)
        self.thread.start()
        self.slots, self.session = self.run(self._open(concurrency))

    @staticmethod
    async def _open(concurrency: int) -> tuple[asyncio.Semaphore, aiohttp.ClientSession]:
        # No pool limit: the semaphore bounds connections, and a request waiting for a pooled
        # connection would spend its timeout_s waiting.
        return asyncio.Semaphore(concurrency), aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0))

    def run(self, coro):
        """Run `coro` on the loop and wait for it, from any thread that is not the loop's."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the requests still in flight
            raise

    def close(self) -> None:
        self.run(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class OpenAIEngine:
    """`TeacherEngine` over POST {base_url}/chat/completions."""

    def __init__(self, cfg: OpenAIEngineConfig):
        if not cfg.base_url:
            raise ValueError("generate.openai.base_url is required, e.g. http://127.0.0.1:8000/v1")
        self.cfg = cfg
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._api_key = (os.environ.get(cfg.api_key_env) or None) if cfg.api_key_env else None
        self._headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        # Every key exists from the start: stats() copies the dict from another thread while
        # the loop thread increments it, which is safe only if no key is ever added.
        self._stats: Counter[str] = Counter(
            {k: 0 for k in ("requests", "samples", "http_requests", "prompt_tokens",
                            "completion_tokens", "rejected", "missing_usage")}
            | {f"retries_{c}": 0 for c in RETRY_CAUSES}
        )
        self._rng = random.Random()
        self._unlogged: Counter[str] = Counter()
        self._last_warning = -float("inf")
        self._warned_setup = False
        self._lock = threading.Lock()
        self._runtime: _Runtime | None = None
        self._finalizer: weakref.finalize | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    # ----------------------------------------------------------------------- protocol

    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        if not requests:
            return []
        return self._ensure_runtime().run(self._generate(requests, params))

    def stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._stats.copy().items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            finalizer = self._finalizer
        if finalizer is not None:
            finalizer()  # closes the runtime at most once, whoever calls first

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- internals

    def _ensure_runtime(self) -> _Runtime:
        with self._lock:
            if self._closed:
                raise RuntimeError("OpenAIEngine.generate called after close()")
            if self._runtime is None:
                self._runtime = _Runtime(self.cfg.concurrency)
                self._finalizer = weakref.finalize(self, self._runtime.close)
            return self._runtime

    async def _generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
        tasks = [asyncio.ensure_future(self._request(r, params)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # One request out of retries fails the call; the rest are abandoned, not leaked.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _request(self, request: Request, params: SamplingParams) -> Result:
        self._stats["requests"] += 1
        seeds = [None if request.seed is None else request.seed + i for i in range(request.n)]
        outcomes = await asyncio.gather(*(self._sample(request.messages, params, s) for s in seeds))
        reasons = [o for o in outcomes if isinstance(o, str)]
        if reasons:
            self._stats["rejected"] += 1
            return Result(rejected=reasons[0])
        return Result(completions=list(outcomes))

    async def _sample(self, messages: list[Message], params: SamplingParams, seed: int | None):
        """A `Completion`, or the rejection reason (str); raises once retries run out."""
        self._stats["samples"] += 1
        body = chat_body(self.cfg.model, messages, params, seed, self.cfg.extra_body)
        for attempt in itertools.count():
            try:
                async with self._runtime.slots:
                    return await self._post(body)
            except _Transient as t:
                if attempt == self.cfg.max_retries:
                    raise OpenAIEngineError(
                        f"chat completion still failing after max_retries={attempt} retries, "
                        f"last: {t.cause}: {t.detail} "
                        f"(server {self.cfg.base_url}); if this persists, check the server or "
                        "raise generate.openai.max_retries / timeout_s"
                    ) from None
                self._stats[f"retries_{t.cause}"] += 1
                self._note_retry(t)
                wait = backoff_s(attempt, self.cfg.backoff_base_s, self.cfg.backoff_max_s,
                                 t.retry_after_s, self._rng.uniform)
                await asyncio.sleep(wait)

    async def _post(self, body: dict) -> Completion | str:
        self._stats["http_requests"] += 1
        try:
            async with self._runtime.session.post(
                self._url, json=body, headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            ) as resp:
                status, raw = resp.status, await resp.read()
                retry_after = retry_after_s(resp.headers.get("Retry-After"))
        # aiohttp's timeouts are also ClientConnectionErrors (ServerTimeoutError): test first.
        except asyncio.TimeoutError:
            raise _Transient("timeout", f"no answer within {self.cfg.timeout_s:g}s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Transient("connection", self._clean(f"{type(e).__name__}: {e}")) from None
        except aiohttp.ClientResponseError as e:  # not parseable as HTTP
            raise _Transient("malformed", self._clean(f"{type(e).__name__}: {e.message}")) from None

        if 200 <= status < 300:
            try:
                completion, had_usage = parse_chat_completion(raw)
            except MalformedResponse as e:
                raise _Transient("malformed", str(e)) from None
            if not had_usage:
                self._stats["missing_usage"] += 1
            self._stats["prompt_tokens"] += completion.prompt_tokens
            self._stats["completion_tokens"] += completion.completion_tokens
            return completion
        message = self._clean(error_message(raw))
        if status == 429:
            raise _Transient("429", f"http_429: {message}", retry_after)
        if status >= 500:
            raise _Transient("5xx", f"http_{status}: {message}", retry_after)
        if status == 408:
            raise _Transient("timeout", f"http_408: {message}", retry_after)
        if status in REJECT_STATUSES:
            if status in (401, 403, 404) and not self._warned_setup:
                # These reject one prompt like a 400 does, but usually mean every prompt will be.
                self._warned_setup = True
                log.warning("%s answered http_%d (%s); if every prompt gets this, check "
                            "generate.openai.model, base_url and the key in $%s",
                            self.cfg.base_url, status, message, self.cfg.api_key_env)
            return f"http_{status}: {message}"
        raise OpenAIEngineError(
            f"unexpected http_{status} from {self._url}: {message}; is generate.openai.base_url "
            "the server's OpenAI-compatible root (usually ending in /v1)?"
        )

    def _clean(self, text: str) -> str:
        return redact(text, self._api_key)

    def _note_retry(self, t: _Transient) -> None:
        """DEBUG per retry; a WARNING at most every _WARN_EVERY_S summing up the retries since
        the last one, so a 503 storm over thousands of requests stays a few lines."""
        log.debug("retrying after %s: %s", t.cause, t.detail)
        self._unlogged[t.cause] += 1
        now = time.monotonic()
        if now - self._last_warning < _WARN_EVERY_S:
            return
        counts = ", ".join(f"{n} x {cause}" for cause, n in sorted(self._unlogged.items()))
        log.warning("%s: retrying %s (latest: %s)", self.cfg.base_url, counts, t.detail)
        self._unlogged.clear()
        self._last_warning = now
