"""An aiohttp app served on its own thread and event loop, for in-process servers that a caller
starts, uses from blocking code and stops: the test suite's fault server
(`distill.testing.fault_server`) and the chaos proxy (`distill.chaos`).

Nothing heavy at import: aiohttp is imported on the server thread, so `distill chaos --help`
does not pay for it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from aiohttp import web

_S = TypeVar("_S", bound="LoopbackServer")


class LoopbackServer:
    """Serve `self._app()` on (host, port) from a daemon thread; use it as a context manager.

    `start` returns once the socket listens (port 0 picks a free port, read back into `port`) and
    re-raises any setup failure in the caller; `stop` ends the loop, runs the app's cleanup and
    joins the thread. Subclasses build the app; per-app resources (a client session) belong in
    the app's `cleanup_ctx`, which runs on the server thread around serving.
    """

    thread_name = "loopback-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _app(self) -> web.Application:
        raise NotImplementedError

    @property
    def origin(self) -> str:
        """`http://host:port`, the IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self: _S) -> _S:
        # Bound here, not on the server thread: a taken port fails in the caller, and port 0
        # is resolved before start returns.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        started, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._serve, args=(sock, started, failure), name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self, sock: socket.socket, started: threading.Event, failure: list) -> None:
        from aiohttp import web

        loop = self._loop
        asyncio.set_event_loop(loop)
        # handler_cancellation: a client that hangs up cancels its handler, so a handler can
        # tell an answer it delivered from one the client gave up on.
        try:
            runner = web.AppRunner(self._app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
        except BaseException as e:  # noqa: BLE001 (handed to the starting thread)
            failure.append(e)
            sock.close()
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()
