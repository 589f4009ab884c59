"""One run at a time per profile, on one host or many.

Where the CRM is SQLite, a ``flock`` on ``WORK/.lock``; where it is PostgreSQL, a session advisory lock held
on a connection of its own, so that daemons on several hosts sharing one CRM never run a profile at once.
Both are released by the operating system or the server when their process dies, so a dead process never
leaves a stale lock behind::

    with profile_lock(profile, engine):
        ...  # raises LockBusy at once when another run holds it
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text

from batchsync.config import Profile
from batchsync.errors import BatchsyncError


class LockBusy(BatchsyncError):
    """Another run of this profile is in progress."""


def advisory_key(profile_name: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock."""
    digest = hashlib.blake2b(f"batchsync:{profile_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextmanager
def profile_lock(profile: Profile, engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with _advisory_lock(profile.name, engine):
            yield
    else:
        with _file_lock(profile.name, profile.work_dir / ".lock"):
            yield


@contextmanager
def _file_lock(name: str, path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(f"profile {name}: another run is in progress (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _advisory_lock(name: str, engine: Engine) -> Iterator[None]:
    key = advisory_key(name)
    with engine.connect() as connection:
        got = connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
        connection.commit()
        if not got:
            raise LockBusy(f"profile {name}: another run is in progress (PostgreSQL advisory lock {key})")
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()
