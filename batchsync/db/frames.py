"""Frames (polars) into and out of the database, on the connection's own transaction: the set-based import's
transport. Statements are written with ``?`` (``driver``), times are aware UTC in a frame and stored as
``schema.UtcDateTime`` stores them (naive UTC; text on SQLite).

Measured on the bench's 100k unsubscribes (``bench/bench_sync.py``), and why each way was chosen:

- PostgreSQL: rows go in by COPY of the frame as CSV (written by polars; psycopg's row by row ``write_row`` cost
  more than the COPY), into the table itself or a temporary table that one INSERT ... SELECT or UPDATE ... FROM
  applies; keys to look up go as one array parameter.
- SQLite: executemany of the frame's rows, into the table itself (no COPY, and a temporary table filled the same
  way only adds its own insert). ADBC's bulk ingest binds faster, but only on a connection of its own: its
  rows are not in this transaction, and a scratch file attached to share them is locked by this transaction's
  first read of it, so a second batch could not be written to it.
- Reading, on both: the driver's own cursor, rows turned into columns; times read by polars where they have the
  form batchsync writes, by ``driver.read_time`` (Python) where they do not.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import polars as pl
from sqlalchemy import Connection

from batchsync.db import driver

TIME = pl.Datetime("us", "UTC")
_STORED = "%Y-%m-%d %H:%M:%S%.6f"  # driver.stored_time's text
FETCH = 20_000  # rows fetched at a time
_CANONICAL = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$"


def postgres(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


def stored(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with its times as the database stores them: naive UTC, text in the stored form (SQLite, and
    the CSV a COPY reads)."""
    times = [name for name, kind in frame.schema.items() if isinstance(kind, pl.Datetime)]
    naive = [pl.col(name).dt.convert_time_zone("UTC").dt.replace_time_zone(None) for name in times]
    return frame.with_columns(expr.dt.strftime(_STORED) for expr in naive)


def insert(connection: Connection, table: str, frame: pl.DataFrame) -> None:
    """INSERT every row of ``frame`` into ``table`` (SQL text), its columns named as the frame's."""
    if frame.is_empty():
        return
    rows = stored(frame)
    if postgres(connection):
        copy_csv(connection, table, rows)
        return
    executemany(
        connection, f"INSERT INTO {table} ({', '.join(rows.columns)}) VALUES ({driver.marks(rows.width)})", rows
    )


def update(
    connection: Connection, table: str, frame: pl.DataFrame, keys: Sequence[str], *, staging: str, constant: str = ""
) -> None:
    """``UPDATE table SET (the frame's other columns) [, constant] WHERE keys`` for each row; a key twice: the
    last row stands, as one statement at a time would have it. PostgreSQL stages the rows in the temporary
    table ``staging`` (made like ``table``) and applies them in one UPDATE ... FROM."""
    if frame.is_empty():
        return
    # In key order: the table's B-tree is walked forward, not jumped about (a tenth faster on SQLite).
    rows = frame.unique(subset=list(keys), keep="last", maintain_order=True).sort(list(keys))
    columns = [name for name in rows.columns if name not in keys]
    extra = f", {constant}" if constant else ""
    if postgres(connection):
        stage(connection, staging, rows, like=table)
        sets = ", ".join(f"{name} = u.{name}" for name in columns)
        where = " AND ".join(f"t.{name} = u.{name}" for name in keys)
        connection.exec_driver_sql(f"UPDATE {table} AS t SET {sets}{extra} FROM {staging} AS u WHERE {where}")
        return
    ordered = stored(rows.select(*columns, *keys))
    sets = ", ".join(f"{name} = ?" for name in columns)
    where = " AND ".join(f"{name} = ?" for name in keys)
    executemany(connection, f"UPDATE {table} SET {sets}{extra} WHERE {where}", ordered)


def stage(connection: Connection, name: str, frame: pl.DataFrame, *, like: str | None = None) -> None:
    """The temporary table ``name`` holds ``frame``: made (once per session) with the columns of ``like`` where
    given, else typed from the frame, and emptied first."""
    columns = ", ".join(frame.columns)
    if like is not None:
        shape = f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} AS SELECT {columns} FROM {like} WHERE 1 = 0"
    else:
        typed = ", ".join(f"{column} {_sql_type(kind, connection)}" for column, kind in frame.schema.items())
        shape = f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} ({typed})"
    connection.exec_driver_sql(shape)
    connection.exec_driver_sql(f"TRUNCATE {name}" if postgres(connection) else f"DELETE FROM {name}")
    rows = stored(frame)
    if postgres(connection):
        copy_csv(connection, name, rows)
        connection.exec_driver_sql(f"ANALYZE {name}")  # a join with it is planned from its real size
    elif not rows.is_empty():
        executemany(connection, f"INSERT INTO {name} ({columns}) VALUES ({driver.marks(rows.width)})", rows)


def executemany(connection: Connection, statement: str, rows: pl.DataFrame) -> None:
    """The statement for each row, by the driver's own cursor, the rows handed over as they are made (a list of
    them all, as SQLAlchemy's executemany wants, held a copy of the batch)."""
    cursor: Any = connection.connection.cursor()  # sqlite3's takes any iterable, not only a sequence
    try:
        cursor.executemany(statement, rows.iter_rows())
    finally:
        cursor.close()


def _sql_type(kind: Any, connection: Connection) -> str:
    if isinstance(kind, pl.Datetime):
        return "TIMESTAMP" if postgres(connection) else "TEXT"
    if kind.is_integer():
        return "BIGINT" if postgres(connection) else "INTEGER"
    return "BOOLEAN" if kind == pl.Boolean else "TEXT"


def copy_csv(connection: Connection, table: str, frame: pl.DataFrame) -> None:
    """PostgreSQL's COPY FROM STDIN of the frame as CSV (an empty field is NULL, ``""`` an empty text)."""
    raw = connection.connection.driver_connection
    assert raw is not None
    data = io.BytesIO()
    frame.write_csv(data, include_header=False)
    statement = f"COPY {table} ({', '.join(frame.columns)}) FROM STDIN (FORMAT csv)"
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        copy.write(data.getbuffer())


@dataclass(frozen=True)
class Among:
    """A lookup of a table's rows by values a frame holds (see :func:`among`)."""

    name: str  # SQLite: the temporary table holding the frame's rows
    columns: tuple[str, ...]
    values: list[Any]  # the statement's parameters (PostgreSQL: the first column's values, as one array)
    postgres: bool

    def source(self, table: str, alias: str) -> str:
        """What the statement reads FROM: on SQLite the frame's rows first, joined in that order (CROSS JOIN)."""
        return f"{table} AS {alias}" if self.postgres else f"{self.name} CROSS JOIN {table} AS {alias}"

    def where(self, alias: str) -> str:
        if self.postgres:
            return f"{alias}.{self.columns[0]} = ANY(?)"
        return " AND ".join(f"{alias}.{column} = {self.name}.{column}" for column in self.columns)


def among(connection: Connection, name: str, frame: pl.DataFrame) -> Among:
    """The rows of a table whose columns hold a row of ``frame`` (the frame's column names are the table's):
    SQLite joins them from the frame's rows, staged in the temporary table ``name`` (an IN list would outgrow
    its limit on parameters, and without statistics on such a table it scanned the big one instead);
    PostgreSQL finds them by the first column alone, ``= ANY`` of one array (faster there than a join with the
    array unnested, which it sorted to merge), so the caller joins what comes back with its rows."""
    if postgres(connection):
        return Among(name, tuple(frame.columns), [frame[frame.columns[0]].unique().to_list()], True)
    stage(connection, name, frame)
    return Among(name, tuple(frame.columns), [], False)


def fetch(connection: Connection, statement: str, values: Sequence[Any], schema: dict[str, Any]) -> pl.DataFrame:
    """The rows of ``statement`` as a frame of ``schema`` (its columns in the statement's order). They are
    fetched and turned into columns a slice at a time: the driver's row objects are the bulk of the memory."""
    cursor = connection.connection.cursor()
    parts = []
    try:
        marks = "?" if connection.dialect.paramstyle == "qmark" else "%s"  # as driver.query writes it
        cursor.execute(statement.replace("?", marks), tuple(values))
        while rows := cursor.fetchmany(FETCH):
            columns = zip(*rows, strict=True)
            data = {name: _column(kind, list(got)) for (name, kind), got in zip(schema.items(), columns, strict=True)}
            parts.append(pl.DataFrame(data, schema=schema))
    finally:
        cursor.close()
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _column(kind: Any, values: list[Any]) -> pl.Series:
    return _times(values) if kind == TIME else pl.Series(values, dtype=kind)


def _times(values: Sequence[Any]) -> pl.Series:
    """Stored times as aware UTC: text of the form batchsync writes and naive datetimes (PostgreSQL's) are read
    by polars, anything else by ``driver.read_time``."""
    first = next((value for value in values if value is not None), None)
    if isinstance(first, datetime) and all(value is None or value.tzinfo is None for value in values):
        return pl.Series(values, dtype=pl.Datetime("us")).dt.replace_time_zone("UTC")
    if not isinstance(first, str):
        return pl.Series([driver.read_time(value) for value in values], dtype=TIME)
    text = pl.Series("text", values, dtype=pl.String)
    others = text.filter(~text.str.contains(_CANONICAL).fill_null(True)).unique()
    read = pl.Series([driver.read_time(value) for value in others], dtype=TIME)
    frame = text.to_frame().with_columns(
        canonical=pl.col("text").str.contains(_CANONICAL),
        parsed=pl.col("text").str.to_datetime(_STORED, strict=False).dt.replace_time_zone("UTC"),
        slow=pl.col("text").replace_strict(others, read, default=None, return_dtype=TIME),
    )
    return frame.select(pl.when(pl.col("canonical")).then(pl.col("parsed")).otherwise(pl.col("slow")))[:, 0]
