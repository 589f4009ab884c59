"""The export ledger: per profile and list, a snapshot of what the provider has from us, written once per export.

A snapshot is one row per address (``CHUNK_SCHEMA``): its key, the address as sent, the contact it came from,
the fingerprint of the row's content, the status the provider has it in, why (origin) and when it was sent.
It is stored as sorted, LZ4-compressed Arrow chunks in ``bs_snapshot_chunks``: an export writes a new
*generation* while it makes the file (state "pending"), and one small commit makes it current once the upload
is confirmed (:func:`commit`). A crash in between leaves the current generation as it was, so the same rows go
out again next time; a pending generation found later is dropped (:func:`SnapshotWriter`).

What the provider reports between two exports (an opt-out, an address changed) is written as a note in
``bs_ledger_notes`` rather than into the chunks; readers fold the notes over the snapshot (:class:`LedgerStream`,
:func:`rows_for_keys`), and the next generation takes them in and deletes them::

    stream = LedgerStream.open(connection, "acme", "newsletter", hasher)
    older = stream.upto("m")          # the snapshot's rows with keys up to "m", notes folded in
    writer = SnapshotWriter.begin(connection, "acme", "newsletter", hasher, stream.notes_upto, now)
    writer.add(new_rows)              # sorted frames of CHUNK_SCHEMA, in key order
    writer.finish()
    ...                               # upload confirmed
    commit(connection, "acme", "newsletter")
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl
from sqlalchemy import Connection, Engine, and_, column, delete, func, insert, inspect, or_, select, table, update

from batchsync.db import driver
from batchsync.db.crm import ordered_key
from batchsync.db.schema import bs_ledger_notes, bs_snapshot_chunks, bs_snapshots

NOTE_KEYS = 1000  # addresses a notes query names at once
FEW_KEYS = 50  # up to this many addresses, rows_for_keys picks the chunks by key range; past it, reads them all
CHUNK_ROWS = 100_000  # rows a migrated snapshot's chunk holds (an export's chunks are its buckets)
CHUNK_SCHEMA: dict[str, Any] = {
    "email_key": pl.String,
    "email": pl.String,
    "contact_id": pl.Int64,
    "fingerprint": pl.Int64,
    "status": pl.String,
    "origin": pl.String,  # "export": what we sent; "provider": what it reported; "consent": sent as pending
    "at": pl.Datetime("us", "UTC"),
}


def empty() -> pl.DataFrame:
    return pl.DataFrame(schema=CHUNK_SCHEMA)


@dataclass
class LedgerStream:
    """The current snapshot of one list, notes folded in, handed out in key order by :meth:`upto`: the export
    reads it beside the CRM's rows, a bucket of keys at a time, so memory holds one chunk or two."""

    connection: Connection
    where: Any
    generation: int | None
    comparable: bool  # the fingerprints were made as ours are: otherwise every row looks changed
    notes: pl.DataFrame
    notes_upto: int
    _seqs: list[tuple[int, str]] = field(default_factory=list)  # (seq, first_key) of chunks not yet read
    _buffer: pl.DataFrame = field(default_factory=empty)

    @classmethod
    def open(cls, connection: Connection, profile: str, list_code: str, hasher: str) -> LedgerStream:
        s, c = bs_snapshots.c, bs_snapshot_chunks.c
        head = connection.execute(
            select(s.generation, s.hasher).where(s.profile == profile, s.list_code == list_code, s.state == "current")
        ).first()
        generation = head[0] if head else None
        where = and_(c.profile == profile, c.list_code == list_code, c.generation == generation)
        seqs = [(int(r[0]), str(r[1])) for r in connection.execute(select(c.seq, c.first_key).where(where))]
        notes, upto = _notes(connection, profile, list_code)
        comparable = head is None or head[1] == hasher
        return cls(connection, where, generation, comparable, notes, upto, sorted(seqs))

    def upto(self, last_key: str | None) -> pl.DataFrame:
        """The rows with keys up to ``last_key`` (all that are left, for None) not handed out before."""
        while self._seqs and (last_key is None or self._seqs[0][1] <= last_key):
            seq, _first = self._seqs.pop(0)
            data = self.connection.scalar(
                select(bs_snapshot_chunks.c.data).where(self.where, bs_snapshot_chunks.c.seq == seq)
            )
            assert data is not None, f"chunk {seq} of a current snapshot is gone"
            self._buffer = pl.concat([self._buffer, decode(data)])
        if last_key is None:
            taken, self._buffer = self._buffer, empty()
            notes, self.notes = self.notes, self.notes.clear()
        else:
            cut = self._buffer["email_key"].search_sorted(last_key, side="right")
            taken, self._buffer = self._buffer[:cut], self._buffer[cut:]
            ncut = self.notes["email_key"].search_sorted(last_key, side="right")
            notes, self.notes = self.notes[:ncut], self.notes[ncut:]
        rows = fold(taken, notes)
        return rows if self.comparable else rows.with_columns(fingerprint=pl.lit(None, pl.Int64))


def decode(data: bytes) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(data))


def encode(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_ipc(buffer, compression="lz4")
    return buffer.getvalue()


def _notes(
    connection: Connection, profile: str, list_code: str, keys: Sequence[str] | None = None
) -> tuple[pl.DataFrame, int]:
    """The list's notes (on ``keys`` only, when given), sorted by key then id, and the last id among them."""
    n = bs_ledger_notes.c
    query = (
        select(n.id, n.email_key, n.kind, n.email, n.contact_id, n.fingerprint, n.status, n.origin, n.at)
        .where(n.profile == profile, n.list_code == list_code)
        .order_by(n.email_key, n.id)
    )
    if keys is not None:
        query = query.where(n.email_key.in_(list(keys)))
    rows = [tuple(row) for row in connection.execute(query)]
    schema = {
        "id": pl.Int64,
        "email_key": pl.String,
        "kind": pl.String,
        **{k: v for k, v in CHUNK_SCHEMA.items() if k != "email_key"},
    }
    notes = pl.DataFrame(rows, schema=schema, orient="row").sort("email_key", "id")  # code-point order
    return notes, int(notes["id"].max() or 0) if len(notes) else 0  # type: ignore[arg-type]


def fold(rows: pl.DataFrame, notes: pl.DataFrame) -> pl.DataFrame:
    """The snapshot's ``rows`` with the ``notes`` on the same keys applied in order: the last "put" or "remove"
    of a key replaces its row; a later "status" note sets the status (origin "provider") where a row is left."""
    if not len(notes):
        return rows
    placed = notes.filter(pl.col("kind") != "status").group_by("email_key").agg(pl.all().sort_by("id").last())
    base = rows.join(placed.select("email_key"), on="email_key", how="anti")
    puts = placed.filter(pl.col("kind") == "put").select(list(CHUNK_SCHEMA))
    base = pl.concat([base, puts]).sort("email_key")
    last_place = placed.select("email_key", pl.col("id").alias("placed_id"))
    statuses = notes.filter(pl.col("kind") == "status").join(last_place, on="email_key", how="left")
    statuses = statuses.filter(pl.col("placed_id").is_null() | (pl.col("id") > pl.col("placed_id")))
    latest = statuses.group_by("email_key").agg(pl.col("status").sort_by("id").last().alias("reported"))
    base = base.join(latest, on="email_key", how="left")
    reported = pl.col("reported").is_not_null()
    return base.with_columns(
        status=pl.when(reported).then(pl.col("reported")).otherwise(pl.col("status")),
        origin=pl.when(reported).then(pl.lit("provider")).otherwise(pl.col("origin")),
    ).select(list(CHUNK_SCHEMA))


@dataclass
class SnapshotWriter:
    """A new generation of one list's snapshot, written chunk by chunk in key order, pending until committed."""

    connection: Connection
    profile: str
    list_code: str
    generation: int
    rows: int = 0
    seq: int = 0

    @classmethod
    def begin(
        cls, connection: Connection, profile: str, list_code: str, hasher: str, notes_upto: int, now: datetime
    ) -> SnapshotWriter:
        discard_pending(connection, profile, list_code)
        s = bs_snapshots.c
        latest = connection.scalar(select(func.max(s.generation)).where(s.profile == profile, s.list_code == list_code))
        generation = int(latest or 0) + 1
        connection.execute(
            insert(bs_snapshots).values(
                profile=profile,
                list_code=list_code,
                generation=generation,
                state="pending",
                rows=0,
                notes_upto=notes_upto,
                hasher=hasher,
                made_at=now,
            )
        )
        return cls(connection, profile, list_code, generation)

    def add(self, frame: pl.DataFrame) -> None:
        """A chunk of rows (CHUNK_SCHEMA, sorted by key, every key after the last chunk's)."""
        if not len(frame):
            return
        keys = frame["email_key"]
        self.connection.execute(
            insert(bs_snapshot_chunks).values(
                profile=self.profile,
                list_code=self.list_code,
                generation=self.generation,
                seq=self.seq,
                first_key=keys[0],
                last_key=keys[-1],
                rows=len(frame),
                data=encode(frame.select(list(CHUNK_SCHEMA))),
            )
        )
        self.seq += 1
        self.rows += len(frame)

    def finish(self) -> None:
        s = bs_snapshots.c
        self.connection.execute(
            update(bs_snapshots)
            .where(s.profile == self.profile, s.list_code == self.list_code, s.generation == self.generation)
            .values(rows=self.rows)
        )


def commit(connection: Connection, profile: str, list_code: str, refused: Sequence[str] = ()) -> None:
    """The upload is confirmed: the pending generation becomes current, the one before goes, and so do the notes
    it took in. A list without a pending generation is left as it is. The addresses in ``refused`` (keys the
    provider's API refused) keep what the ledger held for them before: a note puts their old row back, or
    removes the row where there was none, so the next export sends them again."""
    s = bs_snapshots.c
    mine = and_(s.profile == profile, s.list_code == list_code)
    pending = connection.execute(select(s.generation, s.notes_upto).where(mine, s.state == "pending")).first()
    if pending is None:
        return
    before = held_rows(connection, profile, list_code, refused) if refused else None
    older = [int(r[0]) for r in connection.execute(select(s.generation).where(mine, s.state == "current"))]
    _drop(connection, profile, list_code, older)
    connection.execute(update(bs_snapshots).where(mine, s.generation == pending[0]).values(state="current"))
    n = bs_ledger_notes.c
    connection.execute(
        delete(bs_ledger_notes).where(n.profile == profile, n.list_code == list_code, n.id <= pending[1])
    )
    if before is not None:
        _put_back(connection, profile, list_code, refused, before)


def held_rows(connection: Connection, profile: str, list_code: str, keys: Sequence[str]) -> pl.DataFrame:
    """What the current snapshot of one list holds for these addresses, notes folded in: only the chunks whose
    key range holds one of a few keys (every chunk of the list for many), the notes asked for a slice of keys at
    a time (a statement takes a bounded number of parameters)."""
    s, c = bs_snapshots.c, bs_snapshot_chunks.c
    wanted = sorted(set(keys))
    current = select(s.generation).where(s.profile == profile, s.list_code == list_code, s.state == "current")
    chunks = select(c.data).where(
        c.profile == profile, c.list_code == list_code, c.generation.in_(current.scalar_subquery())
    )
    if len(wanted) <= FEW_KEYS:
        chunks = chunks.where(or_(*(and_(c.first_key <= key, c.last_key >= key) for key in wanted)))
    among = pl.DataFrame({"email_key": wanted}, schema={"email_key": pl.String})
    rows = pl.concat(
        [empty(), *(decode(r[0]).join(among, on="email_key", how="semi") for r in connection.execute(chunks))]
    )
    notes = [
        _notes(connection, profile, list_code, wanted[at : at + NOTE_KEYS])[0]
        for at in range(0, len(wanted), NOTE_KEYS)
    ]
    return fold(rows.sort("email_key"), pl.concat(notes).sort("email_key", "id"))


def _put_back(connection: Connection, profile: str, list_code: str, keys: Sequence[str], before: pl.DataFrame) -> None:
    held = {row["email_key"]: row for row in before.iter_rows(named=True)}
    notes = [
        {**held[key], "list_code": list_code, "kind": "put"}
        if key in held
        else {"list_code": list_code, "email_key": key, "kind": "remove"}
        for key in sorted(set(keys))
    ]
    _add_notes(connection, profile, notes)


def discard_pending(connection: Connection, profile: str, list_code: str) -> None:
    s = bs_snapshots.c
    mine = and_(s.profile == profile, s.list_code == list_code, s.state == "pending")
    _drop(connection, profile, list_code, [int(r[0]) for r in connection.execute(select(s.generation).where(mine))])


def _drop(connection: Connection, profile: str, list_code: str, generations: Sequence[int]) -> None:
    if not generations:
        return
    s, c = bs_snapshots.c, bs_snapshot_chunks.c
    connection.execute(
        delete(bs_snapshot_chunks).where(c.profile == profile, c.list_code == list_code, c.generation.in_(generations))
    )
    connection.execute(
        delete(bs_snapshots).where(s.profile == profile, s.list_code == list_code, s.generation.in_(generations))
    )


# --- what imports and the history read and note ---------------------------------------------------------------


def note_provider_status(connection: Connection, profile: str, changes: Sequence[Mapping[str, Any]]) -> None:
    """The provider reported these statuses (rows of list_code, email_key, status): where the ledger has the
    address, it now holds the reported status, origin "provider", so that it is not echoed back."""
    if not changes:
        return
    now = driver.stored_time(connection, datetime.now().astimezone())
    driver.insert_many(
        connection,
        "bs_ledger_notes",
        ("profile", "list_code", "email_key", "kind", "status", "at"),
        ((profile, c["list_code"], c["email_key"], "status", c["status"], now) for c in changes),
    )


def rename_exported(connection: Connection, profile: str, old_key: str, new_key: str, new_email: str) -> None:
    """The provider changed an address: its ledger rows follow, so the old one is not sent as a tombstone. A
    change of letter case alone keeps the rows (their key is the same)."""
    held = rows_for_keys(connection, profile, [old_key, new_key])
    notes: list[dict[str, Any]] = []
    for row in held.iter_rows(named=True):
        if row["email_key"] == new_key and old_key != new_key:
            notes.append({**row, "kind": "remove"})
    for row in held.filter(pl.col("email_key") == old_key).iter_rows(named=True):
        if old_key != new_key:
            notes.append({**row, "kind": "remove"})
        notes.append({**row, "email_key": new_key, "email": new_email, "kind": "put"})
    _add_notes(connection, profile, notes)


def _add_notes(connection: Connection, profile: str, notes: Iterable[Mapping[str, Any]]) -> None:
    columns = ("list_code", "email_key", "kind", "email", "contact_id", "fingerprint", "status", "origin", "at")
    now = datetime.now().astimezone()
    rows = [
        (profile, *(n.get(name) for name in columns[:-1]), driver.stored_time(connection, n.get("at") or now))
        for n in notes
    ]
    driver.insert_many(connection, "bs_ledger_notes", ("profile", *columns), rows)


def rows_for_keys(connection: Connection, profile: str, keys: Sequence[str]) -> pl.DataFrame:
    """What the ledger holds for these addresses on every list of the profile, notes folded in: CHUNK_SCHEMA
    and ``list_code``. It reads only the chunks whose key range holds one of them."""
    s, c = bs_snapshots.c, bs_snapshot_chunks.c
    lists = [str(r[0]) for r in connection.execute(select(s.list_code).where(s.profile == profile).distinct())]
    n = bs_ledger_notes.c
    lists += [str(r[0]) for r in connection.execute(select(n.list_code).where(n.profile == profile).distinct())]
    found = []
    wanted = pl.DataFrame({"email_key": sorted(set(keys))}, schema={"email_key": pl.String})
    for code in sorted(set(lists)):
        current = select(s.generation).where(s.profile == profile, s.list_code == code, s.state == "current")
        chunks = select(c.data).where(
            c.profile == profile, c.list_code == code, c.generation.in_(current.scalar_subquery())
        )
        if len(wanted) <= FEW_KEYS:  # only the chunks whose key range holds one of them
            chunks = chunks.where(or_(*(and_(c.first_key <= key, c.last_key >= key) for key in wanted["email_key"])))
        frames = [decode(r[0]) for r in connection.execute(chunks)] if len(wanted) else []
        rows = pl.concat([empty(), *frames]).join(wanted, on="email_key", how="semi")
        notes, _ = _notes(connection, profile, code, wanted["email_key"].to_list())
        rows = fold(rows.sort("email_key"), notes)
        found.append(rows.with_columns(list_code=pl.lit(code)))
    return pl.concat(found) if found else empty().with_columns(list_code=pl.lit(None, pl.String))


def exported_count(connection: Connection, profile: str, list_code: str | None = None) -> int:
    """Rows in the current snapshots of the profile's lists (or of one), notes aside."""
    s = bs_snapshots.c
    query = select(func.coalesce(func.sum(s.rows), 0)).where(s.profile == profile, s.state == "current")
    if list_code is not None:
        query = query.where(s.list_code == list_code)
    return int(connection.scalar(query) or 0)


# --- from the ledger of earlier versions ----------------------------------------------------------------------

OLD_TABLES = ("bs_pending", "bs_exported")  # the row-per-address ledger before the snapshots


def migrate_exported(engine: Engine) -> int:
    """``batchsync init`` on a database an earlier version made: its ledger rows (``bs_exported``) become each
    list's current snapshot, statuses and origins as they were, and the old tables go. Their fingerprints were
    made another way (the hasher "migrated" compares with nothing), so the first diff after sends every row
    once: at least once, never an opt-out lost. Returns the rows carried over."""
    present = set(inspect(engine).get_table_names())
    if "bs_exported" not in present:
        return 0
    carried = 0
    with engine.begin() as connection:
        lists = connection.exec_driver_sql("SELECT DISTINCT profile, list_code FROM bs_exported").all()
        for profile, code in lists:
            carried += _carry_list(connection, str(profile), str(code))
        for name in OLD_TABLES:
            if name in present:
                connection.exec_driver_sql(f"DROP TABLE {name}")
    return carried


def _carry_list(connection: Connection, profile: str, code: str) -> int:
    """One list's old ledger rows, in key order, a chunk at a time, as the list's current snapshot."""
    writer = SnapshotWriter.begin(connection, profile, code, "migrated", 0, datetime.now(UTC))
    old = table("bs_exported", *(column(name) for name in CHUNK_SCHEMA), column("profile"), column("list_code"))
    query = (
        select(*(old.c[name] for name in CHUNK_SCHEMA))
        .where(old.c.profile == profile, old.c.list_code == code)
        .order_by(ordered_key(old.c.email_key, connection))
    )
    result = connection.execute(query.execution_options(stream_results=True))
    while rows := result.fetchmany(CHUNK_ROWS):
        frame = pl.DataFrame([tuple(row) for row in rows], schema=list(CHUNK_SCHEMA), orient="row")
        writer.add(frame.with_columns(_utc(frame, "at")).cast({"contact_id": pl.Int64, "fingerprint": pl.Int64}))
    writer.finish()
    commit(connection, profile, code)
    return writer.rows


def _utc(frame: pl.DataFrame, name: str) -> pl.Expr:
    """A stored time as an aware UTC datetime: SQLite keeps text, PostgreSQL naive timestamps, both in UTC."""
    if frame.schema[name] == pl.String:
        moment = pl.col(name).str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us", strict=False)
    else:
        moment = pl.col(name).cast(pl.Datetime("us"))
    return moment.dt.replace_time_zone("UTC").alias(name)
