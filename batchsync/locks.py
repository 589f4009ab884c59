"""One run at a time per profile, on one host or many.

Where the CRM is SQLite, a ``flock`` on ``WORK/.lock``; where it is PostgreSQL, a session advisory lock held
on a connection of its own, so that daemons on several hosts sharing one CRM never run a profile at once.
Both are released by the operating system or the server when their process dies, so a dead process never
leaves a stale lock behind::

    with profile_lock(profile, engine):
        ...  # raises LockBusy at once when another run holds it

Surprise, written down: a PostgreSQL session can die under a live process (``pg_terminate_backend``, the
server's ``idle_session_timeout``, a restart, a cut network), and the advisory lock dies with it while the run
goes on; another run may then take the lock. So while the lock is held, every commit through the engine first
checks the lock's session (one ``SELECT 1``) and raises :class:`LockLost` instead of committing, and the export
calls :func:`ensure_lock_held` before each upload. The lock's connection has TCP keepalives (see make_engine), so
a cut network is noticed too.
"""

from __future__ import annotations

import fcntl
import hashlib
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import SQLAlchemyError

from batchsync.config import Profile
from batchsync.errors import BatchsyncError, LockLost, first_line

# The check of each engine whose run lock this process holds (PostgreSQL only).
_held: weakref.WeakKeyDictionary[Engine, Callable[[], None]] = weakref.WeakKeyDictionary()


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
        check = _session_check(name, connection)
        _held[engine] = check

        def before_commit(other: Connection) -> None:
            if other is not connection:
                check()

        event.listen(engine, "commit", before_commit)
        try:
            yield
        finally:
            event.remove(engine, "commit", before_commit)
            _held.pop(engine, None)
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
            except SQLAlchemyError:
                connection.invalidate()  # the session is gone, and its lock with it


def _session_check(name: str, connection: Connection) -> Callable[[], None]:
    lost: list[str] = []

    def check() -> None:
        if not lost:
            try:
                connection.execute(text("SELECT 1"))
                connection.commit()
                return
            except SQLAlchemyError as exc:
                lost.append(first_line(exc))
        raise LockLost(
            f"profile {name}: the database session holding the run lock ended ({lost[0]}); another run may hold "
            "the lock now, so this run stopped before writing more. The next run carries on."
        )

    return check


def ensure_lock_held(engine: Engine) -> None:
    """Raise LockLost when the session of this engine's run lock has ended (a no-op where none is held)."""
    check = _held.get(engine)
    if check is not None:
        check()
