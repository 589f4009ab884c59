"""The import as it applied rows before the set-based engine: one event at a time, under ``rules``, in chunks of
5000 rows. Kept in the tests as the reference the set-based import (``batchsync.setimport``) is checked against
(``test_setimport_oracle``): the same file on the same CRM must leave the same tables and reports.

Taken from batchsync/apply.py and reconcile.py as they were (commit aa1b5c6), with the statements they used that
the import no longer needs (``crm.suppress``, ``crm.activity_counts``, ``crm.contact_emails``) copied here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from batchsync.collect import REPORTED, StagedFile
from batchsync.config import Profile
from batchsync.db import crm, driver, ledger
from batchsync.db.mapping import crm_tables
from batchsync.db.optouts import ProviderOptOuts
from batchsync.events import EventReader, InboundEvent, RowError
from batchsync.formats.csvfile import CsvWriter, ErrorsWriter, ReportWriter, inspect_csv, read_records, restored
from batchsync.rules import (
    OPT_OUT_KINDS,
    OPTED_OUT,
    EventKind,
    OptOut,
    Subscription,
    decide_later_in_file,
    decide_opt_out,
    email_change_conflict,
    email_key,
    opt_out_status,
    soft_bounce_cleans,
    suppresses,
    target_lists,
)
from batchsync.tally import Tally  # the counts, not the logic the oracle checks

ACTIVITY = {
    "unsubscribe": "unsubscribe",
    "hard_bounce": "bounce",
    "complaint": "complaint",
    "clean": "clean",
    "soft_bounce": "soft_bounce",
    "open": "open",
    "click": "click",
    "email_change": "email_change",
    "subscribe": "subscribe",
}


class EventApplier:
    def __init__(
        self,
        profile: Profile,
        connection: Connection,
        staged: StagedFile,
        run_id: int | None,
        now: datetime,
        results: CsvWriter,
        errors: ErrorsWriter,
        list_ids: dict[str, int],
        file_id: int | None = None,
    ) -> None:
        self.profile, self.connection, self.run_id, self.now = profile, connection, run_id, now
        self.file_id = file_id  # the file's bs_files row: its changes name it, so that it can be reverted
        self.source, self.origin = staged.name, staged.origin
        # A provider's callback is the provider's report, audited as a callback; its statuses are the provider's.
        self.reported = staged.origin in REPORTED
        self.status_source = "provider" if self.reported else staged.origin
        self.results, self.errors, self.list_ids = results, errors, list_ids
        self.opted_out: dict[str, set[str]] = defaultdict(set)  # list -> addresses this file took off it
        self.touched: set[tuple[int, int]] = set()  # (contact, list) rows an earlier row of this file changed

    def apply(self, events: list[InboundEvent], tally: Tally) -> None:
        keys = {event.email_key for event in events} | {email_key(e.new_email) for e in events if e.new_email}
        self.contacts = crm.contacts_by_email(self.connection, keys)
        ids = [cid for found in self.contacts.values() for cid in found]
        self.stored = crm.subscriptions_of(self.connection, ids, self.list_ids.values())
        self.current: dict[tuple[int, int], Subscription] = {}  # as this chunk left them
        bouncing = [cid for e in events if e.kind == "soft_bounce" for cid in self.contacts.get(e.email_key, [])]
        self.soft_bounces: Counter[int] = Counter(_activity_counts(self.connection, bouncing, "soft_bounce"))
        self.reports = ProviderOptOuts(self.connection, self.profile.name, keys)
        self.changes: dict[tuple[int, int], dict[str, Any]] = {}
        self.audit: list[dict[str, Any]] = []
        self.activities: list[dict[str, Any]] = []
        self.echoes: dict[tuple[str, str], dict[str, str]] = {}  # (list, address) -> the status the provider has
        self.suppress: dict[str, dict[str, Any]] = {}
        for event in events:
            self._apply_event(event, tally)
        crm.set_statuses(self.connection, [c for k, c in self.changes.items() if k in self.stored], existing=True)
        crm.set_statuses(self.connection, [c for k, c in self.changes.items() if k not in self.stored], existing=False)
        _suppress(self.connection, self.suppress)
        crm.add_activities(self.connection, self.activities)
        ledger.record_changes(self.connection, self.audit)
        ledger.note_provider_status(self.connection, self.profile.name, list(self.echoes.values()))
        self.reports.save(self.now)

    def _apply_event(self, event: InboundEvent, tally: Tally) -> None:
        contact_ids = self.contacts.get(event.email_key, [])
        lists = self._lists(event, self.profile.policy.unsubscribe_all_lists)
        if event.kind == "hard_bounce" and len(tally.bounced) < 1000:
            tally.bounced.append(event.email)
        if event.warning is not None:
            tally.warnings += 1
        if event.kind in OPT_OUT_KINDS:
            self._note_suppression(event, event.kind)  # type: ignore[arg-type]
            if self.reported:
                self._remember_report(event)
        if event.kind == "email_change" and self.reported:
            # The provider has the new address now, whatever the CRM makes of the change: its opt-outs follow.
            assert event.new_email is not None
            self.reports.carry(event.email_key, email_key(event.new_email), event.new_email)
        if event.kind == "subscribe":
            self._on_subscribe(event, lists, tally)
            return
        if not contact_ids:
            self._result(event, lists, "no_contact", "no CRM contact with this email", tally)
            return
        handler = getattr(self, f"_on_{event.kind}", None) or self._on_opt_out
        handler(event, contact_ids, lists, tally)

    def _lists(self, event: InboundEvent, all_lists: bool) -> list[str]:
        kind = event.kind if event.kind in OPT_OUT_KINDS else "unsubscribe"
        return target_lists(kind, event.list_code, list(self.profile.lists), all_lists)  # type: ignore[arg-type]

    def _remember_report(self, event: InboundEvent) -> None:
        """The provider's own opt-out, for the lists its report covers (not those the profile's policy adds: the
        provider does not know of those, so they go out in the next export): remembered for good, and noted in
        the ledger so that it is not echoed back, whatever the CRM's state."""
        status = opt_out_status(event.kind)  # type: ignore[arg-type]
        for code in self._lists(event, False):
            where = f"{self.source}:{event.line}"
            self.reports.remember(code, event.email_key, event.email, event.kind, event.at, event.reason, where)
            echo = {"list_code": code, "email_key": event.email_key, "status": status}
            self.echoes.pop((code, event.email_key), None)  # the last row's status, written once
            self.echoes[(code, event.email_key)] = echo

    # --- handlers: each writes the row's result -----------------------------------------------------------

    def _on_opt_out(self, event: InboundEvent, contact_ids: list[int], lists: list[str], tally: Tally) -> None:
        self._opt_out(event, event.opt_out, contact_ids, lists, tally)

    def _on_soft_bounce(self, event: InboundEvent, contact_ids: list[int], lists: list[str], tally: Tally) -> None:
        threshold = self.profile.policy.soft_bounce_threshold
        cleans = False
        for contact_id in contact_ids:
            cleans |= soft_bounce_cleans(self.soft_bounces[contact_id], threshold)
            self.soft_bounces[contact_id] += 1
            self._activity(contact_id, event, f"soft bounce {self.soft_bounces[contact_id]} of {threshold}")
        if not cleans:
            self._result(event, lists, "applied", f"soft bounce counted (cleaned at {threshold})", tally)
            return
        self._note_suppression(event, "clean")
        rule = OptOut("clean", event.at, f"{threshold} soft bounces")
        self._opt_out(event, rule, contact_ids, list(self.profile.lists), tally, activity=False)

    def _on_email_change(self, event: InboundEvent, contact_ids: list[int], lists: list[str], tally: Tally) -> None:
        assert event.new_email is not None
        new_key = email_key(event.new_email)
        owner = email_change_conflict(contact_ids, self.contacts.get(new_key, []))
        if owner is not None:
            self._reject(event, f"the new address {event.new_email} belongs to another contact ({owner})", tally)
            return
        before = _contact_emails(self.connection, contact_ids)
        for contact_id in contact_ids:
            crm.change_email(self.connection, contact_id, event.new_email, new_key, self.now)
            self._activity(contact_id, event, f"{event.email} -> {event.new_email}")
            # Audited as a row of its own, no list and no status: a revert puts the address back.
            more = {"event": "email_change", "old_email": before.get(contact_id), "new_email": event.new_email}
            self._audit(event, contact_id, "", "", "email change", **more)
        if new_key != event.email_key:  # the next rows of the file see the address taken
            self.contacts[new_key] = sorted({*self.contacts.get(new_key, []), *contact_ids})
            del self.contacts[event.email_key]
        if self.reported:  # the provider has the new address: the ledger's rows follow
            ledger.rename_exported(self.connection, self.profile.name, event.email_key, new_key, event.new_email)
        self._result(event, lists, "applied", f"email changed to {event.new_email}", tally)

    def _on_subscribe(self, event: InboundEvent, lists: list[str], tally: Tally) -> None:
        if not self.reported:
            self._result(event, lists, "unchanged", "only the provider's own subscribe clears its opt-outs", tally)
            return
        cleared = [code for code in self._lists(event, False) if self.reports.forget(code, event.email_key, event.at)]
        for contact_id in self.contacts.get(event.email_key, []):
            self._activity(contact_id, event, f"{event.reason}; lists {','.join(cleared) or 'none'}")
        if cleared:
            detail = f"the provider's opt-out of {','.join(cleared)} cleared: it has the address subscribed again"
            self._result(event, cleared, "applied", detail, tally)
        elif not self.contacts.get(event.email_key):
            self._result(event, lists, "no_contact", "no CRM contact with this email", tally)
        else:
            self._result(event, lists, "unchanged", "no older opt-out of the provider's to clear", tally)

    def _on_open(self, event: InboundEvent, contact_ids: list[int], lists: list[str], tally: Tally) -> None:
        for contact_id in contact_ids:
            self._activity(contact_id, event, event.reason)
        self._result(event, lists, "applied", f"{event.kind} recorded as an activity", tally)

    _on_click = _on_open

    def _on_update(self, event: InboundEvent, contact_ids: list[int], lists: list[str], tally: Tally) -> None:
        fields = {}
        for column in self.profile.export.columns:
            if column.direction in ("in", "both") and column.header in event.values:
                reverse = {provider: crm_value for crm_value, provider in column.values.items()}
                value = restored(event.values[column.header].strip())
                fields[column.field] = reverse.get(value, value)
        for contact_id in contact_ids:
            crm.update_fields(self.connection, contact_id, fields, self.now)
        detail = f"fields updated: {', '.join(sorted(fields))}" if fields else "no field mapped as in or both"
        self._result(event, lists, "applied" if fields else "unchanged", detail, tally)

    def _on_ignore(self, event: InboundEvent, contact_ids: list[int], lists: list[str], tally: Tally) -> None:
        self._result(event, lists, "unchanged", f"no action for {event.reason}", tally)

    # --- the rules at work ----------------------------------------------------------------------------------

    def _opt_out(
        self,
        event: InboundEvent,
        opt: OptOut,
        contact_ids: list[int],
        lists: list[str],
        tally: Tally,
        activity: bool = True,
    ) -> None:
        rules_used: list[str] = []
        changed = 0
        for contact_id in contact_ids:
            if activity:
                self._activity(contact_id, event, f"{opt.reason}; lists {','.join(lists)}")
            for code in lists:
                rule, did_change = self._decide(event, opt, contact_id, code)
                who = f"contact {contact_id} " if len(contact_ids) > 1 else ""
                rules_used.append(f"{who}{code}: {rule}")
                changed += did_change
        self._result(event, lists, "applied" if changed else "unchanged", "; ".join(rules_used), tally)

    def _decide(self, event: InboundEvent, opt: OptOut, contact_id: int, code: str) -> tuple[str, bool]:
        key = (contact_id, self.list_ids[code])
        before = self.current[key] if key in self.current else self.stored.get(key)
        if key in self.touched and before is not None and before.status in OPTED_OUT:
            decision = decide_later_in_file(before, opt)
        else:
            decision = decide_opt_out(before, opt)
        if decision.new_status is None:
            return decision.rule, False
        if before is not None and before.status in ("subscribed", "pending"):
            self.opted_out[code].add(event.email_key)
        self.touched.add(key)
        self.current[key] = Subscription(decision.new_status, opt.at, self.status_source, reason=opt.reason)
        self.changes[key] = {
            "contact_id": contact_id,
            "list_id": key[1],
            "status": decision.new_status,
            "status_at": opt.at,
            "source": self.status_source,
            "reason": opt.reason,
        }
        more = {"event": opt.kind, "new_status_at": opt.at, "new_reason": opt.reason}
        self._audit(event, contact_id, code, decision.new_status, decision.rule, **more)
        if before is not None:  # what a revert puts back (no row before: the revert removes the row)
            self.audit[-1].update(
                old_status=before.status,
                old_status_at=before.status_at,
                old_source=before.source,
                old_reason=before.reason,
            )
        return decision.rule, True

    def _audit(self, row: InboundEvent, contact_id: int, code: str, new_status: str, rule: str, **more: Any) -> None:
        """A bs_changes row of this file's ``row`` (its line, origin, run and file); ``more`` adds columns."""
        self.audit.append(
            {
                "run_id": self.run_id,
                "contact_id": contact_id,
                "list_code": code,
                "old_status": None,
                "new_status": new_status,
                "rule": rule,
                "source_file": self.source,
                "source_line": row.line,
                "at": self.now,
                "origin": self.origin,
                "file_id": self.file_id,
                **more,
            }
        )

    def _note_suppression(self, event: InboundEvent, kind: EventKind) -> None:
        if suppresses(kind, self.profile.policy.hard_bounce_suppresses):
            reason = "soft_bounce" if event.kind == "soft_bounce" else kind
            self.suppress.setdefault(
                event.email_key,
                {
                    "email": event.email,
                    "reason": reason,
                    "at": event.at,
                    "source": f"{self.origin}:{self.profile.name}",
                },
            )

    def _activity(self, contact_id: int, event: InboundEvent, detail: str) -> None:
        self.activities.append(
            {
                "contact_id": contact_id,
                "kind": ACTIVITY.get(event.kind, event.kind),
                "at": event.at,
                "detail": f"{detail}; {self.origin} {self.source}:{event.line}",
            }
        )

    def _result(self, event: InboundEvent, lists: list[str], label: str, detail: str, tally: Tally) -> None:
        if label == "applied":
            tally.changed += 1
        elif label == "no_contact":
            tally.no_contact += 1
        else:
            tally.unchanged += 1
        if event.warning is not None:
            detail = f"warning: {event.warning}; {detail}"
        self.results.write([event.line, event.email, ",".join(lists), event.kind, label, detail])

    def _reject(self, event: InboundEvent, reason: str, tally: Tally) -> None:
        tally.rejected += 1
        self.errors.write(event.raw, event.line, reason)
        self.results.write([event.line, event.email, "", event.kind, "rejected", reason])


def _suppress(connection: Connection, entries: Mapping[str, Mapping[str, Any]]) -> int:
    if not entries:
        return 0
    suppressions = crm_tables(connection).sql_name("suppressions", connection)
    condition, values = driver.one_of(connection, "email_key", list(entries))
    statement = f"SELECT email_key FROM {suppressions} WHERE {condition}"
    known = {row[0] for row in driver.query(connection, statement, values)}
    new = [
        (key, e["email"], e["reason"], driver.stored_time(connection, e["at"]), e["source"])
        for key, e in entries.items()
        if key not in known
    ]
    driver.insert_many(connection, suppressions, ("email_key", "email", "reason", "at", "source"), new)
    return len(new)


def _activity_counts(connection: Connection, contact_ids: Iterable[int], kind: str) -> dict[int, int]:
    ids = list(set(contact_ids))
    if not ids:
        return {}
    activities = crm_tables(connection).activities
    query = (
        select(activities.c.contact_id, func.count())
        .where(activities.c.contact_id.in_(ids), activities.c.kind == kind)
        .group_by(activities.c.contact_id)
    )
    return {contact_id: int(count) for contact_id, count in connection.execute(query)}


def _contact_emails(connection: Connection, contact_ids: Iterable[int]) -> dict[int, str]:
    ids = list(set(contact_ids))
    if not ids:
        return {}
    contacts = crm_tables(connection).contacts
    return dict(connection.execute(select(contacts.c.id, contacts.c.email).where(contacts.c.id.in_(ids))).all())


def apply_file(
    profile: Profile,
    connection: Connection,
    staged: StagedFile,
    run_id: int | None,
    now: datetime,
    file_id: int | None,
    results: ReportWriter,
    errors: ErrorsWriter,
    chunks: list[int],
) -> tuple[Tally, dict[str, int]]:
    """The rows of an inspected file applied as the import applied them, in chunks of the sizes given (it took
    5000 rows each): (the tally, the safety stop's counts)."""
    path = staged.path
    reader = EventReader(profile, staged.kind, now)
    shape = inspect_csv(path, staged.kind, reader.required_columns(), 10**12)
    reader.use_header(shape.header)
    ids = crm.list_ids(connection, profile.lists)
    tally = Tally()
    batch = EventApplier(profile, connection, staged, run_id, now, results, errors, ids, file_id)
    records = list(read_records(path, staged.kind))
    start = 0
    for size in chunks:
        events = []
        chunk, start = records[start : start + size], start + size
        for record in chunk:
            tally.rows += 1
            try:
                events.append(reader.read(record))
            except RowError as exc:
                tally.rejected += 1
                errors.write(record.raw, record.line, str(exc))
                results.write([record.line, record.values.get(reader.columns.email, ""), "", "", "rejected", str(exc)])
        batch.apply(events, tally)
    return tally, {code: len(keys) for code, keys in batch.opted_out.items()}
