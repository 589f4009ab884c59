"""Reads queries' rows from a SQLite file with ADBC, in a process of its own, and hands them out as Arrow.

Why a process of its own: the ADBC driver carries its own copy of SQLite, and a second copy in the process that
writes through Python's sqlite3 module reads stale rows (seen here: a row updated and committed a moment before
read as it was; SQLite's "How To Corrupt", 2.2.1, warns against two copies in one process). A process of its
own also reads while the exporter works on the rows already read. It lives as long as the process that started
it (one per database file, started on first use), so each query costs no start-up::

    with SqliteReader.of("crm.sqlite").query("SELECT ...") as batches:
        for batch in batches:          # pyarrow.RecordBatch
            ...

The child speaks a small framed protocol over its pipes: the parent writes a query (4-byte length, UTF-8
text); the child answers with frames of a tag byte and an 8-byte length: ``S`` the schema, ``B`` a record
batch, ``E`` the end, ``X`` an error's text. It uses ADBC's low-level API: the DB-API module imports pandas.
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
KEPT = 8  # reader processes kept waiting for queries (an export may have one per list at work)
AHEAD = 4  # batches read ahead of the exporter: about 50 MB at 65k rows
FRAME = struct.Struct(">cQ")
QUERY = struct.Struct(">I")


class ReaderError(RuntimeError):
    """The reader process could not run the query (its message), or died."""


class SqliteReader:
    """The reader process of one SQLite file; one query at a time (a lock serialises the callers)."""

    _readers: ClassVar[dict[tuple[str, str], SqliteReader]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._submitted: str | None = None  # a query sent ahead whose answer is not read yet

    @classmethod
    def of(cls, path: str, slot: str = "") -> SqliteReader:
        """The reader of ``path``; the least recently asked of more than KEPT readers is stopped (a daemon has
        one database or a few; a process that opens many, such as a test run, keeps no crowd of them)."""
        with cls._registry_lock:
            reader = cls._readers.pop((path, slot), None) or cls(path)
            cls._readers[path, slot] = reader  # the most recently asked last
            while len(cls._readers) > KEPT:
                path_of_oldest = next(iter(cls._readers))
                oldest = cls._readers[path_of_oldest]
                if not oldest._lock.acquire(blocking=False):
                    break  # it is reading: leave it for now
                try:
                    del cls._readers[path_of_oldest]
                    oldest._stop()
                finally:
                    oldest._lock.release()
            return reader

    def submit(self, sql: str) -> None:
        """Send the query now, so that the reader process works on it (SQLite sorts a list's rows before the
        first one comes) while the caller does other work; :meth:`query` with the same text reads the answer."""
        if not self._lock.acquire(blocking=False):
            return  # busy: the query is sent when it is asked
        try:
            if self._submitted is None:
                self._send(sql)
                self._submitted = sql
        finally:
            self._lock.release()

    @contextmanager
    def query(self, sql: str) -> Iterator[Iterator[Any]]:
        import pyarrow as pa

        with self._lock:
            if self._submitted is not None and self._submitted != sql:
                self._stop()  # another query's answer is waiting: a new process rather than read it
            if self._submitted != sql:
                self._send(sql)
            self._submitted = None
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

    def _send(self, sql: str) -> None:
        process = self._started()
        assert process.stdin is not None
        data = sql.encode("utf-8")
        try:
            process.stdin.write(QUERY.pack(len(data)) + data)
            process.stdin.flush()
        except OSError as exc:
            self._stop()
            raise ReaderError(f"the SQLite reader process is gone: {exc}") from None

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            command = [sys.executable, "-m", "batchsync.engine.sqlitereader", self.path]
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._process

    def _stop(self) -> None:
        self._submitted = None
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
        self._thread = threading.Thread(target=self._pump, args=(batches,), name="sqlite-read-ahead", daemon=True)
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


def serve(path: str, requests: IO[bytes], answers: IO[bytes]) -> None:
    """Answer queries until the parent closes the pipe. Each query opens the file anew (a few milliseconds): a
    connection kept open would go on reading a file that was deleted or replaced under the same name."""
    import adbc_driver_manager
    import adbc_driver_sqlite
    import pyarrow as pa

    while head := requests.read(QUERY.size):
        sql = requests.read(QUERY.unpack(head)[0]).decode("utf-8")
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
        # A 64 MB page cache: the sort of a list's rows by address stays in memory far longer (a 1M-contact list
        # read in 5.6 s rather than 9.7 s, at 180 MB); a bigger list spills to disk, in the same memory.
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
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
