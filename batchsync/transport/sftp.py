"""SFTP with paramiko: host key checked against a known_hosts file, key or password auth, streamed transfers.

The host key check is done here rather than by paramiko's SSHClient policies so that the refusal says exactly
what a person needs: the known_hosts file, the host, the key's fingerprint, and how to trust it. There is no
auto-add. Native errors become :class:`TransportError`: a refused host key, authentication or permission is
final; a reset connection or a timeout may be retried, on a new connection.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import posixpath
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import paramiko

from batchsync.errors import RemoteFolderMissing, TransportError, disk_full
from batchsync.transport.base import RemoteEntry, Transport

log = logging.getLogger(__name__)
BLOCK = 32 * 1024  # the largest read OpenSSH's server answers in one packet
WINDOW = 4 * 1024 * 1024  # reads in flight on a download: bounds memory


@dataclass(frozen=True)
class SftpCredentials:
    """The SFTP login: a user with a password or a private key (and its passphrase); shown without secrets."""

    user: str
    password: str | None = None
    key_file: Path | None = None
    key_passphrase: str | None = None

    def __repr__(self) -> str:  # never show a secret, even in a traceback
        return f"SftpCredentials(user={self.user!r}, key_file={self.key_file!r})"


class HostKeyRefused(TransportError):
    """The server's host key is unknown or has changed: never retried, never accepted silently."""


def fingerprint(key: paramiko.PKey) -> str:
    """The OpenSSH-style SHA256 fingerprint of a key, as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class SftpTransport(Transport):
    """SFTP over paramiko; connects on first use, checking the host key, and again after a broken connection."""

    def __init__(
        self,
        host: str,
        port: int,
        credentials: SftpCredentials,
        known_hosts: Path,
        *,
        root: str = "",
        timeout: float = 30.0,
        keepalive: int = 30,
    ) -> None:
        self.host, self.port, self.credentials, self.known_hosts = host, port, credentials, known_hosts
        self.root = root.rstrip("/")
        self.timeout, self.keepalive = timeout, keepalive
        self._ssh: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None

    def __repr__(self) -> str:
        return f"SftpTransport({self.credentials.user}@{self.host}:{self.port})"

    # --- connection -------------------------------------------------------------------------------------

    def connect(self) -> None:
        self._client()

    def _client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            with self._errors(f"connect to {self.host}:{self.port}"):
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
                ssh = paramiko.Transport(sock)
                ssh.banner_timeout = ssh.auth_timeout = self.timeout
                try:
                    ssh.start_client(timeout=self.timeout)
                    self._check_host_key(ssh.get_remote_server_key())
                    self._authenticate(ssh)
                    ssh.set_keepalive(self.keepalive)
                    client = paramiko.SFTPClient.from_transport(ssh)
                except BaseException:
                    ssh.close()
                    raise
                if client is None:
                    raise paramiko.SSHException("the server opened no SFTP session")
                client.get_channel().settimeout(self.timeout)  # type: ignore[union-attr]
                self._ssh, self._sftp = ssh, client
        return self._sftp

    def _host_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _check_host_key(self, offered: paramiko.PKey) -> None:
        known = paramiko.HostKeys()
        try:
            known.load(str(self.known_hosts))
        except FileNotFoundError:
            pass
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyRefused(f"cannot read known_hosts file {self.known_hosts}: {exc}") from None
        name, print_ = self._host_name(), fingerprint(offered)
        entries: dict[str, paramiko.PKey] = dict(known.lookup(name) or {})
        if not entries:
            raise HostKeyRefused(
                f"unknown host key for {name}: {offered.get_name()} {print_} is not in {self.known_hosts}. "
                f"If that fingerprint is the server's, trust it with: "
                f"ssh-keyscan -p {self.port} {self.host} >> {self.known_hosts}"
            )
        expected = entries.get(offered.get_name())
        if expected is None or expected.asbytes() != offered.asbytes():
            known_prints = ", ".join(f"{kind} {fingerprint(key)}" for kind, key in entries.items())
            raise HostKeyRefused(
                f"HOST KEY CHANGED for {name}: the server offers {offered.get_name()} {print_}, but {self.known_hosts} "
                f"holds {known_prints}. Someone may be intercepting the connection; if the server's key really "
                f"changed, remove the old line from {self.known_hosts} and add the new key."
            )

    def _authenticate(self, ssh: paramiko.Transport) -> None:
        creds = self.credentials
        try:
            if creds.key_file is not None:
                ssh.auth_publickey(creds.user, self._load_key(creds.key_file, creds.key_passphrase))
            elif creds.password is not None:
                ssh.auth_password(creds.user, creds.password)
            else:
                raise TransportError("no SFTP credentials: set key_file or a password reference in the profile")
        except paramiko.AuthenticationException:
            raise TransportError(f"authentication as {creds.user} refused by {self.host}:{self.port}") from None

    @staticmethod
    def _load_key(path: Path, passphrase: str | None) -> paramiko.PKey:
        """Any OpenSSH or PEM private key (ed25519, ECDSA, RSA); errors never repeat the passphrase."""
        try:
            return paramiko.PKey.from_path(path, passphrase.encode() if passphrase else None)  # type: ignore[arg-type]
        except OSError as exc:
            raise TransportError(f"cannot read the key {path}: {exc.strerror or type(exc).__name__}") from None
        except paramiko.PasswordRequiredException:
            raise TransportError(f"the key {path} needs a passphrase: set key_passphrase_env or _file") from None
        except (ValueError, TypeError, paramiko.SSHException):
            if passphrase:
                raise TransportError(f"cannot open the key {path}: wrong passphrase, or not a private key") from None
            raise TransportError(f"cannot open the key {path}: not an OpenSSH or PEM private key") from None

    def close(self) -> None:
        sftp, ssh, self._sftp, self._ssh = self._sftp, self._ssh, None, None
        for handle in (sftp, ssh):
            if handle is not None:
                with suppress(OSError, EOFError, paramiko.SSHException):
                    handle.close()

    # --- operations -------------------------------------------------------------------------------------

    def _full(self, remote: str) -> str:
        return posixpath.join(self.root, remote.lstrip("/")) if self.root else remote.lstrip("/") or "."

    def list(self, folder: str) -> list[RemoteEntry]:
        client = self._client()
        try:
            with self._errors(f"list {folder}"):
                attributes = client.listdir_attr(self._full(folder))
        except TransportError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                raise RemoteFolderMissing(folder) from None
            raise
        entries = [
            RemoteEntry(item.filename, item.st_size or 0, _mtime(item.st_mtime))
            for item in attributes
            if item.st_mode is not None and stat.S_ISREG(item.st_mode)
        ]
        return sorted(entries, key=lambda entry: entry.name)

    def upload(self, local: Path, remote: str) -> None:
        client = self._client()
        self._makedirs(posixpath.dirname(self._full(remote)))
        with self._errors(f"upload {remote}"), local.open("rb") as source:
            client.putfo(source, self._full(remote), file_size=local.stat().st_size, confirm=True)

    def download(self, remote: str, local: Path) -> None:
        """Pipelined reads, one window at a time: paramiko's own prefetch keeps every block it has asked for in
        memory (357 MB of RSS for a 300 MB file in bench/bench_transfer.py) and reads one block per round trip
        without it (5 MB/s)."""
        client = self._client()
        with (
            self._errors(f"download {remote}"),
            local.open("wb") as target,
            client.open(self._full(remote), "rb") as source,
        ):
            size = source.stat().st_size or 0
            for start in range(0, size, WINDOW):
                end = min(start + WINDOW, size)
                blocks = [(offset, min(BLOCK, end - offset)) for offset in range(start, end, BLOCK)]
                for data in source.readv(blocks):
                    target.write(data)

    def size(self, remote: str) -> int:
        client = self._client()
        with self._errors(f"size of {remote}"):
            return client.stat(self._full(remote)).st_size or 0

    def rename(self, source: str, target: str) -> None:
        client = self._client()
        self._makedirs(posixpath.dirname(self._full(target)))
        with self._errors(f"rename {source} to {target}"):
            try:
                client.posix_rename(self._full(source), self._full(target))
            except OSError as exc:
                if "not supported" not in str(exc).lower():
                    raise
                client.rename(self._full(source), self._full(target))

    def delete(self, remote: str) -> None:
        client = self._client()
        with self._errors(f"delete {remote}"):
            client.remove(self._full(remote))

    def _makedirs(self, folder: str) -> None:
        if not folder or folder in (".", "/"):
            return
        client = self._client()
        built = "/" if folder.startswith("/") else ""
        for part in [p for p in folder.split("/") if p]:
            built = posixpath.join(built, part) if built else part
            with self._errors(f"create folder {built}"):
                try:
                    client.stat(built)
                except FileNotFoundError:
                    client.mkdir(built)

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except TransportError:
            raise
        except PermissionError as exc:
            raise TransportError(f"{what}: permission denied by the server", retryable=False) from exc
        except FileNotFoundError as exc:
            raise TransportError(f"{what}: no such file or folder", retryable=False) from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            full = disk_full(exc, what)
            if full is not None:
                raise full from exc
            self.close()
            message = str(exc) or type(exc).__name__
            raise TransportError(f"{what}: connection failed: {message}", retryable=True) from exc


def _mtime(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)
