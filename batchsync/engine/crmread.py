"""Queries' rows as Arrow record batches, and the columns a list's CRM rows reach the builder in.

Rows come from the database through an ADBC driver: SQLite's and PostgreSQL's (COPY in binary) write Arrow
directly, so no row becomes a Python object. ``engine.scan`` says which queries an export asks and why::

    with arrow_batches(engine, "SELECT ...", slot="contacts") as batches:
        for batch in batches:  # pyarrow.RecordBatch
            ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
from sqlalchemy import Engine

from batchsync.engine.sqlitereader import ReadAhead, ReaderError, SqliteReader
from batchsync.errors import DatabaseError, first_line

GROUP_SEP = "\x1f"
AHEAD_POSTGRESQL = 2  # batches a PostgreSQL read holds ahead of the exporter
BATCH_HINT = "adbc.postgresql.batch_size_hint_bytes"
BATCH_BYTES = 4 << 20  # PostgreSQL batches of about 4 MB (1M contacts: peak 465 MB rather than 575 MB)
# A contact's columns as the scan reads them, and the columns a list's CRM rows reach the builder in (the
# contact's, then its subscription's, suppression, groups and consent), with their types.
CONTACT_SCHEMA: dict[str, pl.DataType] = {
    "contact_id": pl.Int64(),
    "email": pl.String(),
    "email_key": pl.String(),
    "first_name": pl.String(),
    "last_name": pl.String(),
    "custom": pl.String(),
}
ROW_SCHEMA: dict[str, pl.DataType] = {
    **CONTACT_SCHEMA,
    "status": pl.String(),
    "source": pl.String(),
    "suppressed": pl.Boolean(),
    "codes": pl.String(),
    "consent_at": pl.Datetime("us", "UTC"),
    "opt_out_at": pl.Datetime("us", "UTC"),
}
ROW_COLUMNS = tuple(ROW_SCHEMA)


@dataclass(frozen=True)
class ListPlace:
    """A list as one profile exports it: the CRM list's id, and the profile and code its provider opt-outs are
    remembered under."""

    profile: str
    code: str
    list_id: int


@contextmanager
def arrow_batches(engine: Engine, sql: str, slot: str = "") -> Iterator[Iterator[pa.RecordBatch]]:
    """The query's rows as Arrow record batches: from PostgreSQL through ADBC (COPY in binary), from SQLite
    through ADBC in the slot's reader process (``engine.sqlitereader`` says why). Either is read by a thread a
    few batches ahead of the caller, so that queries in different slots are read side by side."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        ahead = _postgresql_ahead(engine, sql)
        try:
            yield iter(ahead)
        finally:
            ahead.stop()
        return
    try:
        with SqliteReader.of(slot).query(os.path.abspath(url.database or ""), sql) as batches:
            yield batches
    except ReaderError as exc:
        raise DatabaseError(f"cannot read the CRM's rows: {exc}") from None


def _postgresql_ahead(engine: Engine, sql: str) -> ReadAhead:
    return ReadAhead(_postgresql_batches(engine, sql), AHEAD_POSTGRESQL)


def _postgresql_batches(engine: Engine, sql: str) -> Iterator[pa.RecordBatch]:
    import adbc_driver_postgresql.dbapi as postgresql

    try:
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with postgresql.connect(url) as connection, connection.cursor() as cursor:
            # The driver's default of 16 MB batches, three tables read at once and a few batches held ahead of
            # the exporter, made most of the PostgreSQL export's peak memory.
            cursor.adbc_statement.set_options(**{BATCH_HINT: str(BATCH_BYTES)})
            cursor.execute(sql)
            yield from cursor.fetch_record_batch()
    except Exception as exc:  # the driver's errors, translated where they arise
        raise DatabaseError(f"cannot read the CRM's rows: {first_line(exc)}") from None


def timestamp(frame: pl.DataFrame, name: str) -> pl.Expr:
    """A stored time as an aware UTC datetime: SQLite keeps text (as SQLAlchemy writes it), PostgreSQL naive
    timestamps, both in UTC."""
    column = pl.col(name)
    dtype = frame.schema[name]
    if dtype == pl.String:
        parsed = (
            pl.when(column == "")
            .then(None)
            .otherwise(column)
            .str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us", strict=False)
        )
        return parsed.dt.replace_time_zone("UTC").alias(name)
    if isinstance(dtype, pl.Datetime):
        moment = column.cast(pl.Datetime("us"))
        if dtype.time_zone is None:
            return moment.dt.replace_time_zone("UTC").alias(name)
        return moment.dt.convert_time_zone("UTC").alias(name)
    return column.cast(pl.Datetime("us", "UTC")).alias(name)
