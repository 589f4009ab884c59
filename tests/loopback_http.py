"""What the fake provider APIs share: an aiohttp application served from a thread of its own on 127.0.0.1, at a
free port, started and stopped by the test (or as a context manager)::

    class FakeApi(LoopbackHttp):
        label = "the fake API"

        def app(self) -> web.Application:
            app = web.Application()
            app.router.add_get("/ping", self._ping)
            return app

    with FakeApi() as server:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ping")
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Self

from aiohttp import web


class LoopbackHttp:
    """Serves :meth:`app` on loopback from a background thread; ``_loop`` runs the handlers."""

    label = "the fake server"

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    def bound(self) -> None:
        """Called once the port is known, before the first request (a server that links to itself)."""

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.bound()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(listener, ready), name=self.label, daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError(f"{self.label} did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, listener: socket.socket, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app(), access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.SockSite(runner, listener).start())
        ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()
