"""A callback's journal: every accepted call's rows, appended and fsynced before the provider gets its answer,
then cut into inbox files that take the path every file takes (ledger, rules, audit, reports, safety stop)::

    journal = Journal(work / "callbacks", "mailchimp")
    await journal.append(rows)                         # in the listener: returns once the rows are on disk
    made = journal.cut(inbox, "callback_mailchimp", stamp)   # the inbox files made (a cutter thread calls it)

Appends from many requests at once are written and fsynced together (one fsync for all that came meanwhile),
so a burst costs a few fsyncs, not one per call. Writing and cutting hold an ``flock`` on ``NAME.lock``, so a
daemon and a ``serve`` sharing the folder never cut a journal under a writer. A cut renames the journal aside
first (new calls go to a new journal), writes the inbox file under a temporary name, fsyncs it and renames it
into place, and only then removes the part cut: a process killed anywhere in between leaves either the journal
or its ``.cut`` part, which the next cut takes up again under the same file name, with the same content. A file
cut twice is therefore the same file: the content-hash ledger applies it once.

A write that failed half way (a full disk; those calls were answered 503) may leave a line without its end: the
next write starts on a fresh line, and a cut skips a line it cannot read, saying so, and goes on.
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from batchsync.hookconfig import CUT_COLUMNS
from batchsync.hookformats import HookRow

log = logging.getLogger(__name__)


class Journal:
    """One callback's journal file: rows appended (fsynced in batches) by the listener, cut into inbox files by the
    cutter."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.path = folder / f"{name}.journal"
        self._lock = threading.Lock()  # the listener's writer thread and the cutter thread, in one process
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing = False
        self._task: asyncio.Task[None] | None = None
        self.waiting_since: float | None = None  # time.monotonic() of the oldest row not cut yet, in this process

    async def append(self, rows: list[HookRow]) -> None:
        """Write the rows as JSON lines; return once they are fsynced (raises OSError when they cannot be)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        data = b"".join(json.dumps(row.cells(), ensure_ascii=False).encode() + b"\n" for row in rows)
        self._pending.append((data, done))
        if not self._flushing:
            self._flushing = True
            self._task = loop.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(None, self._write, b"".join(data for data, _ in batch))
                except OSError as exc:
                    for _, done in batch:
                        done.set_exception(exc)
                else:
                    for _, done in batch:
                        done.set_result(None)
        finally:
            self._flushing = False

    def _write(self, data: bytes) -> None:
        with self._locked():
            created = not self.path.exists()
            with self.path.open("ab") as handle:
                if not created and _ends_torn(self.path):
                    data = b"\n" + data  # a failed write left half a line: it stays a line of its own
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if created:
                _fsync_folder(self.folder)
            self.waiting_since = self.waiting_since or time.monotonic()

    def rows_waiting(self) -> int:
        """Rows in the journal and in parts not finished, read from the disk (the backlog, for /metrics)."""
        files = [self.path, *self._parts()]
        return sum(path.read_bytes().count(b"\n") for path in files if path.is_file())

    def has_rows(self) -> bool:
        return self.path.is_file() or bool(self._parts())

    def cut(self, inbox: Path, kind: str, stamp: str) -> list[Path]:
        """Turn what the journal holds, and any part a stopped cut left, into inbox files; their paths. A part
        that cannot be finished is left for the next cut, and the others go on."""
        made = []
        with self._locked():
            if self.path.is_file() and self.path.stat().st_size:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.{stamp}.cut"))
            elif self.path.is_file():
                self.path.unlink()
            for part in self._parts():
                try:
                    made.append(self._finish(part, inbox, kind))
                except OSError as exc:
                    log.error("callback %s: cannot cut %s yet: %s", self.name, part.name, exc.strerror or exc)
            left = bool(self._parts())  # a part that could not be finished waits, and says so after a while
            self.waiting_since = (self.waiting_since or time.monotonic()) if left else None
        return made

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.path.name}.*.cut")) if self.folder.is_dir() else []

    def _finish(self, part: Path, inbox: Path, kind: str) -> Path:
        stamp = part.name[len(self.path.name) + 1 : -len(".cut")]
        target = inbox / f"{kind}.{stamp}.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CUT_COLUMNS, lineterminator="\r\n", extrasaction="ignore")
        writer.writeheader()
        for number, line in enumerate(part.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                writer.writerow(json.loads(line))
            except (ValueError, TypeError, AttributeError):
                log.error(
                    "callback %s: %s line %d is not a whole row (a write that failed): skipped",
                    self.name,
                    part.name,
                    number,
                )
        temporary = inbox / f".{target.name}.part"
        inbox.mkdir(parents=True, exist_ok=True)
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_folder(inbox)
        part.unlink()
        log.info("callbacks cut into %s", target.name)
        return target

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's threads, then the other processes sharing the folder (a daemon and a `serve`)."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / f"{self.name}.lock").open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)


def _ends_torn(path: Path) -> bool:
    size = path.stat().st_size
    if not size:
        return False
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) != b"\n"


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
