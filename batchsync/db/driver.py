"""Statements sent to the database driver directly, for the hot paths of a sync.

SQLAlchemy Core compiles and binds a statement per execution; with thousands of keys in an IN list, or
executemany over hundreds of thousands of rows, that costs more than the database work. These helpers write
the same SQL with the driver's own placeholders and convert times the way ``schema.UtcDateTime`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection


def _sql(connection: Connection, statement: str) -> str:
    """``statement`` is written with ``?``; psycopg wants ``%s``."""
    return statement if connection.dialect.paramstyle == "qmark" else statement.replace("?", "%s")


def marks(count: int) -> str:
    return ", ".join("?" * count)


def query(connection: Connection, statement: str, values: Sequence[Any] = ()) -> Iterator[Sequence[Any]]:
    return iter(connection.exec_driver_sql(_sql(connection, statement), tuple(values)))


def execute_many(connection: Connection, statement: str, rows: Iterable[Sequence[Any]]) -> None:
    batch = [tuple(row) for row in rows]
    if batch:
        connection.exec_driver_sql(_sql(connection, statement), batch)


def copy_rows(connection: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """PostgreSQL's COPY FROM STDIN through psycopg, on the connection's own transaction."""
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor, cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def stored_time(connection: Connection, moment: datetime | None) -> Any:
    """A time as UtcDateTime stores it: naive UTC (text on SQLite, as SQLAlchemy writes it)."""
    if moment is None:
        return None
    naive = moment.astimezone(UTC).replace(tzinfo=None)
    return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if connection.dialect.name == "sqlite" else naive


def read_time(value: Any) -> datetime | None:
    """A stored time back as an aware UTC datetime."""
    if value is None:
        return None
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
