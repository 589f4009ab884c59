"""The CRM rows of one list, read as Arrow record batches and handed out in partitions of whole addresses.

The rows come from the database in address-key order (code-point order on every backend) through an ADBC
driver: SQLite's and PostgreSQL's (COPY in binary) write Arrow directly, so no row becomes a Python object.
A partition ends where the key changes, so an address's contacts always travel together::

    with arrow_batches(engine, list_rows_sql(connection, place, custom=True, groups=True, segment=False)) as batches:
        for rows, last_key in partitions(batches, 100_000):
            ...  # rows: a polars DataFrame of ROW_COLUMNS; last_key None for the last partition
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow as pa
from sqlalchemy import Connection, Engine, Integer, String, Text, and_, case, cast, func, literal, null, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.sql import ColumnElement, FromClause

from batchsync.db.crm import ordered_key
from batchsync.db.mapping import CrmTables, crm_tables
from batchsync.db.schema import bs_provider_optouts
from batchsync.engine.sqlitereader import ReadAhead, ReaderError, SqliteReader
from batchsync.errors import DatabaseError, first_line

GROUP_SEP = "\x1f"
AHEAD_POSTGRESQL = 2  # batches a PostgreSQL read holds ahead of the exporter (each list's, when all are asked)
ROW_COLUMNS = (
    "contact_id",
    "email",
    "email_key",
    "first_name",
    "last_name",
    "custom",
    "status",
    "source",
    "suppressed",
    "codes",
    "consent_at",
    "opt_out_at",
)


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
    through ADBC in a reader process of its own (``engine.sqlitereader`` says why). Either is read by a
    thread a few batches ahead of the caller; a query :func:`read_ahead` started is taken up where it is."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        ahead = _postgresql_started.pop((str(url), slot, sql), None) or _postgresql_ahead(engine, sql)
        try:
            yield iter(ahead)
        finally:
            ahead.stop()
        return
    try:
        with SqliteReader.of(url.database or ":memory:", slot).query(sql) as batches:
            yield batches
    except ReaderError as exc:
        raise DatabaseError(f"cannot read the CRM's rows: {exc}") from None


_postgresql_started: dict[tuple[str, str, str], ReadAhead] = {}


def read_ahead(engine: Engine, sql: str, slot: str) -> None:
    """Start the query now (SQLite: in the slot's reader process; PostgreSQL: on a connection of its own, in a
    thread), so that the database works on it while the caller builds another list's rows;
    :func:`arrow_batches` with the same text and slot takes its rows."""
    if engine.url.get_backend_name() == "sqlite":
        SqliteReader.of(engine.url.database or ":memory:", slot).submit(sql)
    elif (str(engine.url), slot, sql) not in _postgresql_started:
        _postgresql_started[str(engine.url), slot, sql] = _postgresql_ahead(engine, sql)


def forget_read_ahead(engine: Engine) -> None:
    """Stop the reads started for the engine that no one took up (an export stopped before their lists)."""
    for key in [key for key in _postgresql_started if key[0] == str(engine.url)]:
        _postgresql_started.pop(key).stop()


def _postgresql_ahead(engine: Engine, sql: str) -> ReadAhead:
    return ReadAhead(_postgresql_batches(engine, sql), AHEAD_POSTGRESQL)


def _postgresql_batches(engine: Engine, sql: str) -> Iterator[pa.RecordBatch]:
    import adbc_driver_postgresql.dbapi as postgresql

    try:
        url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with postgresql.connect(url) as connection, connection.cursor() as cursor:
            cursor.execute(sql)
            yield from cursor.fetch_record_batch()
    except Exception as exc:  # the driver's errors, translated where they arise
        raise DatabaseError(f"cannot read the CRM's rows: {first_line(exc)}") from None


def list_rows_sql(connection: Connection, place: ListPlace, *, custom: bool, groups: bool, segment: bool) -> str:
    """The SQL that reads the list's live contacts (every live contact, for a ``segment`` list) with their
    subscription, suppression, group codes, consent and the provider's remembered opt-out, by key then id."""
    t = crm_tables(connection)
    c, s, o = t.contacts.c, t.subscriptions.c, bs_provider_optouts.c
    codes, group_table = _group_codes(connection, t, place.list_id) if groups else (null(), None)
    suppressed = t.suppressions.c.email_key.is_not(None)
    consent = case((and_(s.consent_by.is_not(None), s.consent_by != ""), s.consent_at), else_=null())
    texts: list[ColumnElement[Any]] = [
        c.email,
        c.email_key,
        c.first_name,
        c.last_name,
        (cast(c.custom, Text) if custom else null()).label("custom"),
        s.status,
        s.source,
    ]
    later: list[ColumnElement[Any]] = [codes.label("codes"), consent.label("consent_at"), o.at.label("opt_out_at")]
    if connection.dialect.name == "sqlite":
        # SQLite's ADBC driver takes a column's type from its first batch of rows: a column NULL there would be
        # read as integers, and its first text later fail. Text columns come as '' instead (NULL again below).
        texts = [func.coalesce(text, "").label(text.name) for text in texts]
        later = [func.coalesce(text, "").label(text.name) for text in later]
    columns: list[ColumnElement[Any]] = [
        c.id.label("contact_id"),
        *texts[:7],
        case((suppressed, 1), else_=0).label("suppressed"),
        *later,
    ]
    on_list = and_(s.contact_id == c.id, s.list_id == place.list_id)
    rows: FromClause = t.contacts.join(t.subscriptions, on_list, isouter=segment)
    rows = rows.outerjoin(t.suppressions, t.suppressions.c.email_key == c.email_key)
    if group_table is not None:
        rows = rows.outerjoin(group_table, group_table.c.contact_id == c.id)
    opted_out = and_(o.profile == place.profile, o.list_code == place.code, o.email_key == c.email_key)
    rows = rows.outerjoin(bs_provider_optouts, opted_out)
    query = select(*columns).select_from(rows).where(c.deleted.is_(False))
    query = query.order_by(ordered_key(c.email_key, connection), c.id)
    return str(query.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))


def _group_codes(connection: Connection, t: CrmTables, list_id: int) -> tuple[ColumnElement[Any], FromClause]:
    """Each contact's group codes on the list, in code order, joined by GROUP_SEP: the list's memberships
    aggregated once into a derived table."""
    groups, members = t.groups, t.group_members
    memberships = select(members.c.contact_id, groups.c.code).join(
        groups, and_(groups.c.id == members.c.group_id, groups.c.list_id == literal(list_id, Integer))
    )
    if connection.dialect.name == "sqlite":  # group_concat takes the rows in the order given
        memberships = memberships.order_by(members.c.contact_id, groups.c.code)
    listed = memberships.subquery()
    if connection.dialect.name == "postgresql":
        joined = func.string_agg(listed.c.code, aggregate_order_by(literal(GROUP_SEP, String), listed.c.code))
    else:
        joined = func.group_concat(listed.c.code, GROUP_SEP)
    per_contact = select(listed.c.contact_id, joined.label("codes")).group_by(listed.c.contact_id).subquery()
    return per_contact.c.codes, per_contact


def partitions(batches: Iterator[pa.RecordBatch], target_rows: int) -> Iterator[tuple[pl.DataFrame, str | None]]:
    """The rows in partitions of about ``target_rows``, each ending where the key changes, with the partition's
    last key (None for the last partition: every key after the one before)."""
    pending: list[pl.DataFrame] = []
    held = 0
    for batch in batches:
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        pending.append(frame)
        held += len(frame)
        if held < target_rows:
            continue
        rows = pl.concat(pending, how="vertical_relaxed")
        last = rows["email_key"][-1]
        cut = rows["email_key"].search_sorted(last, side="left")
        if cut == 0:
            continue  # one address fills the partition: keep reading
        yield normalised(rows[:cut]), rows["email_key"][cut - 1]
        pending, held = [rows[cut:]], len(rows) - cut
    rest = pl.concat(pending, how="vertical_relaxed") if pending else pl.DataFrame()
    yield normalised(rest), None


def normalised(frame: pl.DataFrame) -> pl.DataFrame:
    """The same columns and types whatever the backend gave: times as UTC datetimes, flags as booleans."""
    if not len(frame.columns):
        frame = pl.DataFrame({name: [] for name in ROW_COLUMNS})
    return frame.select(
        pl.col("contact_id").cast(pl.Int64),
        pl.col("email").cast(pl.String),
        pl.col("email_key").cast(pl.String),
        pl.col("first_name").cast(pl.String),
        pl.col("last_name").cast(pl.String),
        *(_none_if_empty(name) for name in ("custom", "status", "source", "codes")),
        pl.col("suppressed").cast(pl.Int64).fill_null(0).cast(pl.Boolean),
        _time(frame, "consent_at"),
        _time(frame, "opt_out_at"),
    ).select(ROW_COLUMNS)


def _none_if_empty(name: str) -> pl.Expr:
    text = pl.col(name).cast(pl.String)
    return pl.when(text == "").then(None).otherwise(text).alias(name)


def _time(frame: pl.DataFrame, name: str) -> pl.Expr:
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
