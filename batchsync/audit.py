"""One address's history: every change to its subscriptions (``bs_changes``), every activity on its contacts, and
what the export ledger (``db.snapshots``) and the provider's remembered opt-outs (``bs_provider_optouts``) hold for
it, each with its time, rule, file and line, origin and run, in time order::

    found = address_history([load_profile(Path("profiles/mailup.toml"))], "Bob@Example.com")
    print(as_table(found))   # or as_json(found)

The address is matched by its key (trimmed, lower-cased, as ``contacts.email_key``). Its contacts are those that
have it now, and those an email change moved to or from it (``bs_changes``, and for changes recorded before
bs_changes kept them, the ``email_change`` activities); all of their changes and activities are shown. The CRM is
read once per database and mapping of its CRM tables (``db.mapping``), the ledgers once per profile.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from batchsync.config import Profile
from batchsync.db import crm, trail
from batchsync.db.mapping import missing_tables, open_engine, refuse_misfits
from batchsync.errors import ConfigError, DatabaseError
from batchsync.export import remote_folder
from batchsync.rules import email_key

# The tail the applier gives an activity's detail: "...; ORIGIN FILE:LINE".
ACTIVITY_SOURCE = re.compile(r"; (provider|admin|callback|crm) ([^;]+):(\d+)$")
ORDER = {"change": 0, "activity": 1, "provider opt-out": 2, "exported": 3}  # within one moment


@dataclass(frozen=True)
class Entry:
    """One thing known of an address at one moment: a change, an activity, a provider's opt-out or an exported row."""

    at: datetime
    what: str  # change | activity | provider opt-out | exported
    detail: str
    profile: str | None = None
    contact: int | None = None
    list: str | None = None
    rule: str | None = None
    file: str | None = None
    line: int | None = None
    origin: str | None = None
    run: int | None = None


@dataclass
class History:
    """Everything known of one address: the contacts that have or had it, and their entries in time order."""

    address: str
    key: str
    contacts: list[int] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return bool(self.contacts or self.entries)


def address_history(profiles: list[Profile], address: str) -> History:
    """The history of ``address`` in the databases (and ledgers) of these profiles."""
    found = History(address.strip(), email_key(address))
    if not found.key:
        raise ConfigError("an address is needed")
    # One read per database and mapping: profiles on one database may map its CRM tables differently.
    by_database: dict[tuple[str, tuple[Any, ...]], list[Profile]] = {}
    for profile in profiles:
        where = tuple(sorted(profile.database.locations().items()))
        by_database.setdefault((profile.database_url(), where), []).append(profile)
    for (url, _where), sharing in by_database.items():
        engine = open_engine(url, sharing[0].database)
        try:
            _require_tables(engine, sharing[0])
            with engine.connect() as connection:
                _read_database(connection, sharing, found)
        finally:
            engine.dispose()
    found.entries.sort(key=lambda e: (e.at, ORDER[e.what], e.contact or 0, e.list or ""))
    return found


def _require_tables(engine: Any, profile: Profile) -> None:
    refuse_misfits(engine)  # a mapped table that does not fit: init cannot help, as in Sync
    missing = missing_tables(engine)
    if missing:
        raise DatabaseError(f"the database lacks {', '.join(missing)}: run `batchsync init -p {profile.name}` first")


def _read_database(connection: Connection, profiles: list[Profile], found: History) -> None:
    contacts, keys = _contacts(connection, found.key)
    found.contacts = sorted(set(found.contacts) | contacts)
    changes = trail.changes_of_contacts(connection, contacts)
    activities = crm.activities_of(connection, contacts)
    files = trail.files_named(connection, {c["source_file"] for c in changes if c["source_file"]})
    files |= trail.files_named(connection, {m.group(2) for a in activities if (m := _source(a["detail"]))})
    runs = trail.runs(connection, [c["run_id"] for c in changes])
    found.entries += [_change(row, runs) for row in changes]
    found.entries += [_activity(row, files) for row in activities]
    for profile in profiles:
        for key in sorted(keys):
            found.entries += _ledger(connection, profile, key)


def _contacts(connection: Connection, key: str) -> tuple[set[int], set[str]]:
    """The contacts that have the address now, and those an email change moved to or from it; and the addresses
    (keys) they had on either side of those changes, whose ledger rows are theirs too (a change the provider
    reports moves them)."""
    ids = set(crm.contacts_with_key(connection, key))
    moves = [
        (row["contact_id"], row["old_email"] or "", row["new_email"] or "") for row in trail.email_changes(connection)
    ]
    for contact_id, detail in crm.email_change_activities(connection):
        before, _, rest = detail.partition(" -> ")
        moves.append((contact_id, before, rest.partition(";")[0]))
    keys = {key}
    for contact_id, before, after in moves:
        if key in (email_key(before), email_key(after)):
            ids.add(contact_id)
    keys |= {email_key(address) for cid, before, after in moves if cid in ids for address in (before, after)}
    return ids, keys


def _source(detail: str | None) -> re.Match[str] | None:
    return ACTIVITY_SOURCE.search(detail or "")


def _change(row: dict[str, Any], runs: dict[int, dict[str, Any]]) -> Entry:
    if row["list_code"] == "":
        what = f"address {row['old_email']} -> {row['new_email']}"
    else:
        what = f"{row['old_status'] or '(no row)'} -> {row['new_status'] or '(no row)'}"
    if row["reverts"] is not None:
        what += f" (undoes change {row['reverts']})"
    run = runs.get(row["run_id"])
    return Entry(
        row["at"],
        "change",
        what,
        run["profile"] if run else None,
        row["contact_id"],
        row["list_code"] or None,
        row["rule"],
        row["source_file"],
        row["source_line"],
        row["origin"],
        row["run_id"],
    )


def _activity(row: dict[str, Any], files: dict[str, list[dict[str, Any]]]) -> Entry:
    """An activity; its file, line and origin from the tail of its detail, its run from that file's entry (when
    one file of that name was applied)."""
    match = _source(row["detail"])
    detail = f"{row['kind']}: {row['detail']}"
    if match is None:
        return Entry(row["at"], "activity", detail, contact=row["contact_id"])
    named = files.get(match.group(2), [])
    single = named[0] if len(named) == 1 else None
    return Entry(
        row["at"],
        "activity",
        detail[: len(detail) - len(match.group(0))],
        single["profile"] if single else None,
        row["contact_id"],
        file=match.group(2),
        line=int(match.group(3)),
        origin=match.group(1),
        run=single["run_id"] if single else None,
    )


def _ledger(connection: Connection, profile: Profile, key: str) -> list[Entry]:
    """What the profile's export ledger and the provider's remembered opt-outs hold for the address."""
    runs = trail.export_runs(connection, profile.name)
    entries = [_exported(row, profile, runs) for row in trail.exported_rows(connection, profile.name, key)]
    opt_outs = trail.provider_opt_outs(connection, profile.name, key)
    files = trail.files_named(connection, {row["source"].rsplit(":", 1)[0] for row in opt_outs})
    for row in opt_outs:
        name, _, line = row["source"].rpartition(":")
        mine = [f for f in files.get(name, []) if f["profile"] == profile.name]
        entries.append(
            Entry(
                row["at"],
                "provider opt-out",
                f"{row['kind']} of {row['email']} remembered for good ({row['reason']}; "
                f"recorded {row['recorded_at']:%Y-%m-%d %H:%M})",
                profile.name,
                list=row["list_code"],
                rule="provider opt-out",
                file=name or row["source"],
                line=int(line) if line.isdigit() else None,
                origin="provider",
                run=mine[0]["run_id"] if len(mine) == 1 else None,
            )
        )
    return entries


def _exported(row: dict[str, Any], profile: Profile, runs: list[dict[str, Any]]) -> Entry:
    """A ledger row: the status the provider has the address in on a list, and the export run (and file) that
    sent it, found by time: the ledger keeps neither."""
    run = next((r for r in runs if r["started_at"] <= row["at"] <= (r["finished_at"] or datetime.now(UTC))), None)
    sent = None
    if run is not None and row["list_code"] in profile.lists:
        folder = remote_folder(profile, row["list_code"], row["at"]) + "/"
        sent = next((f[4:] for f in run["files"] or [] if f.startswith("out:" + folder)), None)
    told = "the provider reported it" if row["origin"] == "provider" else "sent"
    return Entry(
        row["at"],
        "exported",
        f"{row['status']} ({told}) as {row['email']}",
        profile.name,
        row["contact_id"],
        row["list_code"],
        "export ledger",
        sent,
        None,
        row["origin"],
        run["id"] if run else None,
    )


def as_json(found: History) -> str:
    body = {"address": found.address, "key": found.key, "contacts": found.contacts, "entries": found.entries}
    return json.dumps(body, default=_json_default, indent=2, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Entry):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


COLUMNS = ("time (UTC)", "what", "profile", "contact", "list", "change", "rule", "file:line", "origin", "run")


def as_table(found: History) -> str:
    """A plain table, one line an entry; columns as wide as their longest cell."""
    if not found.known:
        return f"nothing is known of {found.key}"
    rows = [COLUMNS, *(_cells(entry) for entry in found.entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    contacts = ", ".join(str(cid) for cid in found.contacts) or "none"
    lines = [f"history of {found.key} (contacts {contacts})"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _cells(entry: Entry) -> tuple[str, ...]:
    where = f"{entry.file}:{entry.line}" if entry.file and entry.line is not None else entry.file or ""
    values: Iterable[Any] = (
        f"{entry.at:%Y-%m-%d %H:%M:%S}",
        entry.what,
        entry.profile,
        entry.contact,
        entry.list,
        entry.detail,
        entry.rule,
        where,
        entry.origin,
        entry.run,
    )
    return tuple("" if value is None else str(value) for value in values)
