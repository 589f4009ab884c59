"""Statements sent to the database driver directly, for the hot paths of a sync.

SQLAlchemy Core compiles and binds a statement per execution; with thousands of keys in an IN list, or
executemany over hundreds of thousands of rows, that costs more than the database work. These helpers write
the same SQL with the driver's own placeholders and convert times the way ``schema.UtcDateTime`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Select, column, insert, table


def _sql(connection: Connection, statement: str) -> str:
    """``statement`` is written with ``?``; psycopg wants ``%s``."""
    return statement if connection.dialect.paramstyle == "qmark" else statement.replace("?", "%s")


def marks(count: int) -> str:
    return ", ".join("?" * count)


def one_of(connection: Connection, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column`` is one of ``values``: the condition and its parameters. PostgreSQL takes the values as one
    array (parsing and binding thousands of parameters cost it more than the lookups); SQLite as an IN list."""
    if connection.dialect.name == "postgresql":
        return f"{column} = ANY(?)", [list(values)]
    return f"{column} IN ({marks(len(values))})", list(values)


def query(connection: Connection, statement: str, values: Sequence[Any] = ()) -> list[Sequence[Any]]:
    """All rows at once from the driver's own cursor (SQLAlchemy's row-by-row fetching costs more than the
    query on a hot path); for lookups whose result fits in memory."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(_sql(connection, statement), tuple(values))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def execute_many(connection: Connection, statement: str, rows: Iterable[Sequence[Any]]) -> None:
    batch = [tuple(row) for row in rows]
    if batch:
        connection.exec_driver_sql(_sql(connection, statement), batch)


def insert_many(connection: Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Insert rows (values in ``columns`` order): COPY on PostgreSQL, where executemany pays a round of the
    protocol per row; executemany elsewhere."""
    if connection.dialect.name == "postgresql":
        copy_rows(connection, table, columns, rows)
    else:
        execute_many(connection, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks(len(columns))})", rows)


def update_many(
    connection: Connection,
    table: str,
    columns: Sequence[str],
    keys: Sequence[str],
    rows: Iterable[Sequence[Any]],
    constant: str = "",
    *,
    staging: str | None = None,
) -> None:
    """``UPDATE table SET columns [, constant] WHERE keys`` for each row (the columns' values, then the keys').

    On PostgreSQL the rows go by COPY into a temporary table (``staging``; default ``bs_update_<table>``, for a
    plain name) and one UPDATE ... FROM applies them; when a key comes twice, its last row wins, as it would one
    statement at a time. ``table`` is SQL text (a quoted, perhaps schema-qualified, name: see ``db.mapping``);
    so is ``copy_rows``' and ``insert_many``'."""
    batch = [tuple(row) for row in rows]
    if not batch:
        return
    extra = f", {constant}" if constant else ""
    if connection.dialect.name != "postgresql":
        sets = ", ".join(f"{name} = ?" for name in columns)
        where = " AND ".join(f"{name} = ?" for name in keys)
        execute_many(connection, f"UPDATE {table} SET {sets}{extra} WHERE {where}", batch)
        return
    last = {row[len(columns) :]: row for row in batch}
    names = [*columns, *keys]
    staging = staging or f"bs_update_{table}"
    connection.exec_driver_sql(
        f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} AS SELECT {', '.join(names)} FROM {table} WITH NO DATA"
    )
    connection.exec_driver_sql(f"TRUNCATE {staging}")
    copy_rows(connection, staging, names, last.values())
    sets = ", ".join(f"{name} = u.{name}" for name in columns)
    where = " AND ".join(f"t.{name} = u.{name}" for name in keys)
    connection.exec_driver_sql(f"UPDATE {table} AS t SET {sets}{extra} FROM {staging} AS u WHERE {where}")


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
    return _stored_time(moment, connection.dialect.name == "sqlite")


def read_time(value: Any) -> datetime | None:
    """A stored time back as an aware UTC datetime."""
    if value is None:
        return None
    return _read_time(value)


# Memoized: an import writes the same few moments (the run's time, a file's event times) on every row.
@lru_cache(maxsize=65536)
def _stored_time(moment: datetime, as_text: bool) -> Any:
    naive = moment.astimezone(UTC).replace(tzinfo=None)
    return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if as_text else naive


@lru_cache(maxsize=65536)
def _read_time(value: Any) -> datetime:
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def tune_for_bulk(connection: Connection) -> None:
    """Settings for this transaction only, on PostgreSQL: no JIT (compiling each of a diff's big queries took
    a second of its four) and sorts and hashes held in memory rather than spilled to disk (a 1M-row list's
    sort spilled 43 MB at the default 4 MB)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL jit = off")
        connection.exec_driver_sql("SET LOCAL work_mem = '64MB'")


def prefer_index_lookups(connection: Connection) -> None:
    """For the rest of the transaction, on PostgreSQL: rows found by index cost little more than rows read in
    order. A diff reads a few thousand addresses of a list; at the default cost the planner scanned the whole
    list (0.3 s) rather than look them up (0.03 s)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL random_page_cost = 1.1")


def temporary_table(connection: Connection, name: str, columns: str, *, rowid: bool = False) -> None:
    """An empty temporary table of this session, ``columns`` its SQL column list (created on first use). On
    SQLite it is WITHOUT ROWID (its primary key is how it is looked up), unless ``rowid``."""
    suffix = " WITHOUT ROWID" if connection.dialect.name == "sqlite" and not rowid else ""
    connection.exec_driver_sql(f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} ({columns}){suffix}")
    connection.exec_driver_sql(f"DELETE FROM {name}")


def drop_temporary(connection: Connection, *names: str) -> None:
    """Drop this session's temporary tables ``names``, if there: a pooled connection would keep them, rows and
    all, until it is closed."""
    schema = "pg_temp" if connection.dialect.name == "postgresql" else "temp"
    for name in names:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {schema}.{name}")


def temporary_table_as(
    connection: Connection, name: str, query: Select[Any], columns: str, *, rowid: bool = False
) -> None:
    """The temporary table ``name`` := the rows of ``query``. PostgreSQL makes it by CREATE TABLE AS, which it
    may plan in parallel where the query reads no temporary table (INSERT ... SELECT, never), and is given the
    table's statistics.
    SQLite makes the table of ``columns`` first (see :func:`temporary_table`): it joins only by looking rows
    up, so the keys are declared."""
    if connection.dialect.name != "postgresql":
        temporary_table(connection, name, columns, rowid=rowid)
        names = [selected.name for selected in query.selected_columns]
        connection.execute(insert(table(name, *(column(n) for n in names))).from_select(names, query))
        return
    compiled = query.compile(dialect=connection.dialect)
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    connection.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} AS {compiled}", compiled.params)
    connection.exec_driver_sql(f"ANALYZE {name}")
