"""Ray plumbing shared by the stages: connecting, and a pool of replica actors that survives
dead workers.

The same code runs on a laptop and on a cluster: `connect()` joins the cluster named in the
config or in `RAY_ADDRESS` (which `ray job submit` sets), and otherwise starts an embedded
single-machine cluster.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from distill.config import RaySection

log = logging.getLogger("distill.ray")

_STALL_WARN_S = 60.0


def connect(cfg: RaySection) -> str:
    """Initialise Ray once per process; returns "cluster ADDRESS" or "embedded"."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"cluster {address}"
    # address="local", not None: with None, Ray joins whatever cluster a past `ray start` on this
    # machine recorded in /tmp/ray, and hangs for minutes if that cluster is gone. Joining a
    # running cluster is what `ray.address: auto` is for.
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls; without
    # it the cleaner logs a warning every few seconds for the whole training run (~0.5 s to start).
    ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, log_to_driver=True)
    return "embedded"


class ShardFailed(RuntimeError):
    pass


class ReplicaPool:
    """`replicas` copies of an actor class; `map_unordered` feeds them work and yields results.

    A work item whose actor dies (process killed, node lost) or whose call raises is retried on
    a fresh actor up to `max_retries` times; the dead actor is replaced. Results come back in
    completion order, each exactly once. Two items are kept queued per actor so that the next
    one starts the moment the previous finishes (one extra item of memory per replica).

    Work goes only to actors that have started: an actor the cluster cannot place (more replicas
    than free CPUs/GPUs, or a replacement after a node was lost) would otherwise sit on its queued
    items for ever while the others run out of work. An actor whose constructor fails counts as
    `replica_start_failed`; more than `max_retries` such failures per replica end the stage.
    """

    def __init__(self, actor_cls: Any, args: tuple, *, replicas: int, options: dict, max_retries: int,
                 describe: Callable[[Any], str] = repr):
        self._cls, self._args, self._options = actor_cls, args, options
        self._max_retries, self._describe = max_retries, describe
        self.actors = [self._spawn() for _ in range(replicas)]
        self._started = [False] * replicas
        self.retries: Counter = Counter()

    def _spawn(self):
        return self._cls.options(**self._options).remote(*self._args)

    def _replace(self, i: int, dead) -> None:
        import ray

        if self.actors[i] is dead:  # several in-flight calls fail for one death: replace once
            ray.kill(dead, no_restart=True)
            self.actors[i] = self._spawn()
            self._started[i] = False

    def map_unordered(self, method: str, items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        # Items are drawn from the iterator only when an actor has room, so a lazily planned stage
        # holds `depth` items per replica plus retries, never the whole plan.
        source = iter(items)
        retry: list[Any] = []
        exhausted = False

        def next_item():
            nonlocal exhausted
            if retry:
                return retry.pop()
            if not exhausted:
                try:
                    return next(source)
                except StopIteration:
                    exhausted = True
            return None

        inflight: dict[Any, tuple[int, Any, Any]] = {}
        attempts: Counter = Counter()
        load = Counter()
        probes: dict[Any, tuple[int, Any]] = {}  # __ray_ready__ of actors not known to have started
        start_failures = 0
        idle_since = time.monotonic()
        while retry or not exhausted or inflight:
            for i, actor in enumerate(self.actors):
                if not self._started[i]:
                    if not any(a is actor for _, a in probes.values()):
                        probes[actor.__ray_ready__.remote()] = (i, actor)
                    continue
                while load[i] < depth and (item := next_item()) is not None:
                    inflight[getattr(actor, method).remote(item)] = (i, actor, item)
                    load[i] += 1
            if not inflight and not probes:
                break  # every actor has started and none took an item: nothing is left
            ready, _ = ray.wait(list(inflight) + list(probes), num_returns=1, timeout=_STALL_WARN_S)
            if inflight or ready:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= _STALL_WARN_S:
                log.warning("none of %d replicas has started after %.0fs: the cluster lacks the resources "
                            "they ask for (%s), or is still starting them", len(self.actors),
                            time.monotonic() - idle_since, self._options)
            for ref in ready:
                if ref in probes:
                    i, actor = probes.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as e:  # its constructor raised, or its node died first
                        start_failures += 1
                        self.retries["replica_start_failed"] += 1
                        log.warning("replica %d failed to start (%d so far): %s", i, start_failures,
                                    str(e).splitlines()[0][:300])
                        if start_failures > self._max_retries * len(self.actors):
                            raise ShardFailed(f"replicas failed to start {start_failures} times; last error:\n{e}") from e
                        self._replace(i, actor)
                    else:
                        self._started[i] = self._started[i] or self.actors[i] is actor
                    continue
                i, actor, item = inflight.pop(ref)
                load[i] -= 1
                try:
                    result = ray.get(ref)
                except (RayActorError, RayTaskError) as e:  # RayActorError covers died / unavailable
                    actor_lost = not isinstance(e, RayTaskError)
                    cause = "replica_died" if actor_lost else "task_error"
                    self.retries[cause] += 1
                    attempts[id(item)] += 1
                    log.warning("%s failed (%s, attempt %d/%d): %s", self._describe(item), cause,
                                attempts[id(item)], self._max_retries + 1, str(e).splitlines()[0][:300])
                    if attempts[id(item)] > self._max_retries:
                        raise ShardFailed(f"{self._describe(item)} failed {attempts[id(item)]} times; last error:\n{e}") from e
                    if actor_lost:
                        self._replace(i, actor)
                    retry.append(item)
                    continue
                yield result

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
