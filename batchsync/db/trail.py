"""Reads of batchsync's audit trail and ledgers for one address's history and for the revert of one file, and the
few writes a revert makes to them (``bs_changes`` rows go through ``ledger.record_changes``)::

    files = trail.files_matching(connection, "mailup", "unsubscribers_3.csv")
    changes = trail.changes_of_file(connection, files[0])
    trail.mark_reverted(connection, files[0]["id"], "reverted by run 12")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from batchsync.db import snapshots
from batchsync.db.ledger import APPLIED
from batchsync.db.schema import bs_changes, bs_files, bs_provider_optouts, bs_runs

Row = dict[str, Any]


def files_matching(connection: Connection, profile: str, target: str, sha256: str | None = None) -> list[Row]:
    """The profile's inbound files that ``target`` names, newest first: by content (``sha256``, or a hex
    ``target`` that starts a file's sha256), else by name, or by the path it was archived at."""
    f = bs_files.c
    mine = select(bs_files).where(f.profile == profile).order_by(f.id.desc())
    if sha256 is not None:
        return _rows(connection, mine.where(f.sha256 == sha256))
    if _looks_like_hash(target):
        found = _rows(connection, mine.where(f.sha256.startswith(target.lower(), autoescape=True)))
        if found:
            return found
    return _rows(connection, mine.where(or_(f.name == target, f.kept == target)))


def _looks_like_hash(text: str) -> bool:
    return 7 <= len(text) <= 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def changes_of_file(connection: Connection, entry: Mapping[str, Any]) -> list[Row]:
    """The bs_changes rows an applied file made, in the order it made them. Rows written before bs_changes named
    its file's row (``file_id`` NULL) are found by the file's name and run."""
    c = bs_changes.c
    query = select(bs_changes).where(c.file_id == entry["id"], c.reverts.is_(None))
    found = _rows(connection, query.order_by(c.id))
    if found:
        return found
    older = and_(c.file_id.is_(None), c.source_file == entry["name"], c.run_id == entry["run_id"])
    return _rows(connection, select(bs_changes).where(older, c.reverts.is_(None)).order_by(c.id))


def same_name_in_run(connection: Connection, entry: Mapping[str, Any]) -> int:
    """How many applied files of the entry's run bear its name (more than one: its older changes, which name
    the file only by name and run, cannot be told apart)."""
    f = bs_files.c
    query = select(func.count()).where(
        f.profile == entry["profile"], f.run_id == entry["run_id"], f.name == entry["name"], f.outcome.in_(APPLIED)
    )
    return int(connection.scalar(query) or 0)


def changes_after(connection: Connection, contact_ids: Iterable[int], after_id: int) -> list[Row]:
    """The bs_changes rows of these contacts newer than ``after_id``, oldest first."""
    ids = sorted(set(contact_ids))
    if not ids:
        return []
    c = bs_changes.c
    return _rows(connection, select(bs_changes).where(c.contact_id.in_(ids), c.id > after_id).order_by(c.id))


def mark_reverted(connection: Connection, file_id: int, detail: str) -> bool:
    """The file's entry says it was reverted (its content stays known: the same file again is a duplicate).
    False when it is not an applied file any more (another revert came first)."""
    f = bs_files.c
    query = update(bs_files).where(f.id == file_id, f.outcome == "applied").values(outcome="reverted", detail=detail)
    return bool(connection.execute(query).rowcount)


# --- one address's history ------------------------------------------------------------------------------------


def changes_of_contacts(connection: Connection, contact_ids: Iterable[int]) -> list[Row]:
    ids = sorted(set(contact_ids))
    c = bs_changes.c
    return _rows(connection, select(bs_changes).where(c.contact_id.in_(ids)).order_by(c.id)) if ids else []


def email_changes(connection: Connection) -> list[Row]:
    """Every email change the trail holds (they are few): who had which address before and after."""
    c = bs_changes.c
    query = select(c.contact_id, c.old_email, c.new_email).where(c.list_code == "", c.old_email.is_not(None))
    return _rows(connection, query)


def exported_rows(connection: Connection, profile: str, key: str) -> list[Row]:
    """What the export ledger holds for the address on each list (db.snapshots, notes folded in)."""
    return snapshots.rows_for_keys(connection, profile, [key]).to_dicts()


def provider_opt_outs(connection: Connection, profile: str, key: str) -> list[Row]:
    o = bs_provider_optouts.c
    return _rows(connection, select(bs_provider_optouts).where(o.profile == profile, o.email_key == key))


def runs(connection: Connection, run_ids: Iterable[int]) -> dict[int, Row]:
    ids = sorted({run_id for run_id in run_ids if run_id is not None})
    found = _rows(connection, select(bs_runs).where(bs_runs.c.id.in_(ids))) if ids else []
    return {row["id"]: row for row in found}


def export_runs(connection: Connection, profile: str) -> list[Row]:
    """The profile's runs that may have exported (to find the run, and the file, an exported row came from)."""
    r = bs_runs.c
    query = select(bs_runs).where(r.profile == profile, r.kind.in_(("export", "run"))).order_by(r.started_at)
    return _rows(connection, query)


def files_named(connection: Connection, names: Iterable[str]) -> dict[str, list[Row]]:
    """Applied (or reverted) files by name, every profile's: an activity names its file, not the file's row."""
    wanted = sorted(set(names))
    f = bs_files.c
    found: dict[str, list[Row]] = {}
    if wanted:
        for row in _rows(connection, select(bs_files).where(f.name.in_(wanted), f.outcome.in_(APPLIED))):
            found.setdefault(row["name"], []).append(row)
    return found


def _rows(connection: Connection, query: Any) -> list[Row]:
    return [dict(row._mapping) for row in connection.execute(query)]
