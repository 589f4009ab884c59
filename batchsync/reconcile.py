"""Reconcile: one staged inbound file -> rows -> sync rules -> one transaction.

For every file: the ledger is asked first (same content applied before: a recorded no-op); the whole file is
checked (a file that cannot be trusted goes to quarantine and applies nothing); then its rows are applied in
chunks inside a single transaction, together with the ledger entry, so a crash applies all of it or none.
Every row lands in ``NAME.result.csv``; every rejected row, with its line and reason, in ``NAME.errors.csv``
(same columns as the input, so it can be fixed and dropped back in)::

    outcome = Reconciler(profile, engine, clock, run_id).apply(staged)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from sqlalchemy import Connection, Engine

from batchsync import progress
from batchsync.clock import Clock
from batchsync.collect import StagedFile
from batchsync.config import Profile
from batchsync.db import crm, ledger
from batchsync.errors import BadFile, ConfigError
from batchsync.events import EventReader, InboundEvent, RowError
from batchsync.formats.csvfile import CsvWriter, Record, inspect_csv, read_records
from batchsync.rules import Subscription, decide_opt_out, suppresses, target_lists
from batchsync.workdir import WorkDir, move_unique, sha256_of, unique_path

log = logging.getLogger(__name__)
CHUNK = 5000
ACTIVITY = {"unsubscribe": "unsubscribe", "hard_bounce": "bounce", "complaint": "complaint", "clean": "clean"}


@dataclass
class FileOutcome:
    name: str
    outcome: str  # applied | duplicate | quarantined
    rows: int = 0
    changed: int = 0
    unchanged: int = 0
    no_contact: int = 0
    rejected: int = 0
    reason: str | None = None
    kept_at: Path | None = None
    result_path: Path | None = None
    errors_path: Path | None = None
    bounced: list[str] = field(default_factory=list)  # addresses that hard-bounced (the first thousand)


class Reconciler:
    def __init__(self, profile: Profile, engine: Engine, clock: Clock, run_id: int | None) -> None:
        self.profile, self.engine, self.clock, self.run_id = profile, engine, clock, run_id
        self.work = WorkDir.of(profile)

    def apply(self, staged: StagedFile, *, dry_run: bool = False) -> FileOutcome:
        sha = sha256_of(staged.path)
        size = staged.path.stat().st_size
        with self.engine.connect() as connection:
            earlier = ledger.applied_file(connection, self.profile.name, sha)
        if earlier is not None:
            return self._duplicate(staged, sha, size, earlier, dry_run)
        reader = EventReader(self.profile, staged.kind, self.clock.now())
        try:
            shape = inspect_csv(staged.path, staged.kind, reader.required_columns(), self.profile.work.max_file_bytes)
        except BadFile as exc:
            return self._quarantine(staged, sha, size, exc.reason, dry_run)
        folder = self.work.dry_run if dry_run else self.work.archive
        kept = unique_path(folder, staged.name)
        outcome = FileOutcome(staged.name, "applied", kept_at=kept)
        try:
            with self.engine.connect() as connection, connection.begin() as transaction:
                self._apply_rows(connection, staged, reader, shape.header, kept, outcome)
                self._record(connection, staged, sha, size, "applied", _summary(outcome))
                if dry_run:
                    transaction.rollback()
        except BaseException:
            # Nothing was applied: remove the half-written reports; the staged file is retried next run.
            for report in (outcome.result_path, outcome.errors_path):
                if report is not None:
                    report.unlink(missing_ok=True)
            raise
        if not dry_run:
            move_unique(staged.path, kept.parent, kept.name)
        log.info(
            "%s: %d rows, %d changes, %d unchanged, %d without contact, %d rejected",
            staged.name,
            outcome.rows,
            outcome.changed,
            outcome.unchanged,
            outcome.no_contact,
            outcome.rejected,
        )
        return outcome

    def _apply_rows(
        self,
        connection: Connection,
        staged: StagedFile,
        reader: EventReader,
        header: list[str],
        kept: Path,
        outcome: FileOutcome,
    ) -> None:
        outcome.result_path = kept.with_name(kept.name + ".result.csv")
        outcome.errors_path = kept.with_name(kept.name + ".errors.csv")
        kept.parent.mkdir(parents=True, exist_ok=True)
        with (
            CsvWriter(
                outcome.result_path, staged.kind, ["line", "email", "list", "event", "outcome", "detail"]
            ) as results,
            CsvWriter(outcome.errors_path, staged.kind, [*header, "bs_line", "bs_reason"]) as errors,
        ):
            batch = _FileBatch(self, connection, staged, results)
            for records in _chunks(read_records(staged.path, staged.kind), CHUNK):
                events: list[InboundEvent] = []
                for record in records:
                    outcome.rows += 1
                    try:
                        events.append(reader.read(record))
                    except RowError as exc:
                        outcome.rejected += 1
                        errors.write([*record.raw, str(record.line), str(exc)])
                        results.write(
                            [
                                record.line,
                                record.values.get(reader.columns.email, ""),
                                "",
                                "",
                                "rejected",
                                str(exc),
                            ]
                        )
                batch.apply(events, outcome)
                progress.report(f"import {staged.name}", outcome.rows)

    def _duplicate(
        self, staged: StagedFile, sha: str, size: int, earlier: dict[str, object], dry_run: bool
    ) -> FileOutcome:
        reason = f"same content as {earlier['name']} applied at {earlier['at']}"
        outcome = FileOutcome(staged.name, "duplicate", reason=reason)
        if not dry_run:
            with self.engine.begin() as connection:
                self._record(connection, staged, sha, size, "duplicate", reason)
            outcome.kept_at = move_unique(staged.path, self.work.archive, staged.name + ".duplicate")
        log.info("%s: duplicate, nothing applied (%s)", staged.name, reason)
        return outcome

    def _quarantine(self, staged: StagedFile, sha: str, size: int, reason: str, dry_run: bool) -> FileOutcome:
        outcome = FileOutcome(staged.name, "quarantined", reason=reason)
        if not dry_run:
            with self.engine.begin() as connection:
                self._record(connection, staged, sha, size, "quarantined", reason)
            outcome.kept_at = self.work.quarantine_file(staged.path, staged.name, f"{staged.origin}: {reason}")
        log.warning("%s quarantined: %s", staged.name, reason)
        return outcome

    def _record(
        self, connection: Connection, staged: StagedFile, sha: str, size: int, outcome: str, detail: str
    ) -> None:
        ledger.record_file(
            connection,
            profile=self.profile.name,
            sha256=sha,
            name=staged.name,
            origin=staged.origin,
            size=size,
            outcome=outcome,
            run_id=self.run_id,
            at=self.clock.now(),
            detail=detail,
        )


class _FileBatch:
    """Applies the events of one file, chunk by chunk, on one open transaction."""

    def __init__(self, owner: Reconciler, connection: Connection, staged: StagedFile, results: CsvWriter) -> None:
        self.profile, self.connection, self.staged, self.results = owner.profile, connection, staged, results
        self.run_id, self.now = owner.run_id, owner.clock.now()
        self.list_ids = crm.list_ids(connection, self.profile.lists)
        missing = [code for code in self.profile.lists if code not in self.list_ids]
        if missing:
            raise ConfigError(f"profile {self.profile.name}: no CRM list with code {', '.join(missing)}")

    def apply(self, events: list[InboundEvent], outcome: FileOutcome) -> None:
        contacts = crm.contacts_by_email(self.connection, (event.email_key for event in events))
        ids = [cid for found in contacts.values() for cid in found]
        self.current = crm.subscriptions_of(self.connection, ids, self.list_ids.values())
        stored = set(self.current)
        self.changes: dict[tuple[int, int], dict[str, object]] = {}
        self.audit: list[dict[str, object]] = []
        self.activities: list[dict[str, object]] = []
        self.echoes: list[dict[str, str]] = []
        self.suppress: dict[str, dict[str, object]] = {}
        for event in events:
            self._apply_event(event, contacts.get(event.email_key, []), outcome)
        changes = self.changes.items()
        crm.set_statuses(self.connection, [c for k, c in changes if k in stored], existing=True)
        crm.set_statuses(self.connection, [c for k, c in changes if k not in stored], existing=False)
        crm.suppress(self.connection, self.suppress)
        crm.add_activities(self.connection, self.activities)
        ledger.record_changes(self.connection, self.audit)
        ledger.note_provider_status(self.connection, self.profile.name, self.echoes)

    def _apply_event(self, event: InboundEvent, contact_ids: list[int], outcome: FileOutcome) -> None:
        opt, policy = event.opt_out, self.profile.policy
        if suppresses(opt.kind, policy.hard_bounce_suppresses):
            self.suppress.setdefault(
                event.email_key,
                {
                    "email": event.email,
                    "reason": opt.kind,
                    "at": opt.at,
                    "source": f"provider:{self.profile.name}",
                },
            )
        if opt.kind == "hard_bounce" and len(outcome.bounced) < 1000:
            outcome.bounced.append(event.email)
        lists = target_lists(opt.kind, event.list_code, list(self.profile.lists), policy.unsubscribe_all_lists)
        rules_used: list[str] = []
        changed = 0
        for contact_id in contact_ids:
            self.activities.append(
                {
                    "contact_id": contact_id,
                    "kind": ACTIVITY[opt.kind],
                    "at": opt.at,
                    "detail": f"{opt.reason}; lists {','.join(lists)}; {self.staged.name}:{event.line}",
                }
            )
            for code in lists:
                rule, did_change = self._decide(event, contact_id, code)
                who = f"contact {contact_id} " if len(contact_ids) > 1 else ""
                rules_used.append(f"{who}{code}: {rule}")
                changed += did_change
        if not contact_ids:
            label, detail = "no_contact", "no CRM contact with this email"
            outcome.no_contact += 1
        else:
            label, detail = ("applied" if changed else "unchanged"), "; ".join(rules_used)
            outcome.changed += bool(changed)
            outcome.unchanged += not changed
        self.results.write([event.line, event.email, ",".join(lists), opt.kind, label, detail])

    def _decide(self, event: InboundEvent, contact_id: int, code: str) -> tuple[str, bool]:
        opt = event.opt_out
        key = (contact_id, self.list_ids[code])
        before = self.current.get(key)
        decision = decide_opt_out(before, opt)
        if decision.new_status is None:
            return decision.rule, False
        self.current[key] = Subscription(decision.new_status, opt.at, "provider")
        self.changes[key] = {
            "contact_id": contact_id,
            "list_id": key[1],
            "status": decision.new_status,
            "status_at": opt.at,
            "source": "provider",
            "reason": opt.reason,
        }
        self.audit.append(
            {
                "run_id": self.run_id,
                "contact_id": contact_id,
                "list_code": code,
                "old_status": before.status if before else None,
                "new_status": decision.new_status,
                "rule": decision.rule,
                "source_file": self.staged.name,
                "source_line": event.line,
                "at": self.now,
            }
        )
        self.echoes.append({"list_code": code, "email_key": event.email_key, "status": decision.new_status})
        return decision.rule, True


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(islice(records, size)):
        yield chunk


def _summary(outcome: FileOutcome) -> str:
    return (
        f"rows={outcome.rows} changed={outcome.changed} unchanged={outcome.unchanged} "
        f"no_contact={outcome.no_contact} rejected={outcome.rejected}"
    )
