"""Undo what one applied inbound file did to the CRM, from its audit rows in ``bs_changes``::

    reverter = Reverter(profile, engine, clock)
    entry = reverter.find("unsubscribers_3.csv")       # or its sha256, or the path it was archived at
    with engine.begin() as connection:
        plan = reverter.plan(connection, entry)          # what would be undone, what is left and why
        reverter.apply(connection, plan, run_id)          # Sync.revert records the run and holds the lock

Each change is undone in the reverse order the file made it, only where nothing newer changed the same
subscription (or contact address): the subscription must be as the file left it, and no later change in
``bs_changes`` (but one already reverted) may touch it. What is undone is a CRM-side change like any other
(origin ``admin``, rule ``revert``, audited in ``bs_changes`` with the row it undid, an activity on the contact),
so the next diff export sends what the provider must be told.

Consent comes first (docs/architecture.md, "Sync rules"), so a revert never:
- lifts a suppression (hard bounce, complaint, clean): a change made by a suppressing event, or one whose undo
  would opt in an address on the suppression list, is left;
- forgets an opt-out the provider reported (``bs_provider_optouts``): the export keeps never sending such an
  address as subscribed, whoever's file is reverted; and an opt-in is not put back where another report of the
  provider's (not this file's) would win over it;
- makes a file applicable again: its ``bs_files`` entry becomes ``reverted``, and the same content again is a
  duplicate.
Changes recorded before bs_changes kept the state before (``old_status_at`` NULL) get their status back, with
the revert's time, source ``admin`` and no reason: the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from hashlib import sha256
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.db import crm, ledger, trail
from batchsync.db.optouts import ProviderOptOuts
from batchsync.errors import ConfigError, RevertRefused
from batchsync.rules import OptOut, Status, Subscription, decide_opt_out, email_key

SUPPRESSING = frozenset({"hard_bounce", "complaint", "clean"})
OPTED_IN = frozenset({"subscribed", "pending"})
Row = dict[str, Any]


@dataclass
class Step:
    """One change of the file: undone (``why_left`` None) or left, with the address it concerned."""

    change: Row
    address: str
    why_left: str | None = None
    restored: str = ""  # what was put back: a status, "no row", or an address
    subscription: Subscription | None = None  # the subscription put back (None: its row removed)


@dataclass
class RevertPlan:
    """What reverting one applied file would do: the changes undone, those left (each with why), and notes."""

    file: Row
    undone: list[Step] = field(default_factory=list)
    left: list[Step] = field(default_factory=list)
    older: int = 0  # changes recorded before bs_changes kept the state before them
    notes: list[str] = field(default_factory=list)


class Reverter:
    """Finds an applied file by name, path, content or sha256, plans its undo, and applies the plan in one
    transaction."""

    def __init__(self, profile: Profile, engine: Engine, clock: Clock) -> None:
        self.profile, self.engine, self.clock = profile, engine, clock

    def find(self, target: str) -> Row:
        """The applied file ``target`` names: a file on disk (by its content), a sha256 or its start, a name, or
        the archived path. None, several, or one already reverted: an error that says which."""
        path = Path(target)
        digest = sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        with self.engine.connect() as connection:
            found = trail.files_matching(connection, self.profile.name, target, digest)
        if digest is not None and not found:  # a copy that differs from what was applied: try its name
            with self.engine.connect() as connection:
                found = trail.files_matching(connection, self.profile.name, path.name)
        applied = [row for row in found if row["outcome"] in ledger.APPLIED]
        if not applied:
            seen = "".join(f"\n  {describe(row)}: {row['detail']}" for row in found)  # duplicates, quarantined
            raise ConfigError(f"no applied file of profile {self.profile.name} is {target!r}{seen}")
        if len(applied) > 1:
            listed = "\n".join(f"  {describe(row)}" for row in applied)
            raise ConfigError(f"{target!r} names {len(applied)} applied files; name one by its sha256:\n{listed}")
        entry = applied[0]
        if entry["outcome"] == "reverted":
            raise RevertRefused(f"{describe(entry)} was reverted already: {entry['detail']}")
        return entry

    def plan(self, connection: Connection, entry: Row) -> RevertPlan:
        """What undoing the file would do, newest change first; reads only."""
        changes = trail.changes_of_file(connection, entry)
        if any(c["file_id"] is None for c in changes) and trail.same_name_in_run(connection, entry) > 1:
            raise RevertRefused(
                f"{describe(entry)}: its changes were recorded before they named their file, and another file of "
                "the same name was applied in the same run: they cannot be told apart; nothing reverted"
            )
        state = _State(connection, self.profile, entry, changes, self.clock.now())
        plan = RevertPlan(entry, older=sum(c["new_status_at"] is None and c["list_code"] != "" for c in changes))
        for change in reversed(changes):
            step = state.step(change)
            (plan.left if step.why_left else plan.undone).append(step)
        plan.notes = state.notes()
        return plan

    def apply(self, connection: Connection, plan: RevertPlan, run_id: int | None) -> None:
        """Write the plan: subscriptions and addresses back, audit rows, activities, the file marked reverted
        (in the caller's transaction; a file reverted meanwhile rolls it all back)."""
        now, name = self.clock.now(), plan.file["name"]
        detail = f"reverted by run {run_id} at {now:%Y-%m-%d %H:%M:%S} UTC: {len(plan.undone)} changes undone, "
        if not trail.mark_reverted(connection, plan.file["id"], detail + f"{len(plan.left)} left"):
            raise RevertRefused(f"{describe(plan.file)} is not an applied file any more (reverted meanwhile?)")
        lists = crm.list_ids(connection, {s.change["list_code"] for s in plan.undone if s.change["list_code"]})
        final: dict[tuple[int, int], Subscription | None] = {}
        audit, activities = [], []
        for step in plan.undone:
            change = step.change
            if change["list_code"]:
                final[(change["contact_id"], lists[change["list_code"]])] = step.subscription
            else:
                old = cast(str, change["old_email"])
                crm.change_email(connection, change["contact_id"], old, email_key(old), now)
            audit.append(_audit_row(change, step, run_id, now, plan.file["id"]))
            detail = f"{name} line {change['source_line']} reverted: {_what(change, step)}; admin revert run {run_id}"
            activities.append({"contact_id": change["contact_id"], "kind": "revert", "at": now, "detail": detail})
        _write_subscriptions(connection, final)
        crm.add_activities(connection, activities)
        ledger.record_changes(connection, audit)


class _State:
    """The CRM as the revert goes back through the file's changes, newest first: read once, changed in memory."""

    def __init__(self, connection: Connection, profile: Profile, entry: Row, changes: list[Row], now: datetime):
        self.entry, self.now = entry, now
        contact_ids = {c["contact_id"] for c in changes}
        self.contacts = crm.contacts_of(connection, contact_ids)
        keys = {key for _email, key, _deleted in self.contacts.values()}
        keys |= {email_key(c[name]) for c in changes for name in ("old_email", "new_email") if c[name]}
        self.owners = {k: set(ids) for k, ids in crm.contacts_by_email(connection, keys).items()}
        self.suppressed = crm.suppressed_keys(connection, keys)
        self.reports = ProviderOptOuts(connection, profile.name, keys).known
        list_ids = crm.list_ids(connection, {c["list_code"] for c in changes if c["list_code"]})
        stored = crm.subscriptions_of(connection, contact_ids, list_ids.values())
        self.subs = {(cid, code): stored.get((cid, lid)) for cid in contact_ids for code, lid in list_ids.items()}
        self.later = _later_changes(connection, changes)
        self.left_lines: dict[tuple[int, str], int] = {}  # (contact, list or '') -> line of a change left
        self.moved_back: dict[str, set[int]] = {}  # address -> contacts this revert gave it back to
        self.provider_kept: set[str] = set()

    def step(self, change: Row) -> Step:
        cid, code = change["contact_id"], change["list_code"]
        step = Step(change, self.contacts.get(cid, ("?", "?", False))[0].strip())
        step.why_left = self._why_left_email(change) if code == "" else self._why_left_status(change, step)
        if step.why_left:
            self.left_lines.setdefault((cid, code), change["source_line"])
        elif code == "":
            self._move_back(change, step)
        return step

    def _why_left_status(self, change: Row, step: Step) -> str | None:
        key = (change["contact_id"], change["list_code"])
        now = self.subs.get(key)
        moved = self._changed_since(key, now is not None and _as_left(now, change))
        if moved:
            return moved
        restored = _restored(change, cast(Subscription, now), self.now, self.entry["name"])
        address = self.contacts[change["contact_id"]][1]
        opts_in = restored is not None and restored.status in OPTED_IN
        if address in self.suppressed and (change["event"] in SUPPRESSING or change["event"] is None or opts_in):
            return f"{address} is on the suppression list: a revert never lifts a suppression nor opts it in"
        report = self.reports.get((change["list_code"], address)) if opts_in else None
        if report is not None and report.source.rsplit(":", 1)[0] != self.entry["name"]:
            assert restored is not None
            if decide_opt_out(restored, OptOut(cast(Any, report.kind), report.at, report.reason)).new_status:
                return f"the provider reported {address} opted out of {change['list_code']} ({report.source})"
        if opts_in and report is not None:
            self.provider_kept.add(address)
        self.subs[key] = restored
        step.restored = restored.status if restored is not None else "no row"
        step.subscription = restored
        return None

    def _why_left_email(self, change: Row) -> str | None:
        cid = change["contact_id"]
        current = self.contacts.get(cid)
        moved = self._changed_since((cid, ""), current is not None and current[1] == email_key(change["new_email"]))
        if moved or not change["old_email"]:
            return moved or "the address before the change is not known"
        old_key = email_key(change["old_email"])
        others = self.owners.get(old_key, set()) - {cid} - self.moved_back.get(old_key, set())
        if others:
            return f"{change['old_email']} belongs to contact {min(others)} now: one address, two contacts"
        return None

    def _changed_since(self, key: tuple[int, str], as_left: bool) -> str | None:
        later = self.later.get(key)
        if later is not None:
            where = f"{later['source_file']}:{later['source_line']}" if later["source_file"] else "the CRM"
            return f"changed since by {later['rule']} ({where}, {later['origin']}, run {later['run_id']})"
        if key in self.left_lines:
            return f"line {self.left_lines[key]} of this file changed it again, and that change is left"
        if not as_left:
            return "changed since in the CRM"
        return None

    def _move_back(self, change: Row, step: Step) -> None:
        cid, old = change["contact_id"], cast(str, change["old_email"])
        self.owners.get(email_key(change["new_email"]), set()).discard(cid)
        self.owners.setdefault(email_key(old), set()).add(cid)
        self.moved_back.setdefault(email_key(old), set()).add(cid)
        self.contacts[cid] = (old, email_key(old), self.contacts[cid][2])
        step.restored = old

    def notes(self) -> list[str]:
        if not self.provider_kept:
            return []
        return [
            f"the provider's opt-outs of {', '.join(sorted(self.provider_kept))} stay remembered: these addresses are "
            "not sent as subscribed until the provider itself reports them subscribed again"
        ]


def _later_changes(connection: Connection, changes: list[Row]) -> dict[tuple[int, str], Row]:
    """Per (contact, list or ''), the newest change after the file's first that is not the file's own and has not
    been reverted itself (a change and its revert cancel out)."""
    if not changes:
        return {}
    mine = {c["id"] for c in changes}
    after = trail.changes_after(connection, {c["contact_id"] for c in changes}, min(mine))
    undone = {row["reverts"] for row in after if row["reverts"] is not None}
    later: dict[tuple[int, str], Row] = {}
    for row in after:
        if row["id"] not in mine and row["reverts"] is None and row["id"] not in undone:
            later[(row["contact_id"], row["list_code"])] = row
    return later


def _as_left(now: Subscription, change: Row) -> bool:
    """Whether the subscription is still as the change left it (older changes: its status and source)."""
    # A callback's change sets the source "provider" (it is the provider's report), audited as "callback".
    source = "provider" if change["origin"] == "callback" else change["origin"]
    if now.status != change["new_status"] or (source is not None and now.source != source):
        return False
    if change["new_status_at"] is None:
        return True
    return bool(now.status_at == change["new_status_at"] and now.reason == change["new_reason"])


def _restored(change: Row, now: Subscription, at: datetime, name: str) -> Subscription | None:
    """The subscription as it was before the change (None: it had no row); consent as it is, as no file
    changes it. An older change without the state before gets the revert's time and source."""
    if change["old_status"] is None:
        return None
    status = cast(Status, change["old_status"])
    if change["old_status_at"] is None:
        return Subscription(status, at, "admin", now.consent_at, now.consent_by, None)
    return Subscription(
        status, change["old_status_at"], change["old_source"], now.consent_at, now.consent_by, change["old_reason"]
    )


def _write_subscriptions(connection: Connection, final: dict[tuple[int, int], Subscription | None]) -> None:
    updates = [
        {"contact_id": cid, "list_id": lid, "status": s.status, "status_at": s.status_at, "source": s.source}
        | {"reason": s.reason}
        for (cid, lid), s in final.items()
        if s is not None
    ]
    crm.set_statuses(connection, updates, existing=True)
    crm.delete_subscriptions(connection, [key for key, s in final.items() if s is None])


def _audit_row(change: Row, step: Step, run_id: int | None, now: datetime, file_id: int) -> Row:
    restored = step.subscription
    row: Row = {
        "run_id": run_id,
        "contact_id": change["contact_id"],
        "list_code": change["list_code"],
        "old_status": change["new_status"] or None,
        "new_status": restored.status if restored is not None else "",
        "rule": "revert",
        "source_file": change["source_file"],
        "source_line": change["source_line"],
        "origin": "admin",
        "at": now,
        "file_id": file_id,
        "event": "revert",
        "reverts": change["id"],
        "old_status_at": change["new_status_at"],
        "old_source": change["origin"],
        "old_reason": change["new_reason"],
    }
    if restored is not None:
        row.update(new_status_at=restored.status_at, new_reason=restored.reason)
    if change["list_code"] == "":
        row.update(old_status=None, old_email=change["new_email"], new_email=change["old_email"])
    return row


def _what(change: Row, step: Step) -> str:
    if change["list_code"] == "":
        return f"address {change['new_email']} -> {change['old_email']}"
    return f"{change['list_code']} {change['new_status']} -> {step.restored}"


def describe(entry: Row) -> str:
    """A file's entry in a line: its name, the start of its sha256, its outcome, when, and the run."""
    at = f"{entry['at']:%Y-%m-%d %H:%M}"
    return f"{entry['name']} (sha256 {entry['sha256'][:12]}, {entry['outcome']} at {at}, run {entry['run_id']})"
