"""A small pool of long-lived worker processes with a hard wall-clock limit per item.

Some inputs make a library hang where no signal reaches it (sympy building or printing a tower
of powers spends minutes inside one C call) or eat all memory. Such work runs here: each worker
is a spawned process under an address-space limit (RLIMIT_AS); the parent hands it a batch, the
worker answers item by item, and when one item runs past its limit the parent kills the worker,
reports that item as timed out, starts a replacement and hands the rest of the batch on. A
worker that dies (memory limit, segfault) costs only the item it was on.

Workers come from a fork server, not from a fork of the caller: the caller may hold threads
(Ray, gRPC) that a fork would copy in a broken state. The fork server is a fresh interpreter
that imports the handler's module once (about a second for math-verify + sympy); each worker,
first or replacement, is then a fork of it that starts in milliseconds.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any


@dataclass(frozen=True)
class Killed:
    """Result of an item whose worker was killed (timeout) or died (crash) while on it."""

    reason: str
    """`timeout` or `crash`."""
    detail: str


# Exit status of a worker that found itself re-running the caller's unguarded main module.
UNGUARDED_MAIN_EXIT = 87


def unguarded_main_message(factory: str) -> str:
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
    return (
        f"sandbox workers for {factory} cannot start: {main} starts them at import time. The "
        "workers come from a multiprocessing fork server, which imports the main module again in "
        "each worker, so the script's top-level code ran again inside the worker and tried to "
        "start workers of its own. Put the script's top-level code under "
        "`if __name__ == \"__main__\":` (see the multiprocessing docs, 'safe importing of the main module')."
    )


def _bootstrapping() -> bool:
    """True in a child process while multiprocessing is still importing the parent's main module
    into it (the flag the stdlib's own "bootstrapping phase" check reads; `parent_process()` is
    not yet set at that point)."""
    return bool(getattr(mp.current_process(), "_inheriting", False))


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(conn: Connection, factory: str, factory_args: tuple, memory_limit_mb: int | None) -> None:
    if memory_limit_mb:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    handler = _resolve(factory)(*factory_args)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(("bye", usage.ru_utime + usage.ru_stime))
            return
        for item in batch:
            try:
                out = ("ok", handler(item))
            except MemoryError:
                out = ("error", "memory limit")
            except Exception as e:  # noqa: BLE001 - a failing item must not end the worker
                # The type only: str() of an exception may print a huge parsed expression.
                out = ("error", type(e).__name__)
            conn.send(out)


class _Worker:
    def __init__(self, ctx, factory: str, factory_args: tuple, memory_limit_mb: int | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, factory, factory_args, memory_limit_mb), daemon=True
        )
        self.proc.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.job: tuple[int, list[int], list[Any]] | None = None  # (batch id, slots, items)
        self.pos = 0
        self.deadline = float("inf")

    def kill(self) -> float:
        """Kill it; returns the CPU seconds it used when /proc tells (Linux), else 0."""
        cpu = 0.0
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        return cpu


class WorkerPool:
    """`n_workers` processes, each running `factory(*factory_args)` once to get a handler
    `item -> result`, then applying it to items of the batches they are sent.

    `map(batches)` returns one result per item, in order: the handler's value, `("error", type)`
    when it raised, or a `Killed` when the item ran past `item_timeout_s` or its worker died."""

    def __init__(
        self,
        factory: str,
        factory_args: tuple = (),
        *,
        n_workers: int = 2,
        item_timeout_s: float = 5.0,
        memory_limit_mb: int | None = 2048,
        start_timeout_s: float = 120.0,
    ):
        if n_workers < 1:
            raise ValueError(f"n_workers={n_workers}: must be >= 1")
        if _bootstrapping():
            # We are a worker importing an unguarded main script that makes a pool at import time.
            # Raising here would only be printed in the worker; the parent would see a worker that
            # died at start. A distinct exit status lets the parent say what happened.
            sys.stderr.write(unguarded_main_message(factory) + "\n")
            sys.stderr.flush()
            os._exit(UNGUARDED_MAIN_EXIT)
        self._ctx = mp.get_context("forkserver")
        # Imported once in the fork server, inherited by every worker. A no-op when this
        # process's fork server already runs (then each worker imports it itself).
        self._ctx.set_forkserver_preload([factory.partition(":")[0]])
        self._spec = (factory, factory_args, memory_limit_mb)
        self.item_timeout_s = item_timeout_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self.cpu_s = 0.0
        """CPU seconds of the workers that ended: shut down by close() or killed (the latter
        counted on Linux only, from /proc)."""
        self._workers = [self._spawn() for _ in range(n_workers)]

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, *self._spec)

    def _replace(self, w: _Worker) -> _Worker:
        self.cpu_s += w.kill()
        self.restarts += 1
        nw = self._spawn()
        self._workers[self._workers.index(w)] = nw
        return nw

    def wait_ready(self) -> None:
        """Block until every worker has started (imports done); map() does not need this."""
        deadline = time.monotonic() + self.start_timeout_s
        for w in self._workers:
            try:
                if not w.ready and w.conn.poll(max(0.0, deadline - time.monotonic())):
                    w.ready = w.conn.recv()[0] == "ready"
            except (EOFError, OSError):
                pass
            if not w.ready:
                exitcode = self._exitcode(w)
                self.close()
                if exitcode == UNGUARDED_MAIN_EXIT:
                    raise RuntimeError(unguarded_main_message(self._spec[0]))
                raise RuntimeError(f"sandbox worker for {self._spec[0]} did not start (exit code {exitcode})")

    @staticmethod
    def _exitcode(w: _Worker) -> int | None:
        """The exit status of a worker that has died or is dying (its pipe can close a moment
        before the fork server reports the status); None when it still runs."""
        w.proc.join(2)
        return w.proc.exitcode

    def map(self, batches: Sequence[Sequence[Any]]) -> list[list[Any]]:
        results: list[list[Any]] = [[None] * len(b) for b in batches]
        queue: deque[tuple[int, list[int], list[Any]]] = deque(
            (i, list(range(len(b))), list(b)) for i, b in enumerate(batches) if len(b)
        )
        remaining = sum(len(b) for b in batches)
        start_failures = 0
        while remaining:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.job is None and queue:
                    w.job, w.pos = queue.popleft(), 0
                    try:
                        w.conn.send(w.job[2])
                    except OSError:
                        pass  # it died: the wait below sees its sentinel
                    w.deadline = now + self.item_timeout_s
            waitables = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            deadlines = [w.deadline for w in self._workers if w.job is not None]
            deadlines += [w.started + self.start_timeout_s for w in self._workers if not w.ready]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            ready = set(wait(waitables, timeout))
            now = time.monotonic()
            for w in list(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None:
                        if msg[0] == "ready":
                            w.ready, start_failures = True, 0
                            continue
                        bid, slots, items = w.job
                        results[bid][slots[w.pos]] = msg[1] if msg[0] == "ok" else msg
                        w.pos += 1
                        remaining -= 1
                        w.deadline = now + self.item_timeout_s
                        if w.pos == len(items):
                            w.job, w.deadline = None, float("inf")
                        continue
                elif w.proc.sentinel in ready and w.conn.poll():
                    continue  # results sent before it died are read first, next round
                dead = w.conn in ready or w.proc.sentinel in ready
                if w.job is not None and (dead or now >= w.deadline):
                    # Killed while on item `pos`: that item alone is lost, the rest goes back.
                    bid, slots, items = w.job
                    if dead:
                        res = Killed("crash", f"worker died (exit code {w.proc.exitcode}), e.g. memory limit")
                    else:
                        res = Killed("timeout", f"no result within {self.item_timeout_s:g} s; worker killed")
                    results[bid][slots[w.pos]] = res
                    remaining -= 1
                    if w.pos + 1 < len(items):
                        queue.appendleft((bid, slots[w.pos + 1 :], items[w.pos + 1 :]))
                    self._replace(w)
                elif not w.ready and (dead or now >= w.started + self.start_timeout_s):
                    start_failures += 1
                    exitcode = self._exitcode(w) if dead else None
                    if exitcode == UNGUARDED_MAIN_EXIT:
                        self.close()
                        raise RuntimeError(unguarded_main_message(self._spec[0]))
                    if start_failures > len(self._workers) + 2:
                        self.close()
                        raise RuntimeError(
                            f"sandbox workers for {self._spec[0]} fail to start (exit code {exitcode}); "
                            "run the factory in a plain Python process to see its error"
                        )
                    self._replace(w)
                elif dead:
                    self._replace(w)
        return results

    def close(self) -> None:
        for w in self._workers:
            try:
                if w.proc.is_alive() and w.job is None:
                    w.conn.send(None)
                    while w.conn.poll(2):
                        msg = w.conn.recv()
                        if msg[0] == "bye":
                            self.cpu_s += msg[1]
                            break
                    w.proc.join(2)
            except (OSError, EOFError):
                pass
            w.kill()
        self._workers = []

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
