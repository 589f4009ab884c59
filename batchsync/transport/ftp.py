"""FTP with ftplib: passive mode, binary transfers, streamed in blocks.

Native errors become :class:`TransportError` here: 4xx replies and broken connections are retryable, 5xx
replies (no such file, login refused, permission denied) are not. A broken connection is dropped and the next
call connects again, so a retried operation starts clean.
"""

from __future__ import annotations

import ftplib
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from batchsync.errors import TransportError
from batchsync.transport.base import RemoteEntry, Transport

BLOCK = 256 * 1024


class FtpTransport(Transport):
    def __init__(
        self, host: str, port: int, user: str, password: str, *, root: str = "", timeout: float = 30.0
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self._password = password
        self.root = root.rstrip("/")
        self.timeout = timeout
        self._ftp: ftplib.FTP | None = None

    def __repr__(self) -> str:
        return f"FtpTransport({self.user}@{self.host}:{self.port})"

    def _new_client(self) -> ftplib.FTP:
        return ftplib.FTP(timeout=self.timeout)

    def _connect(self) -> ftplib.FTP:
        if self._ftp is None:
            client = self._new_client()
            with self._errors(f"connect to {self.host}:{self.port}"):
                client.connect(self.host, self.port)
                self._login(client)
                client.set_pasv(True)
                client.voidcmd("TYPE I")
            self._ftp = client
        return self._ftp

    def _login(self, client: ftplib.FTP) -> None:
        client.login(self.user, self._password)

    def _full(self, remote: str) -> str:
        return posixpath.join(self.root, remote.lstrip("/")) if self.root else remote.lstrip("/")

    def list(self, folder: str) -> list[RemoteEntry]:
        ftp = self._connect()
        path = self._full(folder) or "."
        try:
            with self._errors(f"list {folder}"):
                facts = list(ftp.mlsd(path, facts=["type", "size", "modify"]))
        except TransportError:
            if not self._is_folder(path):
                return []  # servers answer a missing folder with 550 or 501; a missing inbox is an empty one
            raise
        entries = [
            RemoteEntry(name, int(info.get("size", "0")), _mlsd_time(info.get("modify")))
            for name, info in facts
            if info.get("type") == "file"
        ]
        return sorted(entries, key=lambda entry: entry.name)

    def _is_folder(self, path: str) -> bool:
        ftp = self._connect()
        with self._errors("find the working folder"):
            home = ftp.pwd()
        try:
            ftp.cwd(path)
        except ftplib.error_perm:
            return False
        with self._errors("return to the working folder"):
            ftp.cwd(home)
        return True

    def upload(self, local: Path, remote: str) -> None:
        ftp = self._connect()
        self._makedirs(posixpath.dirname(self._full(remote)))
        with self._errors(f"upload {remote}"), local.open("rb") as source:
            ftp.storbinary(f"STOR {self._full(remote)}", source, blocksize=BLOCK)

    def download(self, remote: str, local: Path) -> None:
        ftp = self._connect()
        with self._errors(f"download {remote}"), local.open("wb") as target:
            ftp.retrbinary(f"RETR {self._full(remote)}", target.write, blocksize=BLOCK)

    def size(self, remote: str) -> int:
        ftp = self._connect()
        with self._errors(f"size of {remote}"):
            found = ftp.size(self._full(remote))
        if found is None:
            raise TransportError(f"the server gave no size for {remote}")
        return found

    def rename(self, source: str, target: str) -> None:
        ftp = self._connect()
        self._makedirs(posixpath.dirname(self._full(target)))
        with self._errors(f"rename {source} to {target}"):
            ftp.rename(self._full(source), self._full(target))

    def delete(self, remote: str) -> None:
        ftp = self._connect()
        with self._errors(f"delete {remote}"):
            ftp.delete(self._full(remote))

    def close(self) -> None:
        if self._ftp is not None:
            client, self._ftp = self._ftp, None
            try:
                client.quit()
            except (ftplib.Error, OSError, EOFError):
                client.close()

    def _makedirs(self, folder: str) -> None:
        if not folder:
            return
        ftp = self._connect()
        built = "/" if folder.startswith("/") else ""
        for part in [p for p in folder.split("/") if p]:
            built = posixpath.join(built, part) if built else part
            try:
                ftp.mkd(built)
            except ftplib.error_perm:
                pass  # 550 when it exists already; a real refusal shows on the next operation
            except (ftplib.Error, OSError, EOFError) as exc:
                self._drop()
                raise TransportError(f"create folder {built}: {exc}", retryable=True) from exc

    def _drop(self) -> None:
        if self._ftp is not None:
            self._ftp.close()
            self._ftp = None

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except ftplib.error_perm as exc:
            raise TransportError(f"{what}: the server refused: {exc}", retryable=False) from exc
        except ftplib.error_temp as exc:
            raise TransportError(f"{what}: temporary failure: {exc}", retryable=True) from exc
        except (ftplib.Error, OSError, EOFError) as exc:
            self._drop()
            raise TransportError(f"{what}: connection failed: {exc or type(exc).__name__}", retryable=True) from exc


def _mlsd_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
