"""A callback's journal: every accepted call's rows, appended and fsynced before the provider gets its answer,
then cut into inbox files that take the path every file takes (ledger, rules, audit, reports, safety stop)::

    journal = Journal(work / "callbacks", "mailchimp")
    await journal.append(rows)                  # in the listener: returns once the rows are on disk
    cut = journal.cut(inbox, "callback_mailchimp")  # in the daemon (or `serve`): the file made, or None

Appends from many requests at once are written and fsynced together (one fsync for all that came meanwhile),
so a burst costs a few fsyncs, not one per call. A cut renames the journal aside first (new calls go to a new
journal), writes the inbox file under a temporary name, fsyncs it and renames it into place, and only then
removes the part cut: a process killed anywhere in between leaves either the journal or its ``.cut`` part,
which the next cut takes up again under the same file name, with the same content. A file cut twice is
therefore the same file: the content-hash ledger applies it once.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

from batchsync.hookconfig import CUT_COLUMNS
from batchsync.hookformats import HookRow

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.path = folder / f"{name}.journal"
        self._lock = threading.Lock()  # the listener's writer thread and the daemon's cut
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing = False
        self._task: asyncio.Task[None] | None = None
        self.rows_waiting = 0  # rows appended and not cut yet (for /metrics)
        self.waiting_since: float | None = None  # time.monotonic() of the oldest row not cut yet

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
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            self.rows_waiting += data.count(b"\n")
            self.waiting_since = self.waiting_since or time.monotonic()

    def has_rows(self) -> bool:
        """Whether there is anything to cut: rows in the journal, or a part a stopped cut left."""
        return self.path.is_file() or (self.folder.is_dir() and any(self.folder.glob(f"{self.path.name}.*.cut")))

    def cut(self, inbox: Path, kind: str, stamp: str) -> list[Path]:
        """Turn what the journal holds (and any part a stopped cut left) into inbox files; their paths."""
        with self._lock:
            if self.path.is_file() and self.path.stat().st_size:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.{stamp}.cut"))
            self.rows_waiting, self.waiting_since = 0, None
        parts = sorted(self.folder.glob(f"{self.path.name}.*.cut")) if self.folder.is_dir() else []
        return [self._finish(part, inbox, kind) for part in parts]

    def _finish(self, part: Path, inbox: Path, kind: str) -> Path:
        stamp = part.name[len(self.path.name) + 1 : -len(".cut")]
        target = inbox / f"{kind}_{stamp}.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CUT_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        for line in part.read_bytes().splitlines():
            if line.strip():
                writer.writerow(json.loads(line))
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


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
