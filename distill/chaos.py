"""Fault injection for checking a deployment the way the test suite checks the pipeline.

Two tools, both usable against a user's own servers and clusters:

- `FaultProxy` (`distill chaos proxy`): an HTTP proxy on loopback in front of any
  OpenAI-compatible server. A share `rate` of requests gets a fault instead of (or in the middle
  of) the upstream's answer: 429 with Retry-After, 500, 503, a timeout (the request is held past
  the client's timeout and then dropped), a connection reset mid-response, or a 200 whose body is
  not a chat completion. Point `generate.openai.base_url` at the proxy and the stage must slow
  down but finish with every sample exactly once; the proxy's counts say how many retries of
  each cause to expect (`expected_retries`).
- `Killer` (`distill chaos kill`): connects to a running Ray cluster as a second driver and
  SIGKILLs the worker processes of random actors whose class name matches, and optionally the
  raylet of one worker node (which takes every actor and task on that node with it). The kill
  runs as a zero-CPU Ray task pinned to the victim's node, so it works on any node of a cluster
  without ssh; the head node and nodes that host a driver are never chosen.

Ray is imported inside the killer's functions only; the proxy needs aiohttp.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import urlsplit

from distill.loopback import LoopbackServer

FAULTS = ("429", "500", "503", "timeout", "reset", "malformed")

RETRY_CAUSE = {"429": "429", "500": "5xx", "503": "5xx", "timeout": "timeout", "reset": "connection",
               "malformed": "malformed"}
"""The `generate.openai` retry cause (`retries_<cause>` in the generate summary) each proxy
fault shows up as."""

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp recomputes: never forwarded.
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"})


def parse_mix(text: str) -> dict[str, float]:
    """`"429=1,500=1,timeout=2"` -> relative weights per fault kind; a bare kind weighs 1.

    Raises ValueError naming the bad entry (unknown kind, negative or unreadable weight)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in FAULTS:
            raise ValueError(f"--mix {part!r}: unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"--mix {part!r}: weight {weight!r} is not a number") from None
        if w < 0:
            raise ValueError(f"--mix {part!r}: weight must be >= 0")
        mix[kind] = mix.get(kind, 0.0) + w
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"--mix {text!r}: no fault with a positive weight")
    return mix


def parse_duration(text: str) -> float:
    """`"5s"`, `"500ms"`, `"2m"`, `"1.5"` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 5s, 500ms, 2m)")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]


def expected_retries(injected: Mapping[str, int]) -> Counter:
    """Client retries by `generate.openai` cause that the proxy's injected faults account for:
    each fault costs the client exactly one failed attempt of its cause."""
    out: Counter = Counter()
    for kind, n in injected.items():
        out[RETRY_CAUSE[kind]] += n
    return out


@dataclass(frozen=True)
class ProxyFaults:
    """What the proxy injects: a fault on a share `rate` of requests, its kind drawn by `mix`."""

    rate: float = 0.2
    mix: Mapping[str, float] = field(default_factory=lambda: dict.fromkeys(FAULTS, 1.0))
    seed: int = 0
    hold_s: float = 30.0
    """How long a `timeout` fault holds the request before dropping it; set it above the
    client's timeout (`generate.openai.timeout_s`), or the client simply waits it out."""
    retry_after_s: float = 1.0
    """Retry-After sent with 429 and 503 (clients that honour it wait this long)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate={self.rate}: must lie in [0, 1]")
        bad = set(self.mix) - set(FAULTS)
        if bad or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix={dict(self.mix)}: kinds must be among {FAULTS}, weights >= 0, some > 0")
        if self.hold_s < 0 or self.retry_after_s < 0:
            raise ValueError("hold_s and retry_after_s must be >= 0")

    def draw(self, rng: random.Random) -> str | None:
        """The fault for the next request, or None to pass it through untouched."""
        if rng.random() >= self.rate:
            return None
        kinds = [k for k in FAULTS if self.mix.get(k, 0) > 0]
        return rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0]


class FaultProxy(LoopbackServer):
    """The proxy on its own thread and event loop (LoopbackServer); use it as a context manager.

    Counters (written by the proxy thread; read them once the client is done): `requests`
    received, `injected` faults by kind, `passed` requests answered from upstream untouched,
    `upstream_errors` requests the upstream itself failed to answer (sent on as 502).

    Faults are drawn from one seeded generator in arrival order, so the counts of a run are
    reproducible for a sequential client and statistically the same for a concurrent one.
    """

    thread_name = "fault-proxy"

    def __init__(self, upstream: str, faults: ProxyFaults | None = None, host: str = "127.0.0.1", port: int = 0):
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"upstream {upstream!r}: expected http(s)://host:port[/prefix]")
        self.upstream_origin = f"{parts.scheme}://{parts.netloc}"
        self.prefix = parts.path.rstrip("/")
        super().__init__(host, port)
        self.faults = faults or ProxyFaults()
        self.requests = 0
        self.passed = 0
        self.upstream_errors = 0
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(self.faults.seed)
        self._session = None

    @property
    def base_url(self) -> str:
        """The upstream's URL with the proxy's host and port (same path prefix, e.g. /v1)."""
        return f"{self.origin}{self.prefix}"

    def counts(self) -> dict:
        return {"requests": self.requests, "passed": self.passed, "upstream_errors": self.upstream_errors,
                "injected": dict(sorted(self.injected.items()))}

    def _app(self):
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.cleanup_ctx.append(self._upstream_session)
        return app

    async def _upstream_session(self, app):
        """The client session towards upstream, open while the proxy serves (closed after the
        server stops taking requests)."""
        import aiohttp

        # No total timeout towards upstream: a slow model is the client's timeout to judge.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        yield
        await self._session.close()

    # ----------------------------------------------------------------------- handling

    async def _handle(self, request):
        from aiohttp import web

        self.requests += 1
        fault = self.faults.draw(self._rng)
        body = await request.read()
        if fault is not None:
            self.injected[fault] += 1
        if fault == "429":
            return _error(429, "Rate limit reached (injected by distill chaos proxy).", "rate_limit_error",
                          {"Retry-After": f"{self.faults.retry_after_s:g}"})
        if fault == "500":
            return _error(500, "Internal error (injected by distill chaos proxy).", "server_error")
        if fault == "503":
            return _error(503, "Overloaded (injected by distill chaos proxy).", "server_error",
                          {"Retry-After": f"{self.faults.retry_after_s:g}"})
        if fault == "timeout":
            await asyncio.sleep(self.faults.hold_s)
            request.transport.close()
            raise asyncio.CancelledError  # nothing more is sent on a dropped connection
        if fault == "malformed":
            return web.Response(status=200, text='{"id": "chatcmpl-chaos", "object": "chat.completion", "choi',
                                content_type="application/json")

        import aiohttp

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(request.method, self.upstream_origin + request.path_qs,
                                             headers=headers, data=body) as up:
                payload = await up.read()
                status, up_headers = up.status, up.headers
        except aiohttp.ClientError as e:
            self.upstream_errors += 1
            return _error(502, f"upstream {self.upstream_origin} failed: {type(e).__name__}", "server_error")
        out_headers = {k: v for k, v in up_headers.items() if k.lower() not in _HOP}
        if fault == "reset":
            # Headers and half the body, then the connection closes: the client has started to
            # read an answer it never gets in full.
            resp = web.StreamResponse(status=status, headers=out_headers)
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            request.transport.close()
            raise asyncio.CancelledError
        self.passed += 1
        return web.Response(status=status, body=payload, headers=out_headers)


def _error(status: int, message: str, type_: str, headers: dict | None = None):
    from aiohttp import web

    body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


# --------------------------------------------------------------------------- Ray killer


@dataclass(frozen=True)
class Kill:
    """One kill: `what` is "actor" or "node"; `target` the class name or node id."""

    at: float
    what: str
    target: str
    node_id: str
    pid: int


def _sigkill_task():
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def sigkill(pid: int | None) -> int:
        """SIGKILL `pid`, or with None this node's raylet (the parent of every Ray worker)."""
        import os
        import signal

        target = os.getppid() if pid is None else pid
        os.kill(target, signal.SIGKILL)
        return target

    return sigkill


def protected_nodes() -> set[str]:
    """Node ids never to kill: the head (GCS lives there) and any node hosting a live driver,
    whose death would end the very job being tested rather than test its fault tolerance."""
    from ray.util.state import list_nodes, list_workers

    head = {n.node_id for n in list_nodes(detail=True, limit=10_000) if n.is_head_node}
    # Filtered here, not by the State API: its server-side filters count the unfiltered rows
    # against the limit and then raise on "missing output".
    drivers = {w.node_id for w in list_workers(detail=True, limit=10_000, raise_on_missing_output=False)
               if w.worker_type == "DRIVER" and w.is_alive}
    return head | drivers


def alive_actors(pattern: str) -> list:
    """Live actors whose class name matches the regex `pattern` (re.search)."""
    from ray.util.state import list_actors

    from ray.util.state import list_nodes

    rx = re.compile(pattern)
    # The actor table lags a node's death by the GCS's health-check period; an actor still
    # listed as alive on a dead node cannot be reached (and is dying anyway).
    nodes = {n.node_id for n in list_nodes(filters=[("state", "=", "ALIVE")], limit=10_000)}
    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
            if rx.search(a.class_name or "") and a.pid and a.node_id in nodes]


def killable_nodes() -> list[str]:
    from ray.util.state import list_nodes

    keep = protected_nodes()
    return sorted(n.node_id for n in list_nodes(filters=[("state", "=", "ALIVE")], limit=10_000)
                  if n.node_id not in keep)


def _on_node(node_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def kill_actor(actor, timeout_s: float = 30.0) -> Kill:
    """SIGKILL the worker process of `actor` (an `ActorState` from `alive_actors`)."""
    import ray

    ref = _sigkill_task().options(scheduling_strategy=_on_node(actor.node_id)).remote(actor.pid)
    ray.get(ref, timeout=timeout_s)
    return Kill(time.time(), "actor", actor.class_name, actor.node_id, actor.pid)


def kill_node(node_id: str, timeout_s: float = 30.0) -> Kill:
    """SIGKILL the raylet of `node_id`; its workers and actors die with it."""
    import ray
    from ray.exceptions import RayError

    ref = _sigkill_task().options(scheduling_strategy=_on_node(node_id)).remote(None)
    try:
        pid = ray.get(ref, timeout=timeout_s)
    except RayError:
        pid = -1  # the task's own worker can die with its raylet before it reports back
    return Kill(time.time(), "node", node_id, node_id, pid)


def run_killer(pattern: str, *, every_s: float, count: int, node: bool = False, seed: int = 0,
               max_wait_s: float = 600.0, say: Callable[[str], None] = print) -> list[Kill]:
    """Kill `count` random matching actors, one every `every_s`; with `node`, also kill one
    random killable worker node halfway through. Waits (up to `max_wait_s` in all) for a
    matching actor when none is alive. Needs a connected Ray driver (`ray.init(address=...)`)."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    node_at = count // 2 if node else -1
    deadline = time.monotonic() + max_wait_s
    done_actors = 0
    dead_nodes: set[str] = set()  # killed here; the actor table takes a while to notice
    while done_actors < count or (node and not any(k.what == "node" for k in kills)):
        if time.monotonic() > deadline:
            say(f"chaos kill: gave up after {max_wait_s:g}s with {len(kills)} kills")
            break
        if node and done_actors >= node_at and not any(k.what == "node" for k in kills):
            nodes = killable_nodes()
            if nodes:
                k = kill_node(rng.choice(nodes))
                kills.append(k)
                dead_nodes.add(k.node_id)
                say(f"chaos kill: node {k.node_id[:12]} (raylet pid {k.pid})")
                time.sleep(every_s)
                continue
            say("chaos kill: no killable worker node (only the head or driver nodes are alive)")
            node = False
            continue
        if done_actors >= count:
            break
        actors = [a for a in alive_actors(pattern) if a.node_id not in dead_nodes]
        if not actors:
            time.sleep(min(every_s, 1.0))
            continue
        victim = rng.choice(sorted(actors, key=lambda a: a.actor_id))
        try:
            k = kill_actor(victim)
        except Exception as e:  # noqa: BLE001 - it may have died or finished meanwhile; pick again
            say(f"chaos kill: {victim.class_name} pid {victim.pid} could not be killed ({type(e).__name__})")
            time.sleep(min(every_s, 1.0))
            continue
        kills.append(k)
        done_actors += 1
        say(f"chaos kill: actor {k.target} pid {k.pid} on node {k.node_id[:12]}")
        time.sleep(every_s)
    return kills
