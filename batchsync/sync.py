"""One run of a profile: collect and reconcile what came in, then export what changed.

This is the library's front door; the CLI and the daemon call it and nothing below it::

    sync = Sync(load_profile(Path("profiles/mailup.toml")))
    sync.init()
    report = sync.run()          # import, then export
    report.imported.has_rejections

Every run that changes data is recorded in ``bs_runs``; a dry run writes its files under ``dry-run/`` and
records nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from batchsync.clock import Clock
from batchsync.collect import Collector, CollectReport, Origin, StagedFile
from batchsync.config import Profile
from batchsync.db import crm, ledger, snapshots
from batchsync.db.mapping import bind_crm_tables, create_all, missing_tables, refuse_misfits
from batchsync.db.schema import make_engine
from batchsync.engine.diff import Mode
from batchsync.errors import BatchsyncError, DatabaseError, DatabaseUnavailable, LockLost, disk_full, first_line
from batchsync.export import Exporter, ExportResult
from batchsync.locks import profile_lock
from batchsync.logs import log_fields
from batchsync.reconcile import FileOutcome, Reconciler
from batchsync.revert import Reverter, RevertPlan
from batchsync.transport import Submitter, Transport, open_transport
from batchsync.workdir import WorkDir

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    """What an import did: each file's outcome, names refused, files left waiting."""

    files: list[FileOutcome] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    dry_run: bool = False
    api_calls: int = 0  # requests the provider's API was asked for its reports

    @property
    def rejected(self) -> int:
        return sum(item.rejected for item in self.files)

    @property
    def has_rejections(self) -> bool:
        """Rows rejected, files quarantined or names refused: the run is done, but someone should look."""
        return bool(self.rejected or self.refused or any(item.outcome == "quarantined" for item in self.files))

    def counts(self) -> dict[str, int]:
        return {
            "files": len(self.files),
            "applied": sum(item.outcome == "applied" for item in self.files),
            "duplicates": sum(item.outcome == "duplicate" for item in self.files),
            "quarantined": sum(item.outcome == "quarantined" for item in self.files),
            "rows": sum(item.rows for item in self.files),
            "changed": sum(item.changed for item in self.files),
            "rejected": self.rejected,
            "warnings": sum(item.warnings for item in self.files),
            "refused_names": len(self.refused),
            "api_calls_in": self.api_calls,
        }


@dataclass
class RunReport:
    """What a run did: its ``bs_runs`` id, its import and its export."""

    run_id: int | None = None
    imported: ImportReport | None = None
    exported: ExportResult | None = None


@dataclass
class InitReport:
    """What ``init`` found missing and what it added."""

    tables_missing: list[str]
    lists_added: int = 0
    ledger_rows_migrated: int = 0  # rows of an earlier version's export ledger carried into snapshots


class Sync:
    """One profile's runs: init, import, export, run (import then export) and revert, each under the run lock and
    recorded in ``bs_runs``."""

    def __init__(
        self,
        profile: Profile,
        *,
        clock: Clock | None = None,
        engine: Engine | None = None,
        transport_factory: Callable[[Profile], Transport] = open_transport,
        stop: threading.Event | None = None,
        inbox_busy: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.profile = profile
        self.inbox_busy = inbox_busy  # names of inbox files still open somewhere (the daemon's watcher knows)
        self.clock = clock or Clock()
        # The profile's engine carries where its CRM tables are (db.mapping): every connection it opens knows.
        self.engine = bind_crm_tables(engine or make_engine(profile.database_url()), profile.database)
        self.transport_factory = transport_factory
        self.work = WorkDir.of(profile)
        self.stop = stop or threading.Event()  # set: finish the file in hand, then stop
        self._schema_ready = False

    def init(self, *, dry_run: bool = False) -> InitReport:
        """Create the tables, the profile's lists and groups, and the work folders; safe to repeat. Tables the
        profile maps onto the CRM's own are never created: they must be there with the canonical columns (a
        dry run fails as init would)."""
        with self._boundary():
            refuse_misfits(self.engine)
            report = InitReport(missing_tables(self.engine))
            if dry_run:
                return report
            create_all(self.engine)
            report.ledger_rows_migrated = snapshots.migrate_exported(self.engine)
            self.work.create()
            wanted = {code: (entry.name, list(entry.groups)) for code, entry in self.profile.lists.items()}
            with self.engine.begin() as connection:
                report.lists_added = crm.ensure_lists(connection, wanted)
        return report

    def import_files(
        self,
        files: Sequence[Path] = (),
        *,
        kind: str | None = None,
        origin: Origin | None = None,
        dry_run: bool = False,
        ready: Collection[str] = (),
        force: bool = False,
        remote: bool = True,
    ) -> ImportReport:
        """Collect and reconcile; ``ready`` names inbox files known to be complete (their writer closed them).
        ``files`` are taken instead of the inboxes, as an admin's unless ``origin`` (or their kind) says
        otherwise; every one is checked before any is staged."""
        with self._boundary(), self._locked(dry_run), self._recorded("import", dry_run) as run:
            report = self._import(run, _Ask(files, kind, origin, ready, force, remote), dry_run)
            run.record_import(report)
        return report

    def export(self, mode: Mode | None = None, *, dry_run: bool = False, force: bool = False) -> ExportResult:
        """Export; ``force`` uploads a list's file even past the export safety stop."""
        with self._boundary(), self._locked(dry_run), self._recorded("export", dry_run) as run:
            result = self._exporter(force).run(mode, dry_run=dry_run)
            run.record_export(result)
        return result

    def run(
        self, mode: Mode | None = None, *, dry_run: bool = False, slot: str | None = None, force: bool = False
    ) -> RunReport | None:
        """Import first, so that the export already carries what the provider reported.

        ``slot`` names a scheduled run (``nightly 2026-01-05T02:30``): a slot that any daemon has already run
        is not run again, and None is returned. ``force`` passes both safety stops, inbound and outbound.
        """
        with self._boundary(), self._locked(dry_run):
            if slot is not None:
                with self.engine.connect() as connection:
                    if ledger.slot_taken(connection, self.profile.name, slot):
                        return None
            with self._recorded("run", dry_run, slot) as run:
                imported = self._import(run, _Ask(force=force), dry_run)
                run.record_import(imported)
                if self.stop.is_set():
                    return RunReport(run.id, imported, None)
                exported = self._exporter(force).run(mode, dry_run=dry_run)
                run.record_export(exported)
        return RunReport(run.id, imported, exported)

    def revert(self, target: str, *, dry_run: bool = False) -> RevertPlan:
        """Undo the changes one applied file made (``batchsync.revert``), as a run of kind ``revert``; a dry run
        only plans. A file that cannot be found, or was reverted already, is an error before any run starts."""
        reverter = Reverter(self.profile, self.engine, self.clock)
        with self._locked(dry_run):
            entry = reverter.find(target)
            if dry_run:
                with self.engine.connect() as connection:
                    return reverter.plan(connection, entry)
            with self._recorded("revert", dry_run) as run:
                with self.engine.begin() as connection:
                    plan = reverter.plan(connection, entry)
                    reverter.apply(connection, plan, run.id)
                run.counts.update(reverted=len(plan.undone), left=len(plan.left))
                run.files.append(f"revert:{entry['name']}")
        return plan

    def _exporter(self, force: bool = False) -> Exporter:
        return Exporter(self.profile, self.engine, self.clock, self.transport_factory, self.stop, force=force)

    def _import(self, run: _Run, ask: _Ask, dry_run: bool) -> ImportReport:
        collector = Collector(self.profile, self.clock, dry_run=dry_run)
        reconciler = Reconciler(self.profile, self.engine, self.clock, run.id, force=ask.force)
        report = ImportReport(dry_run=dry_run)
        if not dry_run:
            reconciler.finish_interrupted()
        if ask.files:
            named = collector.resolve(ask.files, ask.kind)  # every file checked before any is staged
            collected = CollectReport(staged=[collector.from_path(path, entry, ask.origin) for path, entry in named])
            for staged in collected.staged:
                report.files += self._apply_one(reconciler, collector, None, staged, dry_run, collected)
            report.refused = collected.refused
            return report
        collected = CollectReport(staged=collector.left_in_staging())
        collector.from_local_inbox(collected, ask.ready, self.inbox_busy())
        transport = None
        try:
            if ask.remote and any(entry.remote_dir for entry in self.profile.inbound):
                transport = self.transport_factory(self.profile)
                collector.from_remote(transport, collected)
                report.api_calls = transport.calls if isinstance(transport, Submitter) else 0
            for staged in collected.staged:
                if self.stop.is_set():
                    log.info(
                        "stopping: %d staged files left for the next run", len(collected.staged) - len(report.files)
                    )
                    break
                report.files += self._apply_one(reconciler, collector, transport, staged, dry_run, collected)
        finally:
            if transport is not None:
                transport.close()
        report.refused, report.waiting = collected.refused, collected.waiting
        return report

    def _apply_one(
        self,
        reconciler: Reconciler,
        collector: Collector,
        transport: Transport | None,
        staged: StagedFile,
        dry_run: bool,
        collected: CollectReport,
    ) -> list[FileOutcome]:
        """Reconcile one staged file (each member, for a zip), then finish the remote original."""
        if staged.kind.unzip:
            members = collector.expand(staged, collected)
            if transport is not None and staged.remote_path is not None:
                collector.finish_remote(transport, staged)  # its members are staged: the zip is safe here
            return [outcome for member in members for outcome in self._reconcile(reconciler, member, dry_run)]
        outcomes = self._reconcile(reconciler, staged, dry_run)
        if transport is not None and staged.remote_path is not None:
            collector.finish_remote(transport, staged)
        return outcomes

    def _reconcile(self, reconciler: Reconciler, staged: StagedFile, dry_run: bool) -> list[FileOutcome]:
        """Apply a file, then what was appended to it while it was applied (a file of its own)."""
        outcomes = [reconciler.apply(staged, dry_run=dry_run)]
        for follow_up in outcomes[0].follow_up:
            outcomes += self._reconcile(reconciler, follow_up, dry_run)
        return outcomes

    @contextmanager
    def _boundary(self) -> Iterator[None]:
        """The database driver's and the OS's errors made batchsync's own, at the library's front door, with the
        profile on every line logged meanwhile."""
        with log_fields(profile=self.profile.name):
            try:
                yield
            except (OperationalError, InterfaceError) as exc:
                where = self.engine.url.render_as_string(hide_password=True)
                raise DatabaseUnavailable(f"the database {where} cannot be used: {first_line(exc)}") from exc
            except OSError as exc:
                full = disk_full(exc, str(self.work.root))
                if full is None:
                    raise
                raise full from exc

    def _require_schema(self) -> None:
        """Refuse a database that lacks batchsync's tables or columns; checked once per Sync, not on every
        poll of a long-running daemon."""
        if self._schema_ready:
            return
        refuse_misfits(self.engine)  # init cannot help there: the CRM's own tables are not batchsync's to change
        missing = missing_tables(self.engine)
        if missing:
            raise DatabaseError(
                f"the database lacks {', '.join(missing)}: run `batchsync init -p {self.profile.name}` first"
            )
        self._schema_ready = True

    @contextmanager
    def _locked(self, dry_run: bool) -> Iterator[None]:
        """Hold the profile's run lock; a run that a dead process left open is closed as failed first."""
        self._require_schema()
        if dry_run:
            yield
            return
        with profile_lock(self.profile, self.engine):
            with self.engine.begin() as connection:
                closed = ledger.fail_open_runs(connection, self.profile.name, self.clock.now())
            if closed:
                log.warning(
                    "profile %s: %d run(s) left open by a stopped process marked failed", self.profile.name, closed
                )
            yield

    @contextmanager
    def _recorded(self, kind: str, dry_run: bool, slot: str | None = None) -> Iterator[_Run]:
        run = _Run()
        if dry_run:
            yield run
            return
        with self.engine.begin() as connection:
            run.id = ledger.start_run(connection, self.profile.name, kind, self.clock.now(), slot)
        with log_fields(run=run.id):
            try:
                yield run
            except LockLost:
                raise  # another run may hold the lock now: this one writes nothing more, not even its end
            except BaseException as exc:
                self._finish_failed(run, exc)
                raise
            if self.stop.is_set():  # a stop signal ended it early: what is left waits, and a night is run again
                self._finish(run, "interrupted", "stopped by a signal before the end; the next run carries on")
                return
            if run.stopped:
                self._finish(run, "stopped", "; ".join(run.stopped))
                return
            outcome = "rejected" if run.counts.get("rejected") or run.counts.get("quarantined") else "ok"
            self._finish(run, outcome, None)

    def _finish_failed(self, run: _Run, exc: BaseException) -> None:
        """Record the failure where the database still takes it; where it does not (it is down), the next run
        closes this one as interrupted."""
        if isinstance(exc, KeyboardInterrupt):
            message = "stopped at once by a second stop signal"
        elif isinstance(exc, BatchsyncError):
            message = str(exc)
        else:  # the first line only: a driver's error goes on with the statement, which /healthz must not show
            message = f"{type(exc).__name__}: {first_line(exc)}"
        try:
            self._finish(run, "failed", message)
        except SQLAlchemyError as error:
            log.debug("could not record run %s as failed: %s", run.id, first_line(error))

    def _finish(self, run: _Run, outcome: str, message: str | None) -> None:
        with self.engine.begin() as connection:
            assert run.id is not None
            ledger.finish_run(connection, run.id, outcome, run.counts, run.files, message, self.clock.now())


@dataclass
class _Ask:
    """What an import was asked to take: named files (of a kind, an origin) or the inboxes."""

    files: Sequence[Path] = ()
    kind: str | None = None
    origin: Origin | None = None
    ready: Collection[str] = ()
    force: bool = False
    remote: bool = True  # False: the local inbox and staging only (a callback's file, cut a moment ago)


@dataclass
class _Run:
    """The ``bs_runs`` row of the run in hand: its id, and the counts, files and stops it finishes with."""

    id: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    def record_import(self, report: ImportReport) -> None:
        self.counts.update(report.counts())
        self.files += [f"in:{item.name}:{item.outcome}" for item in report.files]

    def record_export(self, result: ExportResult) -> None:
        self.counts.update(
            {
                "full_export": int(result.mode == "full"),
                "exported_rows": result.rows,
                "tombstones": sum(item.tombstones for item in result.files),
                "exported_files": sum(item.uploaded for item in result.files),
                "duplicate_emails": sum(item.duplicates for item in result.files),
                "invalid_emails": sum(item.invalid for item in result.files),
                "export_stopped": len(result.stopped),
                "provider_refused": result.rejected,
                "api_calls_out": result.api_calls,
            }
        )
        self.stopped += result.stopped
        self.files += [f"out:{item.remote_path}" for item in result.files if item.uploaded]
