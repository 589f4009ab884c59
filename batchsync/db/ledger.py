"""batchsync's own tables: runs, the inbound file ledger, the export ledger and the audit trail.

The export ledger is advanced in two steps: the exporter stages what it sent in ``bs_pending`` while it writes
the file, and :func:`commit_pending` moves it into ``bs_exported`` in one transaction once the upload is
confirmed. A crash in between leaves ``bs_exported`` as it was, so the same rows go out again next time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    column,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    table,
    text,
    update,
)

from batchsync.db import driver
from batchsync.db.crm import ordered_key
from batchsync.db.schema import bs_exported, bs_files, bs_pending, bs_runs

TOMBSTONE = "tombstone"
CURRENT = table("bs_current", column("email_key"), column("digest"), column("contacts"), column("sendable"))
DIFF_KEYS = table("bs_diff_keys", column("email_key"))
ANALYZE_AFTER = 1000  # staged rows, and a tenth of the ledger


@dataclass(frozen=True)
class ExportedRow:
    email_key: str
    email: str
    fingerprint: int
    status: str
    origin: str  # "export": the status is what we sent; "provider": what the provider reported to us
    source_digest: int | None = None  # of the CRM rows it was made from (db.digest)


# --- runs -------------------------------------------------------------------------------------------------


def start_run(connection: Connection, profile: str, kind: str, now: datetime, slot: str | None = None) -> int:
    result = connection.execute(
        insert(bs_runs).values(
            profile=profile, kind=kind, slot=slot, started_at=now, outcome="running", counts={}, files=[]
        )
    )
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def finish_run(
    connection: Connection,
    run_id: int,
    outcome: str,
    counts: Mapping[str, int],
    files: Sequence[str],
    message: str | None,
    now: datetime,
) -> None:
    connection.execute(
        update(bs_runs)
        .where(bs_runs.c.id == run_id)
        .values(outcome=outcome, counts=dict(counts), files=list(files), message=message, finished_at=now)
    )


def fail_open_runs(connection: Connection, profile: str, now: datetime) -> int:
    """Close as failed the runs still marked running; call only while holding the profile's run lock."""
    result = connection.execute(
        update(bs_runs)
        .where(bs_runs.c.profile == profile, bs_runs.c.outcome == "running")
        .values(outcome="failed", finished_at=now, message="interrupted: the process stopped before the run ended")
    )
    return int(result.rowcount or 0)


UNFINISHED = ("failed", "interrupted")  # outcomes of a night that may be run again


def slot_taken(connection: Connection, profile: str, slot: str) -> bool:
    """Whether a run of this slot is under way or done; a failed or interrupted one may be tried again."""
    return bool(_slot_runs(connection, profile, slot, bs_runs.c.outcome.not_in(UNFINISHED)))


def slot_done(connection: Connection, profile: str, slot: str) -> bool:
    """Whether a run of this slot ended (not failed, interrupted or still marked running)."""
    return bool(_slot_runs(connection, profile, slot, bs_runs.c.outcome.not_in((*UNFINISHED, "running"))))


def slot_attempts(connection: Connection, profile: str, slot: str) -> int:
    """How many runs of this slot were started, whatever their outcome."""
    return _slot_runs(connection, profile, slot)


def _slot_runs(connection: Connection, profile: str, slot: str, *where: ColumnElement[bool]) -> int:
    query = (
        select(func.count()).select_from(bs_runs).where(bs_runs.c.profile == profile, bs_runs.c.slot == slot, *where)
    )
    return int(connection.scalar(query) or 0)


def later_success(connection: Connection, profile: str, after_id: int) -> bool:
    """Whether a whole run or an export ended well after run ``after_id`` (an admin's run after a failed night)."""
    query = select(func.count()).where(
        bs_runs.c.profile == profile,
        bs_runs.c.id > after_id,
        bs_runs.c.kind.in_(("run", "export")),
        bs_runs.c.outcome.in_(("ok", "rejected")),
    )
    return bool(connection.scalar(query))


def last_nightly(connection: Connection, profile: str) -> dict[str, Any] | None:
    """The latest attempt at a scheduled run (a run with a slot), or None when the profile never had one."""
    query = (
        select(bs_runs)
        .where(bs_runs.c.profile == profile, bs_runs.c.slot.is_not(None))
        .order_by(bs_runs.c.id.desc())
        .limit(1)
    )
    row = connection.execute(query).first()
    return dict(row._mapping) if row is not None else None


def last_runs(connection: Connection, profile: str, limit: int = 10) -> list[dict[str, Any]]:
    query = select(bs_runs).where(bs_runs.c.profile == profile).order_by(bs_runs.c.id.desc()).limit(limit)
    return [dict(row._mapping) for row in connection.execute(query)]


# --- inbound files ----------------------------------------------------------------------------------------


APPLIED = ("applied", "reverted")  # a reverted file was applied: its content is a duplicate, never applied again


def applied_file(connection: Connection, profile: str, sha256: str) -> dict[str, Any] | None:
    """The ledger entry of an already applied (or applied, then reverted) file with this content, if any."""
    f = bs_files.c
    query = select(bs_files).where(f.profile == profile, f.sha256 == sha256, f.outcome.in_(APPLIED)).limit(1)
    row = connection.execute(query).first()
    return dict(row._mapping) if row else None


def collected_from_provider(connection: Connection, profile: str, sha256: str) -> bool:
    """Whether a file with this content was once collected from the provider's remote inbox."""
    f = bs_files.c
    query = select(f.id).where(f.profile == profile, f.sha256 == sha256, f.origin.like("remote:%")).limit(1)
    return connection.execute(query).first() is not None


def record_file(connection: Connection, **values: Any) -> int:
    result = connection.execute(insert(bs_files).values(**values))
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def describe_file(connection: Connection, file_id: int, detail: str) -> None:
    connection.execute(update(bs_files).where(bs_files.c.id == file_id).values(detail=detail))


# --- export ledger ----------------------------------------------------------------------------------------


def stream_exported(
    connection: Connection, profile: str, list_code: str, chunk: int, only_keys: Select[Any] | None = None
) -> Iterator[ExportedRow]:
    e = bs_exported.c
    query = select(e.email_key, e.email, e.fingerprint, e.status, e.origin, e.source_digest).where(
        e.profile == profile, e.list_code == list_code
    )
    if only_keys is not None:
        query = query.where(e.email_key.in_(only_keys))
    query = query.order_by(ordered_key(e.email_key, connection))
    for row in connection.execute(query.execution_options(stream_results=True, yield_per=chunk)):
        yield ExportedRow(row[0], row[1], row[2], row[3], row[4], row[5])


def changed_keys(connection: Connection, profile: str, list_code: str, digests: Select[Any]) -> Select[Any]:
    """The addresses a diff must look at, found inside the database: those whose CRM digest (the sum of the
    digests of their contacts' rows, ``digests`` from ``sources.export_digests``) differs from the one the
    ledger holds; those the ledger lacks and the provider would take (a pending row is never sent to MailUp,
    so never in the ledger: weighing it again each night would find nothing); those several contacts share
    (the duplicates report lists them in every export); and those the ledger holds that have no live contact
    on the list any more.

    The addresses are kept in the session's temporary table ``bs_diff_keys``; the returned query reads them
    back. PostgreSQL finds them in one statement, a hash full join of each contact's digest with the ledger,
    as CREATE TABLE AS: an address with several contacts needs no sum there, as no one contact's digest
    equals the sum of several (short of the 2**-48 chance any digest runs), and grouping a million rows by
    address cost a third of the statement. SQLite joins only by looking rows up, so the addresses' digests
    go into the temporary table ``bs_current`` first, keyed by address, and the ledger is compared with it
    both ways (joined as derived tables instead, SQLite compared every row with every other: ten times
    slower)."""
    known = and_(bs_exported.c.profile == profile, bs_exported.c.list_code == list_code)
    if connection.dialect.name == "postgresql":
        current = digests.subquery("bs_digests")
        ledger_rows = select(bs_exported.c.email_key, bs_exported.c.source_digest).where(known).subquery("bs_known")
        c, e = current.c, ledger_rows.c
        both = current.join(ledger_rows, e.email_key == c.email_key, full=True)
        keys = select(func.coalesce(c.email_key, e.email_key).label("email_key")).select_from(both).distinct()
        changed = keys.where(or_(c.email_key.is_(None), _differs(c, e)))
        driver.temporary_table_as(connection, "bs_diff_keys", changed, "email_key VARCHAR(320)")
        return select(DIFF_KEYS.c.email_key)
    rows = digests.subquery("bs_rows")
    addresses = select(
        rows.c.email_key,
        func.sum(rows.c.digest).label("digest"),
        func.count().label("contacts"),
        func.max(rows.c.sendable).label("sendable"),
    ).group_by(rows.c.email_key)
    columns = "email_key VARCHAR(320) PRIMARY KEY, digest NUMERIC, contacts INTEGER, sendable INTEGER"
    driver.temporary_table_as(connection, "bs_current", addresses, columns)
    driver.temporary_table(connection, "bs_diff_keys", "email_key VARCHAR(320) PRIMARY KEY")
    c, e = CURRENT.c, bs_exported.c
    differs = select(c.email_key).select_from(CURRENT.outerjoin(bs_exported, and_(known, e.email_key == c.email_key)))
    connection.execute(insert(DIFF_KEYS).from_select(["email_key"], differs.where(or_(_differs(c, e), c.contacts > 1))))
    gone = select(e.email_key).where(known, ~exists().where(c.email_key == e.email_key))
    connection.execute(insert(DIFF_KEYS).from_select(["email_key"], gone))
    return select(DIFF_KEYS.c.email_key)


def _differs(current: Any, known: Any) -> ColumnElement[bool]:
    """A row of ``current`` (the digests of a contact on the list, or of an address) that the ledger row
    (``known``, outer-joined) does not hold as it is now."""
    return or_(
        and_(known.email_key.is_(None), current.sendable == 1),  # a row the provider takes and has not had
        and_(known.email_key.is_not(None), known.source_digest.is_(None)),
        known.source_digest != current.digest,
    )


def clear_pending(connection: Connection, profile: str, list_code: str) -> None:
    connection.execute(delete(bs_pending).where(bs_pending.c.profile == profile, bs_pending.c.list_code == list_code))


PENDING_COLUMNS = (
    "profile",
    "list_code",
    "email_key",
    "email",
    "contact_id",
    "fingerprint",
    "status",
    "origin",
    "at",
    "source_digest",
)


def stage_pending(connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Stage rows (in PENDING_COLUMNS order, ``at`` from :func:`stored_time`) through the driver directly:
    at millions of rows, SQLAlchemy's per-row parameter handling costs more than the insert itself."""
    driver.insert_many(connection, "bs_pending", PENDING_COLUMNS, rows)


def commit_pending(connection: Connection, profile: str, list_code: str) -> None:
    """Make the staged rows of a confirmed upload the new export state (call inside one transaction)."""
    p, e = bs_pending.c, bs_exported.c
    mine = and_(p.profile == profile, p.list_code == list_code)
    staged = connection.scalar(select(func.count()).select_from(bs_pending).where(mine)) or 0
    _refresh_statistics(connection, "bs_pending")
    staged_keys = select(p.email_key).where(mine)
    connection.execute(
        delete(bs_exported).where(e.profile == profile, e.list_code == list_code, e.email_key.in_(staged_keys))
    )
    columns = [p[name] for name in PENDING_COLUMNS]
    connection.execute(
        insert(bs_exported).from_select(
            [column.name for column in columns], select(*columns).where(mine, p.status != TOMBSTONE)
        )
    )
    _clear_staged(connection, staged, mine)
    if staged > ANALYZE_AFTER and _outweighs_statistics(connection, staged):
        _refresh_statistics(connection, "bs_exported")


def _clear_staged(connection: Connection, staged: int, mine: ColumnElement[bool]) -> None:
    """Delete the committed staging rows. On SQLite, when they are all the table holds, a DELETE without
    WHERE empties it at once instead of row by row; no other writer can add rows meanwhile, as this
    transaction holds the database's write lock. PostgreSQL has no such lock, so it deletes row by row."""
    if connection.dialect.name == "sqlite":
        total = connection.scalar(select(func.count()).select_from(bs_pending)) or 0
        if total == staged:
            connection.execute(delete(bs_pending))
            return
    connection.execute(delete(bs_pending).where(mine))


def _outweighs_statistics(connection: Connection, staged: int) -> bool:
    """Whether ``staged`` rows are a tenth of what PostgreSQL's statistics say the ledger holds, or it has none
    (a nightly diff's few thousand rows do not change the plans; analyzing after each list took 0.2 s)."""
    if connection.dialect.name != "postgresql":
        return False
    estimate = connection.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'bs_exported'::regclass"))
    return estimate is None or estimate < 0 or staged * 10 > estimate


def _refresh_statistics(connection: Connection, table: str) -> None:
    """On PostgreSQL, ANALYZE a ledger table after a bulk change. Without statistics, right after the first full
    export, the planner joined bs_pending to bs_exported by scanning the whole ledger for every staged row."""
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"ANALYZE {table}"))


def note_provider_status(connection: Connection, profile: str, changes: Sequence[Mapping[str, str]]) -> None:
    """Record that the provider already knows these statuses, so the next diff does not echo them back.

    The row's digest is cleared: the next diff must weigh it again even if the CRM goes back to the inputs
    it had when the row was sent (a re-subscription after the provider's opt-out)."""
    driver.update_many(
        connection,
        "bs_exported",
        ("status",),
        ("profile", "list_code", "email_key"),
        ((c["status"], profile, c["list_code"], c["email_key"]) for c in changes),
        constant="origin = 'provider', source_digest = NULL",
    )


def rename_exported(connection: Connection, profile: str, old_key: str, new_key: str, new_email: str) -> None:
    """The provider changed an address: its ledger rows follow, so the old one is not sent as a tombstone. A
    change of letter case alone keeps the rows (their key is the same) and their digests."""
    e = bs_exported.c
    if old_key == new_key:
        connection.execute(
            update(bs_exported).where(e.profile == profile, e.email_key == old_key).values(email=new_email)
        )
        return
    connection.execute(delete(bs_exported).where(e.profile == profile, e.email_key == new_key))
    connection.execute(
        update(bs_exported)
        .where(e.profile == profile, e.email_key == old_key)
        .values(email_key=new_key, email=new_email, source_digest=None)
    )


def rename_exported_many(connection: Connection, profile: str, renames: Sequence[tuple[str, str, str]]) -> None:
    """:func:`rename_exported` for each (old key, new key, new email), in order."""
    for old_key, new_key, new_email in renames:
        rename_exported(connection, profile, old_key, new_key, new_email)


def subscribed_count(connection: Connection, profile: str, list_code: str) -> int:
    """The addresses the provider has from us as subscribed (or pending) on a list: the export safety stop's base."""
    e = bs_exported.c
    query = select(func.count()).select_from(bs_exported)
    query = query.where(e.profile == profile, e.list_code == list_code, e.status.in_(("subscribed", "pending")))
    return int(connection.scalar(query) or 0)


def exported_count(connection: Connection, profile: str, list_code: str | None = None) -> int:
    query = select(func.count()).select_from(bs_exported).where(bs_exported.c.profile == profile)
    if list_code is not None:
        query = query.where(bs_exported.c.list_code == list_code)
    return int(connection.scalar(query) or 0)


# --- audit trail ------------------------------------------------------------------------------------------


CHANGE_COLUMNS = (
    "run_id",
    "contact_id",
    "list_code",
    "old_status",
    "new_status",
    "rule",
    "source_file",
    "source_line",
    "origin",
    "file_id",
    "event",
    "old_source",
    "old_reason",
    "new_reason",
    "old_email",
    "new_email",
    "reverts",
)
CHANGE_TIMES = ("at", "old_status_at", "new_status_at")


def record_changes(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Audit rows: each holds ``at`` and the first nine of CHANGE_COLUMNS; the rest (what an undo needs) may be
    left out."""
    driver.insert_many(
        connection,
        "bs_changes",
        CHANGE_COLUMNS + CHANGE_TIMES,
        (
            [
                *(row.get(name) for name in CHANGE_COLUMNS),
                *(driver.stored_time(connection, row.get(name)) for name in CHANGE_TIMES),
            ]
            for row in rows
        ),
    )
