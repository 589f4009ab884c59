"""The transport contract: a few file operations on a remote folder tree, whatever the protocol.

Remote paths are POSIX strings relative to the transport's root. Names read from a listing are data, never
paths: :func:`check_remote_name` refuses anything but a plain file name. Implementations translate their native
errors into :class:`~batchsync.errors.TransportError` at this boundary, each marked retryable or not; whether and
when an operation is tried again is :class:`~batchsync.transport.retry.RetryPolicy`'s alone.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from batchsync.errors import RemoteFolderMissing, TransportError, UnsafeRemoteName

log = logging.getLogger(__name__)
__all__ = ["RemoteEntry", "RemoteFolderMissing", "Transport", "check_remote_name", "upload_confirmed"]


@dataclass(frozen=True)
class RemoteEntry:
    """One plain file in a remote listing: its name, size and time."""

    name: str
    size: int
    mtime: datetime | None  # aware UTC, or None where the server does not say
    problem: str | None = None  # a listing line that could not be read as a file: reported, never taken


class Transport(ABC):
    """One connection to one provider drop."""

    # A listed file is whole (an API's reports, written before they are listed): collect need not look twice.
    lists_whole_files: bool = False

    @abstractmethod
    def connect(self) -> None:
        """Connect and authenticate now (every operation does so on first use): a wrong password or an
        unreachable server is found even when there is nothing to send."""

    @abstractmethod
    def list(self, folder: str) -> list[RemoteEntry]:
        """The plain files in ``folder`` (not folders); :class:`RemoteFolderMissing` when the folder does not
        exist: an inbox that is not there is a mistake to report, never an empty inbox."""

    @abstractmethod
    def upload(self, local: Path, remote: str) -> None:
        """Stream ``local`` to ``remote``, creating missing parent folders."""

    @abstractmethod
    def download(self, remote: str, local: Path) -> None:
        """Stream ``remote`` into ``local``."""

    @abstractmethod
    def size(self, remote: str) -> int:
        """The size in bytes of a remote file."""

    @abstractmethod
    def rename(self, source: str, target: str) -> None:
        """Rename within the server, creating the target's parent folders."""

    @abstractmethod
    def delete(self, remote: str) -> None:
        """Remove a remote file."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; safe to call twice."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def check_remote_name(name: str) -> str:
    """Refuse a listed name that is not a plain file name (``/``, ``..``, NUL or control characters)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or ".." in name:
        raise UnsafeRemoteName(f"refused remote name {name!r}: not a plain file name")
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise UnsafeRemoteName(f"refused remote name {name!r}: it holds control characters")
    return name


def upload_confirmed(transport: Transport, local: Path, remote: str, temp_suffix: str = ".part") -> int:
    """Upload under a temporary name, check the remote size, then rename to ``remote``.

    The final name only ever holds a whole file. Returns the confirmed size.
    """
    temporary = remote + temp_suffix
    expected = local.stat().st_size
    try:
        transport.upload(local, temporary)
        found = transport.size(temporary)
        if found != expected:
            raise TransportError(f"upload of {remote} not confirmed: {found} bytes on the server, {expected} sent")
        transport.rename(temporary, remote)
    except TransportError:
        _remove_quietly(transport, temporary)
        raise
    return expected


def _remove_quietly(transport: Transport, remote: str) -> None:
    try:
        transport.delete(remote)
    except TransportError as exc:
        log.warning("could not remove the partial upload %s: %s", remote, exc)
