"""Reads queries' rows from SQLite files with ADBC, in processes of their own, and hands them out as Arrow.

Why a process of its own: the ADBC driver carries its own copy of SQLite, and a second copy in the process that
writes through Python's sqlite3 module reads stale rows (seen here: a row updated and committed a moment before
read as it was; SQLite's "How To Corrupt", 2.2.1, warns against two copies in one process). A process of its
own also reads while the exporter works on the rows already read, and several read side by side, one per
*slot*. A slot's process lives as long as the process that started it and serves any database file, so a
query costs no start-up::

    with SqliteReader.of("contacts").query("crm.sqlite", "SELECT ...") as batches:
        for batch in batches:          # pyarrow.RecordBatch
            ...

The child speaks a small framed protocol over its pipes: the parent writes a query (the file's path and the SQL,
each a 4-byte length and UTF-8 text); the child answers with frames of a tag byte and an 8-byte length: ``S``
the schema, ``B`` a record batch, ``E`` the end, ``X`` an error's text. It uses ADBC's low-level API: the
DB-API module imports pandas.
"""

from __future__ import annotations

import atexit
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Full, Queue
from typing import IO, Any, ClassVar

BATCH_ROWS = 65_536  # the driver's default of 1024 costs a conversion each
CACHE_KB = 65_536
AHEAD = 4  # batches read ahead of the exporter: about 50 MB at 65k rows
FRAME = struct.Struct(">cQ")
QUERY = struct.Struct(">I")


class ReaderError(RuntimeError):
    """The reader process could not run the query (its message), or died."""


class SqliteReader:
    """The reader process of one slot; one query at a time (a lock serialises the callers)."""

    _readers: ClassVar[dict[str, SqliteReader]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def of(cls, slot: str = "") -> SqliteReader:
        """The slot's reader (an export uses a few slots, the same ones every time)."""
        with cls._registry_lock:
            return cls._readers.setdefault(slot, cls())

    @contextmanager
    def query(self, path: str, sql: str) -> Iterator[Iterator[Any]]:
        import pyarrow as pa

        with self._lock:
            self._send(path, sql)
            process = self._process
            assert process is not None and process.stdout is not None
            ahead = ReadAhead(_answer(process.stdout, pa), AHEAD)
            batches = iter(ahead)
            try:
                yield batches
                for _ in batches:  # the caller stopped early: read the rest, so the next answer starts clean
                    pass
            except BaseException:
                self._stop()  # the answer may be half read: a new process for the next query
                ahead.stop()
                raise

    def _send(self, path: str, sql: str) -> None:
        process = self._started()
        assert process.stdin is not None
        where, what = path.encode("utf-8"), sql.encode("utf-8")
        try:
            process.stdin.write(QUERY.pack(len(where)) + where + QUERY.pack(len(what)) + what)
            process.stdin.flush()
        except OSError as exc:
            self._stop()
            raise ReaderError(f"the SQLite reader process is gone: {exc}") from None

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            command = [sys.executable, "-m", "batchsync.engine.sqlitereader"]
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    @classmethod
    def stop_all(cls) -> None:
        with cls._registry_lock:
            for reader in cls._readers.values():
                reader._stop()
            cls._readers.clear()


def _answer(stream: IO[bytes], pa: Any) -> Iterator[Any]:
    schema = None
    while True:
        head = stream.read(FRAME.size)
        if len(head) < FRAME.size:
            raise ReaderError("the SQLite reader process stopped in the middle of an answer")
        tag, size = FRAME.unpack(head)
        body = stream.read(size)
        if tag == b"E":
            return
        if tag == b"X":
            raise ReaderError(body.decode("utf-8", "replace"))
        if tag == b"S":
            schema = pa.ipc.read_schema(pa.py_buffer(body))
        else:
            yield pa.ipc.read_record_batch(pa.py_buffer(body), schema)


class ReadAhead:
    """The batches, read by a thread of their own up to ``depth`` ahead of the caller: the reader process keeps
    querying while the caller builds rows (reading a pipe releases the interpreter)."""

    _DONE = object()

    def __init__(self, batches: Iterator[Any], depth: int) -> None:
        self._queue: Queue[Any] = Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(batches,), name="read-ahead", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Any]:
        while (item := self._queue.get()) is not self._DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _pump(self, batches: Iterator[Any]) -> None:
        try:
            for batch in batches:
                self._put(batch)
            self._put(self._DONE)
        except BaseException as exc:  # handed to the caller's thread
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except Full:
                continue

    def stop(self) -> None:
        """The caller gives up (its reader process is being killed): the thread ends without a reader."""
        self._stopped.set()
        self._thread.join(5)


atexit.register(SqliteReader.stop_all)


# --- the child process -----------------------------------------------------------------------------------------


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer queries until the parent closes the pipe. Each query opens the file anew (a few milliseconds): a
    connection kept open would go on reading a file that was deleted or replaced under the same name."""
    import adbc_driver_manager
    import adbc_driver_sqlite
    import pyarrow as pa

    while head := requests.read(QUERY.size):
        path = requests.read(QUERY.unpack(head)[0]).decode("utf-8")
        sql = requests.read(QUERY.unpack(requests.read(QUERY.size))[0]).decode("utf-8")
        try:
            with (
                adbc_driver_sqlite.connect(path) as database,
                adbc_driver_manager.AdbcConnection(database) as connection,
            ):
                _answer_one(connection, sql, answers, adbc_driver_manager, pa)
        except Exception as exc:  # any failure goes back to the parent as text
            _frame(answers, b"X", f"{type(exc).__name__}: {exc}".encode())
        answers.flush()


def _answer_one(connection: Any, sql: str, answers: IO[bytes], adbc: Any, pa: Any) -> None:
    with adbc.AdbcStatement(connection) as pragma:
        # A 64 MB page cache: a sort (the group memberships by contact) stays in memory far longer; a bigger one
        # spills to disk, in the same memory.
        pragma.set_sql_query(f"PRAGMA cache_size = -{CACHE_KB}")
        pragma.execute_update()
    with adbc.AdbcStatement(connection) as statement:
        statement.set_options(**{"adbc.sqlite.query.batch_rows": str(BATCH_ROWS)})
        statement.set_sql_query(sql)
        stream, _ = statement.execute_query()
        reader = pa.RecordBatchReader._import_from_c(stream.address)
        _frame(answers, b"S", reader.schema.serialize())
        for batch in reader:
            _frame(answers, b"B", batch.serialize())
        _frame(answers, b"E", b"")


def _frame(answers: IO[bytes], tag: bytes, body: Any) -> None:
    data = memoryview(body)
    answers.write(FRAME.pack(tag, data.nbytes))
    answers.write(data)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
