"""batchsync's own tables: runs, the inbound file ledger and the audit trail; the export ledger is
``db.snapshots``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, func, insert, select, update

from batchsync.db import driver, snapshots
from batchsync.db.schema import bs_files, bs_runs

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


# --- export ledger: db.snapshots; an import notes what the provider reported through these two ----------------

note_provider_status = snapshots.note_provider_status
rename_exported = snapshots.rename_exported


def rename_exported_many(connection: Connection, profile: str, renames: Sequence[tuple[str, str, str]]) -> None:
    """:func:`rename_exported` for each (old key, new key, new email), in order."""
    for old_key, new_key, new_email in renames:
        rename_exported(connection, profile, old_key, new_key, new_email)


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
