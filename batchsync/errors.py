"""The error tree of batchsync.

Library code raises these; only ``cli.py`` turns them into messages and exit codes.
"""

from __future__ import annotations

import errno


class BatchsyncError(Exception):
    """Base of every error batchsync raises on purpose."""

    exit_code = 1


class ConfigError(BatchsyncError):
    """A profile or a command line that cannot be used as given."""

    exit_code = 2


class TransportError(BatchsyncError):
    """A transfer failed. ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False, wait: float = 0.0) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.wait = wait  # seconds the server asked for before a new try (an API's Retry-After, its rate window)


class UnsafeRemoteName(TransportError):
    """A name from a remote listing that is not a plain file name."""


class RemoteFolderMissing(TransportError):
    """A remote folder that does not exist (never retried: a mistyped folder does not appear by waiting)."""

    def __init__(self, folder: str) -> None:
        super().__init__(f"remote folder {folder!r} does not exist on the server")
        self.folder = folder


class BadFile(BatchsyncError):
    """An inbound file that cannot be trusted as a whole: it goes to quarantine."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DatabaseError(BatchsyncError):
    """The CRM database cannot be reached or is not in the expected shape."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (down, restarting, the network cut): waiting and trying again may help."""


class LockLost(BatchsyncError):
    """The session holding the profile's run lock died: another run may hold it now, so this one writes nothing
    more."""


class DiskFull(BatchsyncError):
    """A local disk (or quota) is full: trying again does not help until someone frees space."""


FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(exc: BaseException, where: str) -> DiskFull | None:
    """The DiskFull for an OS error that says the disk is full, else None."""
    if isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS:
        name = exc.filename or where
        return DiskFull(
            f"no space left on the disk writing {name}: free some space (or raise the quota), then run again"
        )
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (a driver's errors run to several), or its type's name."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RevertRefused(BatchsyncError):
    """A revert that cannot be made as asked: the file was reverted already, or was never applied."""
