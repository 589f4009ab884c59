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
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from sqlalchemy import Connection, Engine

from batchsync import progress
from batchsync.apply import EventApplier, Tally
from batchsync.clock import Clock
from batchsync.collect import StagedFile
from batchsync.config import Profile
from batchsync.db import crm, ledger
from batchsync.errors import BadFile, ConfigError
from batchsync.events import EventReader, InboundEvent, RowError
from batchsync.formats.csvfile import CsvWriter, Record, inspect_csv, read_records
from batchsync.rules import safety_stop
from batchsync.workdir import WorkDir, move_unique, sha256_of, unique_path

log = logging.getLogger(__name__)
CHUNK = 5000


@dataclass(kw_only=True)
class FileOutcome(Tally):
    name: str
    outcome: str  # applied | duplicate | quarantined
    reason: str | None = None
    kept_at: Path | None = None
    result_path: Path | None = None
    errors_path: Path | None = None


class Reconciler:
    def __init__(
        self, profile: Profile, engine: Engine, clock: Clock, run_id: int | None, *, force: bool = False
    ) -> None:
        self.profile, self.engine, self.clock, self.run_id = profile, engine, clock, run_id
        self.force = force  # apply even past the safety stop
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
        outcome = FileOutcome(name=staged.name, outcome="applied", kept_at=kept)
        try:
            with self.engine.connect() as connection, connection.begin() as transaction:
                self._apply_rows(connection, staged, reader, shape.header, kept, outcome)
                self._record(connection, staged, sha, size, "applied", _summary(outcome))
                if dry_run:
                    transaction.rollback()
        except BaseException as exc:
            # Nothing was applied: remove the half-written reports; the staged file is retried next run.
            for report in (outcome.result_path, outcome.errors_path):
                if report is not None:
                    report.unlink(missing_ok=True)
            if isinstance(exc, _SafetyStop):
                return self._quarantine(staged, sha, size, str(exc), dry_run)
            raise
        if not dry_run:
            move_unique(staged.path, kept.parent, kept.name)
        log.info("%s: applied; %s", staged.name, _summary(outcome))
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
            ids = self._list_ids(connection)
            subscribed = crm.subscribed_counts(connection, ids)  # before the file: the safety stop's base
            batch = EventApplier(
                self.profile, connection, staged.name, self.run_id, self.clock.now(), results, errors, ids
            )
            for records in _chunks(read_records(staged.path, staged.kind), CHUNK):
                batch.apply(_read_events(records, reader, outcome, results, errors), outcome)
                progress.report(f"import {staged.name}", outcome.rows)
        policy = self.profile.policy
        opted_out = {code: len(keys) for code, keys in batch.opted_out.items()}
        stop = safety_stop(opted_out, subscribed, policy.max_unsubscribe_share, policy.safety_min_unsubscribes)
        if stop is not None and not self.force:
            raise _SafetyStop(stop)  # rolls the file's transaction back

    def _list_ids(self, connection: Connection) -> dict[str, int]:
        ids = crm.list_ids(connection, self.profile.lists)
        missing = [code for code in self.profile.lists if code not in ids]
        if missing:
            raise ConfigError(f"profile {self.profile.name}: no CRM list with code {', '.join(missing)}")
        return ids

    def _duplicate(
        self, staged: StagedFile, sha: str, size: int, earlier: dict[str, object], dry_run: bool
    ) -> FileOutcome:
        reason = f"same content as {earlier['name']} applied at {earlier['at']}"
        outcome = FileOutcome(name=staged.name, outcome="duplicate", reason=reason)
        if not dry_run:
            with self.engine.begin() as connection:
                self._record(connection, staged, sha, size, "duplicate", reason)
            outcome.kept_at = move_unique(staged.path, self.work.archive, staged.name + ".duplicate")
        log.info("%s: duplicate, nothing applied (%s)", staged.name, reason)
        return outcome

    def _quarantine(self, staged: StagedFile, sha: str, size: int, reason: str, dry_run: bool) -> FileOutcome:
        outcome = FileOutcome(name=staged.name, outcome="quarantined", reason=reason)
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


class _SafetyStop(Exception):
    """The file opted out too large a share of a list: its transaction is rolled back, the file quarantined."""


def _read_events(
    records: list[Record], reader: EventReader, outcome: FileOutcome, results: CsvWriter, errors: CsvWriter
) -> list[InboundEvent]:
    """The chunk's rows as events; a row that cannot be read goes to the errors file with its line and reason."""
    events: list[InboundEvent] = []
    for record in records:
        outcome.rows += 1
        try:
            events.append(reader.read(record))
        except RowError as exc:
            outcome.rejected += 1
            errors.write([*record.raw, str(record.line), str(exc)])
            results.write([record.line, record.values.get(reader.columns.email, ""), "", "", "rejected", str(exc)])
    return events


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while chunk := list(islice(records, size)):
        yield chunk


def _summary(outcome: FileOutcome) -> str:
    return (
        f"rows={outcome.rows} changed={outcome.changed} unchanged={outcome.unchanged} "
        f"no_contact={outcome.no_contact} rejected={outcome.rejected}"
    )
