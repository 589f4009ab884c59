"""A real FTP server on loopback (pyftpdlib) that stands in for the provider in the demo and in tests::

with LoopbackFtpServer(Path("provider"), "provider", password) as server:
    print(server.port)
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer

# pyftpdlib configures its own chatty logging unless its logger already has a handler.
_ftp_log = logging.getLogger("pyftpdlib")
_ftp_log.addHandler(logging.NullHandler())
_ftp_log.setLevel(logging.WARNING)


class LoopbackFtpServer:
    """A pyftpdlib FTP (or FTPS) server on 127.0.0.1 with one account, in a thread of its own; ``port`` is known once
    started."""

    def __init__(self, root: Path, user: str, password: str, *, tls: tuple[Path, Path] | None = None) -> None:
        """``tls`` is (certificate, key): explicit TLS then required on the control and data channels. The
        server's own handler class is ``self.handler``: set attributes on it before ``start`` to change how it
        answers."""
        root.mkdir(parents=True, exist_ok=True)
        authorizer = DummyAuthorizer()
        authorizer.add_user(user, password, str(root), perm="elradfmwMT")
        settings: dict[str, Any] = {"authorizer": authorizer, "banner": "batchsync test"}
        base: type[Any] = FTPHandler
        if tls is not None:
            from pyftpdlib.handlers import TLS_FTPHandler

            base = TLS_FTPHandler
            settings.update(
                certfile=str(tls[0]), keyfile=str(tls[1]), tls_control_required=True, tls_data_required=True
            )
        self.handler = type("ProviderHandler", (base,), settings)
        self.root = root
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> LoopbackFtpServer:
        self._server = ThreadedFTPServer(("127.0.0.1", 0), self.handler)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"timeout": 0.2, "handle_exit": False}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close_all()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackFtpServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
