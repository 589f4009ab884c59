"""FTP with ftplib: passive mode, binary transfers, streamed in blocks.

Native errors become :class:`TransportError` here: 4xx replies and broken connections are retryable, 5xx
replies (no such file, login refused, permission denied) are not. A broken connection is dropped and the next
call connects again, so a retried operation starts clean.
"""

from __future__ import annotations

import ftplib
import posixpath
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from batchsync.errors import RemoteFolderMissing, TransportError, disk_full
from batchsync.transport.base import RemoteEntry, Transport

BLOCK = 256 * 1024


class FtpTransport(Transport):
    """FTP in passive, binary mode; connects on first use and again after a broken connection."""

    def __init__(
        self, host: str, port: int, user: str, password: str, *, root: str = "", timeout: float = 30.0
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self._password = password
        self.root = root.rstrip("/")
        self.timeout = timeout
        self._ftp: ftplib.FTP | None = None
        self._has_mlsd = True

    def __repr__(self) -> str:
        return f"FtpTransport({self.user}@{self.host}:{self.port})"

    def _new_client(self) -> ftplib.FTP:
        return ftplib.FTP(timeout=self.timeout)

    def connect(self) -> None:
        self._connect()

    def _connect(self) -> ftplib.FTP:
        if self._ftp is None:
            client = self._new_client()
            with self._errors(f"connect to {self.host}:{self.port}"):
                client.connect(self.host, self.port)
                try:
                    self._login(client)
                except ftplib.error_perm as exc:
                    raise TransportError(f"login as {self.user} refused by {self.host}:{self.port}: {exc}") from None
                client.set_pasv(True)
                client.voidcmd("TYPE I")
                self._has_mlsd = "MLST" in client.sendcmd("FEAT").upper()
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
                entries = _mlsd(ftp, path) if self._has_mlsd else _nlst(ftp, path)
        except TransportError:
            if not self._is_folder(path):
                raise RemoteFolderMissing(folder) from None  # servers answer a missing folder with 550 or 501
            raise
        if not entries and not self._is_folder(path):  # vsftpd lists a missing folder as an empty one
            raise RemoteFolderMissing(folder)
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
            full = disk_full(exc, what)
            if full is not None:
                raise full from exc
            self._drop()
            raise TransportError(f"{what}: connection failed: {exc or type(exc).__name__}", retryable=True) from exc


def _mlsd(ftp: ftplib.FTP, path: str) -> list[RemoteEntry]:
    """Parse MLSD ourselves, so that a line that is not "facts; name" (a name with a line break in it) is
    reported instead of silently dropped."""
    lines: list[str] = []
    with suppress(ftplib.error_perm):  # servers that do not know OPTS MLST send their default facts
        ftp.sendcmd("OPTS MLST type;size;modify;")
    ftp.retrlines(f"MLSD {path}", lines.append)
    entries = []
    for line in lines:
        facts_text, space, name = line.partition(" ")
        facts = dict(fact.partition("=")[::2] for fact in facts_text.rstrip(";").lower().split(";") if fact)
        if not space or "type" not in facts:
            entries.append(RemoteEntry(line, 0, None, f"unreadable listing line {line!r} (a name with a line break?)"))
        elif facts["type"] == "file":
            entries.append(RemoteEntry(name, int(facts.get("size") or 0), _mlsd_time(facts.get("modify"))))
    return entries


def _nlst(ftp: ftplib.FTP, path: str) -> list[RemoteEntry]:
    """For servers without MLSD (vsftpd): names, then SIZE (which folders fail) and MDTM for each."""
    prefix = path.rstrip("/") + "/"
    entries = []
    for raw in ftp.nlst(path):
        name = raw[len(prefix) :] if raw.startswith(prefix) else raw
        try:
            size = ftp.size(posixpath.join(path, name))
        except ftplib.error_perm:
            continue  # a folder
        modified = ftp.sendcmd(f"MDTM {posixpath.join(path, name)}").split()[-1]
        entries.append(RemoteEntry(name, size or 0, _mlsd_time(modified)))
    return entries


def _mlsd_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


class _SessionReusingFtpTls(ftplib.FTP_TLS):
    """FTP_TLS whose data connections resume the control connection's TLS session.

    Servers such as vsftpd with ``require_ssl_reuse=YES`` refuse a data connection that starts a new session
    (it proves the data connection belongs to the logged-in control connection); ftplib does not reuse it.
    """

    def ntransfercmd(self, cmd: str, rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:  # type: ignore[attr-defined]
            session = self.sock.session  # type: ignore[union-attr]
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
        return conn, size


class FtpsTransport(FtpTransport):
    """FTP with explicit TLS (AUTH TLS), a verified certificate and a protected data channel."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        ca_file: Path | None = None,
        root: str = "",
        timeout: float = 30.0,
    ) -> None:
        super().__init__(host, port, user, password, root=root, timeout=timeout)
        self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.3 sessions arrive after the handshake, and vsftpd then refuses data connections that should
        # reuse them ("522 session reuse required"): stay on TLS 1.2, which every FTPS server speaks.
        self.context.maximum_version = ssl.TLSVersion.TLSv1_2

    def __repr__(self) -> str:
        return f"FtpsTransport({self.user}@{self.host}:{self.port})"

    def _new_client(self) -> ftplib.FTP:
        return _SessionReusingFtpTls(context=self.context, timeout=self.timeout)

    def _login(self, client: ftplib.FTP) -> None:
        assert isinstance(client, ftplib.FTP_TLS)
        try:
            client.login(self.user, self._password)  # sends AUTH TLS first
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                f"the certificate of {self.host}:{self.port} is not trusted ({exc.verify_message}); "
                "name the CA that signed it in the profile's ca_file"
            ) from None
        client.prot_p()
