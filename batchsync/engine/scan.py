"""The CRM's rows for every list of an export, read once and cut into ranges of the address key.

A list's rows must reach the builder in address-key order, an address's contacts together, in parts that
hold memory flat. Asking the database for each list ordered by key made it sort the list (SQLite: 2.5 s a list
at 1M contacts) or walk the key index with a random read per row (6.6 s). Instead each table is read once for
every list, in the order it is stored, and the rows are dealt into *buckets*: ranges of the key whose bounds
are quantiles of a sample of the keys, so that a bucket holds about ``export.chunk_rows`` contacts. Buckets are
spilled to Arrow IPC files in a folder of the work directory; a list is then built bucket by bucket, each
bucket's tables joined by polars and sorted by key::

    with CrmScan.read(engine, connection, profile, places, folder) as scan:
        for rows, last_key in scan.list_rows(place, segment=False):
            ...  # rows: ROW_COLUMNS, in key then contact order; last_key None for the last bucket

Contacts, subscriptions and group memberships are read side by side (three reader processes on SQLite, three
connections on PostgreSQL), each ordered by contact id, which the tables' primary keys give without a sort; a
subscription or membership takes the bucket of its contact. Suppressions and the provider's opt-outs are dealt
by their own key. The tables are read in separate transactions: a change made during the read is seen by some
of them only, and the next export sends what this one missed (each row's fingerprint is of what was sent).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import polars as pl
import pyarrow as pa
from sqlalchemy import Connection, Engine, Integer, Text, and_, case, cast, func, literal, null, select, true
from sqlalchemy.sql import ColumnElement, Select

from batchsync.config import Profile
from batchsync.db.mapping import crm_tables
from batchsync.db.schema import bs_provider_optouts
from batchsync.engine.build import FrameBuilder
from batchsync.engine.crmread import CONTACT_SCHEMA, GROUP_SEP, ROW_COLUMNS, ListPlace, arrow_batches, timestamp

STALE_SECONDS = 86_400
SAMPLE = 16_384  # keys kept to place the bounds: a bucket within a few per cent of its intended size
UTC_TIME = pl.Datetime("us", "UTC")
KINDS: dict[str, dict[str, pl.DataType]] = {
    "contacts": CONTACT_SCHEMA,
    "subscriptions": {
        "contact_id": pl.Int64(),
        "list_id": pl.Int64(),
        "status": pl.String(),
        "source": pl.String(),
        "consent_at": UTC_TIME,
    },
    "groups": {"contact_id": pl.Int64(), "list_id": pl.Int64(), "code": pl.String()},
    "suppressions": {"email_key": pl.String()},
    "optouts": {"list_code": pl.String(), "email_key": pl.String(), "opt_out_at": UTC_TIME},
}
NULL_IF_EMPTY = {"custom", "status", "source"}  # SQLite's reads give '' for NULL (crmread says why)


class CrmScan:
    """The spilled buckets of one export's read: bucket ``i`` holds the keys after ``bounds[i - 1]`` up to and
    including ``bounds[i]`` (the last bucket, every key after the last bound)."""

    def __init__(self, folder: Path, bounds: list[str]) -> None:
        self.folder = folder
        self.bounds = bounds
        self._writers: dict[tuple[int, str], pa.ipc.RecordBatchStreamWriter] = {}

    @classmethod
    def read(
        cls, engine: Engine, connection: Connection, profile: Profile, places: list[ListPlace], parent: Path
    ) -> CrmScan:
        """Read every table the lists need and spill it into buckets, in a new folder under ``parent``."""
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent)
        scan = cls(Path(tempfile.mkdtemp(prefix=".scan-", dir=parent)), [])
        try:
            scan._read(engine, connection, profile, places)
        except BaseException:
            scan.close()
            raise
        return scan

    def _read(self, engine: Engine, connection: Connection, profile: Profile, places: list[ListPlace]) -> None:
        builders = [FrameBuilder(profile, place.code) for place in places]
        queries = _Queries(connection, places, any(b.needs_custom for b in builders))
        self.bounds = _bounds(engine, connection, queries.keys(), profile.export.chunk_rows)
        with ExitStack() as stack:
            contacts = stack.enter_context(arrow_batches(engine, queries.contacts(), "contacts"))
            followers = {
                "subscriptions": _Upto(
                    stack.enter_context(arrow_batches(engine, queries.subscriptions(), "subscriptions"))
                )
            }
            if any(b.needs_groups for b in builders):
                followers["groups"] = _Upto(stack.enter_context(arrow_batches(engine, queries.groups(), "groups")))
            for batch in contacts:
                frame = self._spill_keyed(batch, "contacts")
                if not len(frame):
                    continue
                owners = frame.select("contact_id", "bucket")
                for kind, follower in followers.items():
                    rows = _typed(follower.upto(int(owners["contact_id"][-1])), kind)
                    self._spill(rows.join(owners, on="contact_id", how="inner"), kind)
        for kind, sql in (("suppressions", queries.suppressions()), ("optouts", queries.optouts(profile.name))):
            with arrow_batches(engine, sql, "contacts") as batches:
                for batch in batches:
                    self._spill_keyed(batch, kind)
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def list_rows(self, place: ListPlace, *, segment: bool) -> Iterator[tuple[pl.DataFrame, str | None]]:
        """The list's rows (ROW_COLUMNS) bucket by bucket, in key then contact order, with the bucket's last
        key (None for the last bucket); every live contact for a ``segment`` list."""
        for index in range(len(self.bounds) + 1):
            last = self.bounds[index] if index < len(self.bounds) else None
            yield self._list_bucket(index, place, segment), last

    def _list_bucket(self, index: int, place: ListPlace, segment: bool) -> pl.DataFrame:
        contacts = self._load(index, "contacts")
        subscribed = self._load(index, "subscriptions").filter(pl.col("list_id") == place.list_id).drop("list_id")
        rows = contacts.join(subscribed, on="contact_id", how="left" if segment else "inner")
        codes = (
            self._load(index, "groups")
            .filter(pl.col("list_id") == place.list_id)
            .group_by("contact_id")
            .agg(codes=pl.col("code"))  # in any order: the builder sorts each combination once
            .with_columns(pl.col("codes").list.join(GROUP_SEP))
        )
        opted = self._load(index, "optouts").filter(pl.col("list_code") == place.code).drop("list_code")
        suppressed = self._load(index, "suppressions")["email_key"]
        return (
            rows.join(codes, on="contact_id", how="left")
            .join(opted.unique("email_key"), on="email_key", how="left")
            .with_columns(suppressed=pl.col("email_key").is_in(suppressed.implode()))
            .sort("email_key", "contact_id")
            .select(ROW_COLUMNS)
        )

    def _spill_keyed(self, batch: pa.RecordBatch, kind: str) -> pl.DataFrame:
        frame = _typed(pl.from_arrow(batch), kind)
        bounds = pl.Series(self.bounds, dtype=pl.String)
        frame = frame.with_columns(bucket=bounds.search_sorted(frame["email_key"], side="left").cast(pl.Int64))
        self._spill(frame, kind)
        return frame

    def _spill(self, frame: pl.DataFrame, kind: str) -> None:
        for (index,), part in frame.partition_by("bucket", as_dict=True).items():
            table = part.drop("bucket").to_arrow()
            writer = self._writers.get((int(index), kind))
            if writer is None:
                path = self.folder / f"{index}.{kind}.arrow"
                writer = pa.ipc.new_stream(str(path), table.schema)
                self._writers[int(index), kind] = writer
            writer.write_table(table)

    def _load(self, index: int, kind: str) -> pl.DataFrame:
        path = self.folder / f"{index}.{kind}.arrow"
        if not path.exists():
            return pl.DataFrame(schema=KINDS[kind])
        with pa.ipc.open_stream(str(path)) as reader:
            frame = pl.from_arrow(reader.read_all())
        assert isinstance(frame, pl.DataFrame)
        return frame

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> CrmScan:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _remove_stale(parent: Path) -> None:
    """Spill folders a killed export left behind (a day old: no export reads for a day)."""
    for folder in parent.glob(".scan-*"):
        try:
            if time.time() - folder.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


class _Upto:
    """Rows of a stream ordered by contact id, taken up to a contact id at a time."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._batches = batches
        self._held: list[pl.DataFrame] = []
        self._done = False

    def upto(self, contact_id: int) -> pl.DataFrame:
        while not self._done and (not self._held or self._held[-1]["contact_id"][-1] <= contact_id):
            batch = next(self._batches, None)
            if batch is None:
                self._done = True
            elif batch.num_rows:
                frame = pl.from_arrow(batch)
                assert isinstance(frame, pl.DataFrame)
                self._held.append(frame.with_columns(pl.col("contact_id").cast(pl.Int64)))
        if not self._held:
            return pl.DataFrame()
        held = pl.concat(self._held, how="vertical_relaxed")
        cut = int(held["contact_id"].search_sorted(contact_id, side="right"))
        self._held = [held[cut:]] if cut < len(held) else []
        return held[:cut]


def _typed(frame: pl.DataFrame | pl.Series, kind: str) -> pl.DataFrame:
    """The frame in the kind's columns and types, whatever the backend gave."""
    assert isinstance(frame, pl.DataFrame)
    schema = KINDS[kind]
    if not frame.width:
        return pl.DataFrame(schema=schema)
    columns = []
    for name, dtype in schema.items():
        if dtype == UTC_TIME:
            columns.append(timestamp(frame, name))
        elif name in NULL_IF_EMPTY:
            text = pl.col(name).cast(pl.String)
            columns.append(pl.when(text == "").then(None).otherwise(text).alias(name))
        else:
            columns.append(pl.col(name).cast(dtype))
    return frame.select(columns)


def _bounds(engine: Engine, connection: Connection, keys_sql: str, chunk_rows: int) -> list[str]:
    """Keys that cut the contacts into buckets of about ``chunk_rows``: quantiles of an even sample of the
    keys, read in whatever order the database finds cheapest."""
    t = crm_tables(connection)
    with connection.begin():
        total = int(connection.execute(select(func.count()).select_from(t.contacts)).scalar_one())
    buckets = -(-total // chunk_rows)
    if buckets <= 1:
        return []
    every = max(1, total // SAMPLE)
    sample: list[pl.Series] = []
    with arrow_batches(engine, keys_sql, "contacts") as batches:
        for batch in batches:
            keys = pl.from_arrow(batch.column(0))
            assert isinstance(keys, pl.Series)
            sample.append(keys.cast(pl.String).gather_every(every))
    ordered = pl.concat(sample).drop_nulls().sort() if sample else pl.Series([], dtype=pl.String)
    picked = [ordered[(i * len(ordered)) // buckets] for i in range(1, buckets)] if len(ordered) else []
    return sorted(set(picked))


class _Queries:
    """The reads of one export, as SQL text for the ADBC drivers."""

    def __init__(self, connection: Connection, places: list[ListPlace], custom: bool) -> None:
        self.connection = connection
        self.t = crm_tables(connection)
        self.places = places
        self.custom = custom
        self.sqlite = connection.dialect.name == "sqlite"

    def keys(self) -> str:
        return self._sql(select(self.t.contacts.c.email_key))

    def contacts(self) -> str:
        c = self.t.contacts.c
        custom = cast(c.custom, Text) if self.custom else null()
        texts = [c.email, c.email_key, c.first_name, c.last_name, custom.label("custom")]
        query = select(c.id.label("contact_id"), *self._texts(texts)).where(c.deleted.is_(False)).order_by(c.id)
        return self._sql(query)

    def subscriptions(self) -> str:
        s = self.t.subscriptions.c
        consent = case((and_(s.consent_by.is_not(None), s.consent_by != ""), s.consent_at), else_=null())
        ids = [place.list_id for place in self.places]
        # SQLite would read a filter on list_id through the list index and then sort every row by contact: the
        # list is compared as a value instead, and the primary key gives the contact order.
        list_id: ColumnElement[Any] = s.list_id + literal(0, Integer) if self.sqlite else s.list_id
        texts = self._texts([s.status, s.source, consent.label("consent_at")])
        query = select(s.contact_id, s.list_id, *texts).where(list_id.in_(ids)).order_by(s.contact_id, s.list_id)
        return self._sql(query)

    def groups(self) -> str:
        g, m = self.t.groups, self.t.group_members
        ids = [place.list_id for place in self.places]
        query = (
            select(m.c.contact_id, g.c.list_id, g.c.code)
            .join(g, g.c.id == m.c.group_id)
            .where(g.c.list_id.in_(ids))
            .order_by(m.c.contact_id)
        )
        return self._sql(query)

    def suppressions(self) -> str:
        return self._sql(select(self.t.suppressions.c.email_key))

    def optouts(self, profile: str) -> str:
        o = bs_provider_optouts.c
        codes = [place.code for place in self.places]
        query = select(o.list_code, o.email_key, *self._texts([o.at.label("opt_out_at")]))
        return self._sql(query.where(o.profile == profile, o.list_code.in_(codes) if codes else true()))

    def _texts(self, columns: Sequence[ColumnElement[Any]]) -> list[ColumnElement[Any]]:
        """SQLite's ADBC driver takes a column's type from its first batch of rows: a column NULL there would be
        read as integers, and its first text later fail. Its nullable text columns come as '' (NULL again in
        ``_typed``)."""
        if not self.sqlite:
            return list(columns)
        return [func.coalesce(column, "").label(column.name) for column in columns]

    def _sql(self, query: Select[Any]) -> str:
        return str(query.compile(dialect=self.connection.dialect, compile_kwargs={"literal_binds": True}))
