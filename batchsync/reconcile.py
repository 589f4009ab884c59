"""Reconcile: one staged inbound file -> rows -> sync rules -> one transaction.

For every file: a private snapshot is taken and everything after reads the snapshot, never the staged file a
slow writer may still be appending to; the ledger is asked first (same content applied before: a recorded
no-op); the whole file is checked (a file that cannot be trusted goes to quarantine and applies nothing); then
its rows are applied a batch at a time (``setimport``) inside a single transaction, which first claims the
content in the ledger (a unique key: a second process past the locks finds it taken and applies nothing), so a
crash applies all of it or none. Every row lands in ``NAME.result.csv``; every rejected row, with its line and
reason, in ``NAME.errors.csv`` (same columns as the input, so it can be fixed and dropped back in)::

    outcome = Reconciler(profile, engine, clock, run_id).apply(staged)

After the commit the snapshot is archived as what was applied. If the staged file changed meanwhile, what was
added after the snapshot becomes a file of its own (a header plus the new lines, applied next), or, when it is
not a plain append, the changed file goes to quarantine with that reason: never archived as applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from batchsync import progress
from batchsync.clock import Clock
from batchsync.collect import ORIGINS, REPORTED, StagedFile
from batchsync.config import Profile
from batchsync.db import crm, ledger
from batchsync.errors import BadFile, ConfigError
from batchsync.events import EventReader
from batchsync.formats.csvfile import ErrorsWriter, FileShape, ReportWriter, inspect_csv, read_records
from batchsync.rules import safety_stop
from batchsync.snapshot import Snapshot, archive, settle
from batchsync.tally import Tally
from batchsync.workdir import WorkDir, unique_path

log = logging.getLogger(__name__)
RESULT_COLUMNS = ["line", "email", "list", "event", "outcome", "detail"]


@dataclass(kw_only=True)
class FileOutcome(Tally):
    name: str
    outcome: str  # applied | duplicate | quarantined | waiting (still being written: next run)
    origin: str = "provider"
    reason: str | None = None
    kept_at: Path | None = None
    result_path: Path | None = None
    errors_path: Path | None = None
    follow_up: list[StagedFile] = field(default_factory=list)  # content added while the file was being applied


class Reconciler:
    def __init__(
        self, profile: Profile, engine: Engine, clock: Clock, run_id: int | None, *, force: bool = False
    ) -> None:
        self.profile, self.engine, self.clock, self.run_id = profile, engine, clock, run_id
        self.force = force  # apply even past the safety stop
        self.work = WorkDir.of(profile)

    def apply(self, staged: StagedFile, *, dry_run: bool = False) -> FileOutcome:
        snapshot = Snapshot.of(staged.path) if dry_run else Snapshot.take(staged)
        try:
            return self._apply(staged, snapshot, dry_run)
        except BaseException:
            # Before its commit, the snapshot is no use: the staged file is applied again next run. After it, it
            # is what was applied, and the next run finishes the file with it (finish_interrupted).
            if not dry_run and not self._committed(snapshot):
                snapshot.path.unlink(missing_ok=True)
            raise

    def _committed(self, snapshot: Snapshot) -> bool:
        try:
            with self.engine.connect() as connection:
                return ledger.applied_file(connection, self.profile.name, snapshot.sha256) is not None
        except Exception:  # cannot tell (the database is gone): keep it; the next run asks again
            return True

    def _apply(self, staged: StagedFile, snapshot: Snapshot, dry_run: bool) -> FileOutcome:
        with self.engine.connect() as connection:
            earlier = ledger.applied_file(connection, self.profile.name, snapshot.sha256)
        if earlier is not None:
            return self._duplicate(staged, snapshot, earlier, dry_run)
        reader = EventReader(self.profile, staged.kind, self.clock.now())
        try:
            shape = inspect_csv(snapshot.path, staged.kind, reader.required_columns(), self.profile.work.max_file_bytes)
        except BadFile as exc:
            return self._quarantine(staged, snapshot, exc.reason, dry_run)
        reader.use_header(shape.header)
        self._origin_by_content(staged, snapshot, shape.header)
        folder = self.work.dry_run if dry_run else self.work.archive
        kept = unique_path(folder, staged.name)
        outcome = FileOutcome(name=staged.name, outcome="applied", origin=staged.origin, kept_at=kept)
        try:
            with self.engine.connect() as connection, connection.begin() as transaction:
                file_id = self._claim(connection, staged, snapshot, kept)
                self._apply_rows(connection, staged, snapshot.path, reader, shape, kept, outcome, file_id)
                ledger.describe_file(connection, file_id, _summary(outcome))
                if not dry_run and not snapshot.ends_line() and not snapshot.matches(staged.path):
                    raise _StillWritten()  # its last line may be cut: apply none of it yet
                if dry_run:
                    transaction.rollback()
        except BaseException as exc:
            # Nothing was applied: remove the half-written reports; the staged file is retried next run.
            for report in (outcome.result_path, outcome.errors_path):
                if report is not None:
                    report.unlink(missing_ok=True)
            return self._not_applied(staged, snapshot, exc, dry_run)
        if not dry_run:
            outcome.follow_up = settle(staged, snapshot, self.work, applied=True)
            archive(snapshot, kept)
        log.info("%s: applied (%s); %s", staged.name, staged.origin, _summary(outcome))
        return outcome

    def _not_applied(self, staged: StagedFile, snapshot: Snapshot, exc: BaseException, dry_run: bool) -> FileOutcome:
        """A file whose transaction rolled back: quarantined past the safety stop, a duplicate when another
        process applied it first, left staged while it is still being written; any other error goes on up."""
        if isinstance(exc, _SafetyStop):
            return self._quarantine(staged, snapshot, str(exc), dry_run)
        if isinstance(exc, _Taken):
            with self.engine.connect() as connection:
                earlier = ledger.applied_file(connection, self.profile.name, snapshot.sha256)
            return self._duplicate(staged, snapshot, earlier or {"name": "?", "at": "?"}, dry_run)
        if isinstance(exc, _StillWritten):
            snapshot.path.unlink(missing_ok=True)
            reason = "still being written (it changed while it was read, and its last line may be cut): next run"
            log.warning("%s: %s", staged.name, reason)
            return FileOutcome(name=staged.name, outcome="waiting", origin=staged.origin, reason=reason)
        raise exc

    def _origin_by_content(self, staged: StagedFile, snapshot: Snapshot, header: list[str]) -> None:
        """A file taken as an admin's only by where it was dropped, that is the provider's report all the same:
        content collected from the provider's inbox before (a quarantined file imported again with --force), or
        an errors file of one of its files, fixed and dropped back in (its ``bs_origin`` column)."""
        if staged.origin != "admin" or staged.kind.origin is not None or staged.origin_given:
            return
        with self.engine.connect() as connection:
            seen = ledger.collected_from_provider(connection, self.profile.name, snapshot.sha256)
        if not seen and "bs_origin" in header:
            first = next(read_records(snapshot.path, staged.kind), None)
            seen = first is not None and first.values.get("bs_origin") in REPORTED
        if seen:
            staged.origin = "provider"
            log.info("%s: the provider's report (its content came from the provider's inbox)", staged.name)

    def _claim(self, connection: Connection, staged: StagedFile, snapshot: Snapshot, kept: Path) -> int:
        """The file's ledger entry, first thing in its transaction: the unique key on applied content makes a
        second application impossible, whatever the locks (PostgreSQL waits here for a concurrent one)."""
        try:
            return self._record(connection, staged, snapshot, "applied", "", kept)
        except IntegrityError:
            raise _Taken() from None  # the transaction rolls back: nothing of this file was applied

    def _apply_rows(
        self,
        connection: Connection,
        staged: StagedFile,
        source: Path,
        reader: EventReader,
        shape: FileShape,
        kept: Path,
        outcome: FileOutcome,
        file_id: int,
    ) -> None:
        # The set-based engine (polars) is loaded when a file is applied: the commands that apply none start without it.
        from batchsync.eventframe import EventFrames
        from batchsync.formats.csvframe import read_frames
        from batchsync.setimport import FileImport, Writers

        outcome.result_path = kept.with_name(kept.name + ".result.csv")
        outcome.errors_path = kept.with_name(kept.name + ".errors.csv")
        kept.parent.mkdir(parents=True, exist_ok=True)
        with (
            ReportWriter(outcome.result_path, staged.kind, RESULT_COLUMNS) as results,
            ErrorsWriter(outcome.errors_path, staged.kind, shape.header, staged.origin) as errors,
        ):
            ids = self._list_ids(connection)
            subscribed = crm.subscribed_counts(connection, ids)  # before the file: the safety stop's base
            writers, now = Writers(results, errors), self.clock.now()
            state = FileImport(
                self.profile, connection, staged, self.run_id, now, file_id, ids, shape.header, writers, outcome
            )
            events = EventFrames(reader, shape.header)
            for batch in read_frames(source, staged.kind, shape):
                state.apply(*events.read(batch))
                progress.report(f"import {staged.name}", outcome.rows)
            state.finish()
        if outcome.warnings:
            log.warning("%s: %d rows applied with a warning (see %s)", staged.name, outcome.warnings, results.path)
        policy = self.profile.policy
        opted_out = state.opted_out_counts()
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
        self, staged: StagedFile, snapshot: Snapshot, earlier: dict[str, object], dry_run: bool
    ) -> FileOutcome:
        reason = f"same content as {earlier['name']} applied at {earlier['at']}"
        if earlier.get("outcome") == "reverted":  # undone on purpose: the same content is not applied again
            reason += " and reverted since (a reverted file's content is never applied again)"
        outcome = FileOutcome(name=staged.name, outcome="duplicate", origin=staged.origin, reason=reason)
        if not dry_run:
            with self.engine.begin() as connection:
                self._record(connection, staged, snapshot, "duplicate", reason)
            outcome.follow_up = settle(staged, snapshot, self.work, applied=True)  # its content is applied
            outcome.kept_at = archive(snapshot, unique_path(self.work.archive, staged.name + ".duplicate"))
        log.info("%s: duplicate, nothing applied (%s)", staged.name, reason)
        return outcome

    def _quarantine(self, staged: StagedFile, snapshot: Snapshot, reason: str, dry_run: bool) -> FileOutcome:
        outcome = FileOutcome(name=staged.name, outcome="quarantined", origin=staged.origin, reason=reason)
        if not dry_run:
            with self.engine.begin() as connection:
                self._record(connection, staged, snapshot, "quarantined", reason)
            settle(staged, snapshot, self.work, applied=False)
            outcome.kept_at = self.work.quarantine_file(snapshot.path, staged.name, f"{staged.location}: {reason}")
        log.warning("%s quarantined: %s", staged.name, reason)
        return outcome

    def finish_interrupted(self) -> list[str]:
        """Snapshots a stopped process left in staging: one whose content the ledger holds as applied was
        committed (or found a duplicate) but not finished, so it is finished now, as after any apply; any other
        was never committed and is dropped (the staged file beside it is applied again)."""
        finished = []
        kinds = {entry.kind: entry for entry in self.profile.inbound}
        for path in sorted(self.work.staging.glob("*/*/.*.applying")):
            name = path.name[1 : -len(".applying")]
            kind, origin = kinds.get(path.parent.name), path.parent.parent.name
            if kind is None or origin not in ORIGINS:
                continue
            snapshot = Snapshot.of(path)
            with self.engine.connect() as connection:
                entry = ledger.applied_file(connection, self.profile.name, snapshot.sha256)
            if entry is None:
                path.unlink()
                continue
            kept = Path(str(entry["kept"])) if entry.get("kept") else self.work.archive / name
            staged = StagedFile(path.with_name(name), name, kind, f"staging:{name}", origin)
            settle(staged, snapshot, self.work, applied=True)
            archive(snapshot, kept if not kept.exists() else unique_path(kept.parent, kept.name))
            finished.append(name)
            log.warning("%s: applied before the process stopped; finished now", name)
        return finished

    def _record(
        self,
        connection: Connection,
        staged: StagedFile,
        snapshot: Snapshot,
        outcome: str,
        detail: str,
        kept: Path | None = None,
    ) -> int:
        return ledger.record_file(
            connection,
            profile=self.profile.name,
            sha256=snapshot.sha256,
            name=staged.name,
            origin=staged.location,
            size=snapshot.size,
            outcome=outcome,
            run_id=self.run_id,
            at=self.clock.now(),
            detail=detail,
            kept=str(kept) if kept is not None else None,
        )


class _SafetyStop(Exception):
    """The file opted out too large a share of a list: its transaction is rolled back, the file quarantined."""


class _Taken(Exception):
    """Another process applied the same content first."""


class _StillWritten(Exception):
    """The file changed while it was read and its snapshot ends in the middle of a line."""


def _summary(outcome: FileOutcome) -> str:
    return (
        f"rows={outcome.rows} changed={outcome.changed} unchanged={outcome.unchanged} "
        f"no_contact={outcome.no_contact} rejected={outcome.rejected} warnings={outcome.warnings}"
    )
