"""Export: one file per list of the profile, from the CRM's rows, compared with the export ledger, then uploaded.

    result = Exporter(profile, engine, clock).run(mode="diff")

A *full* export writes every row; a *diff* writes the rows whose content or status changed since the last
confirmed export, and a tombstone (an unsubscribed row) for every address that left the list. How a list's
rows are made and compared is ``engine.diff``'s (its docstring has the algorithm on one page); this module
names the files, holds back what the safety stop stops, uploads, and makes the ledger's new generation current
only after the provider's server confirms the whole file (``db.snapshots``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine

from batchsync.clock import Clock, utc_stamp
from batchsync.config import Profile
from batchsync.db import crm, snapshots
from batchsync.delivery import Delivery
from batchsync.engine.build import written_columns
from batchsync.engine.crmread import ListPlace
from batchsync.engine.csvout import ListFiles
from batchsync.engine.diff import Mode, export_list
from batchsync.engine.scan import CrmScan
from batchsync.errors import ConfigError, TransportError
from batchsync.formats.csvfile import ReportWriter
from batchsync.formats.package import package
from batchsync.locks import ensure_lock_held
from batchsync.rules import email_key, export_safety_stop
from batchsync.transport import Submitter, Transport, open_transport
from batchsync.transport.retry import RetryPolicy
from batchsync.workdir import WorkDir, unique_path

log = logging.getLogger(__name__)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass
class ExportedFile:
    """What one list's export made: its files (held back, or uploaded), counts and reports."""

    list_code: str
    local_path: Path | None = None
    remote_path: str | None = None
    rows: int = 0
    tombstones: int = 0
    duplicates: int = 0
    invalid: int = 0
    uploaded: bool = False
    reports: list[Path] = field(default_factory=list)
    uploads: list[Path] = field(default_factory=list)  # every file that goes up, in order (data, then maps)
    taken_off: int = 0  # addresses the provider has from us as subscribed that this file opts out or tombstones
    stopped: str | None = None  # why the safety stop held the file back (nothing of it uploaded)
    rejected: int = 0  # rows the provider's API refused (in the .rejected.csv report; sent again next run)
    api_calls: int = 0  # requests this list's submission made to the provider's API


@dataclass
class ExportResult:
    """One export run: the mode and a file per list."""

    mode: Mode
    dry_run: bool
    files: list[ExportedFile]
    api_calls: int = 0  # requests made to the provider's API, connecting included

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.files)

    @property
    def stopped(self) -> list[str]:
        return [item.stopped for item in self.files if item.stopped]

    @property
    def rejected(self) -> int:
        return sum(item.rejected for item in self.files)


def choose_mode(profile: Profile, now: datetime) -> Mode:
    """Full on the profile's weekday (in its time zone), diff on the other days."""
    local = now.astimezone(ZoneInfo(profile.export.timezone))
    return "full" if WEEKDAYS[local.weekday()] == profile.export.full_weekday else "diff"


class Exporter:
    """Exports a profile's lists: each list's file made (``engine.diff``), held back by the safety stop or
    uploaded, and the ledger's new generation made current once the provider's server has the whole file."""

    def __init__(
        self,
        profile: Profile,
        engine: Engine,
        clock: Clock,
        transport_factory: Callable[[Profile], Transport] = open_transport,
        stop: threading.Event | None = None,
        *,
        force: bool = False,
    ) -> None:
        self.profile, self.engine, self.clock = profile, engine, clock
        self.transport_factory = transport_factory
        self.force = force  # upload even past the safety stop
        self.stop = stop or threading.Event()  # set: finish the list in hand, leave the others for next time
        self.pending_values = profile.export.status_values
        self.work = WorkDir.of(profile)
        self.delivery = Delivery(profile, clock, self.work)
        self.api_calls = 0

    def run(self, mode: Mode | None = None, *, dry_run: bool = False) -> ExportResult:
        now = self.clock.now()
        chosen: Mode = mode or choose_mode(self.profile, now)
        with self.engine.connect() as connection:
            with connection.begin():
                ids = crm.list_ids(connection, self.profile.lists)
            missing = [code for code in self.profile.lists if code not in ids]
            if missing:
                raise ConfigError(f"profile {self.profile.name}: no CRM list with code {', '.join(missing)}")
            if not dry_run:
                ensure_lock_held(self.engine)  # the outbox is the lock holder's to tidy
                self._recover_outbox()
            files = self._write_lists(connection, ids, chosen, now, dry_run)
        if not dry_run:
            self.work.prune(self.work.sent, now - timedelta(days=self.profile.work.retention_days))
        return ExportResult(chosen, dry_run, files, self.api_calls)

    def _write_lists(
        self, connection: Connection, ids: dict[str, int], mode: Mode, now: datetime, dry_run: bool
    ) -> list[ExportedFile]:
        files = []
        transport: Transport | None = None
        try:
            if not dry_run:  # connected first: a wrong password fails the export even with nothing to send
                transport = self.transport_factory(self.profile)
                retry = RetryPolicy.of(self.profile.transport, self.clock)
                retry.call(transport.connect, what="the connection to the provider")
                ensure_lock_held(self.engine)  # partial uploads may be the lock holder's, in flight
                if not isinstance(transport, Submitter):
                    self._remove_partial_uploads(transport)
            places = [self._place(code, ids) for code in self.profile.lists]
            with CrmScan.read(self.engine, connection, self.profile, places, self.work.root) as scan:
                for place in places:
                    if self.stop.is_set():
                        log.info("stopping: the export of %s and later lists is left for the next run", place.code)
                        break
                    staged = self._write_list(connection, scan, place, mode, now, dry_run)
                    if staged.uploads and transport is not None and staged.stopped is None:
                        ensure_lock_held(self.engine)
                        self._deliver(transport, staged)
                    files.append(staged)
        finally:
            if transport is not None:
                self.api_calls = transport.calls if isinstance(transport, Submitter) else 0
                transport.close()
        return files

    def _write_list(
        self, connection: Connection, scan: CrmScan, place: ListPlace, mode: Mode, now: datetime, dry_run: bool
    ) -> ExportedFile:
        code = place.code
        path = self._free_path(self.work.dry_run if dry_run else self.work.outbox, code, mode, now)
        staged = ExportedFile(code, remote_path=self._remote_dir(code) + "/" + path.name)
        headers = [column.header for column in written_columns(self.profile)]
        with connection.begin() as transaction:
            writer = ListFiles(self.profile, code, path, headers)
            try:
                done = export_list(scan, connection, self.profile, place, mode, now, writer, keep_snapshot=not dry_run)
            finally:
                writer.close()
            staged.rows, staged.tombstones = writer.rows, writer.tombstones
            staged.duplicates, staged.invalid = writer.duplicates, writer.invalid
            staged.reports, staged.taken_off = writer.reports, writer.taken_off
            staged.local_path = writer.path if writer.rows else None
            staged.uploads = self._package(code, writer)
            staged.stopped = self._safety_stop(code, writer.taken_off, done.subscribed)
            if staged.stopped is not None and not dry_run:
                transaction.rollback()
                self._hold(staged)
                return staged
            if dry_run:
                transaction.rollback()
                return staged
            if not writer.rows:
                snapshots.commit(connection, self.profile.name, code)  # tombstones of rows never sent
                staged.reports = [self.work.keep_report(report, code) for report in staged.reports]
        log.info("list %s: %d rows (%d tombstones) for a %s export", code, staged.rows, staged.tombstones, mode)
        return staged

    def _place(self, code: str, ids: dict[str, int]) -> ListPlace:
        return ListPlace(self.profile.name, code, ids[code])

    def _safety_stop(self, code: str, taken_off: int, subscribed: int) -> str | None:
        """Why the list's file may not go up unasked: it takes too large a share of the addresses the provider
        has from us as subscribed off the list (the provider may never undo an opt-out), or None."""
        policy = self.profile.policy
        if self.force or taken_off < policy.safety_min_export_unsubscribes:
            return None
        return export_safety_stop(
            code, taken_off, subscribed, policy.max_export_unsubscribe_share, policy.safety_min_export_unsubscribes
        )

    def _hold(self, staged: ExportedFile) -> None:
        """The files the safety stop held back go to ``held/`` with the reason beside them, for a person to look
        at; the ledger stays as it was, so a forced export later writes them again."""
        assert staged.stopped is not None
        staged.uploads = [self.work.hold(path, staged.stopped) for path in staged.uploads]
        staged.reports = [self.work.keep_report(report, staged.list_code) for report in staged.reports]
        staged.local_path = staged.uploads[0] if staged.uploads else None
        log.error("list %s: %s", staged.list_code, staged.stopped)

    def _package(self, code: str, writer: ListFiles) -> list[Path]:
        uploads: list[Path] = []
        for path, count, action in (
            (writer.path, writer.main_rows, "ADD_AND_UPDATE"),
            (writer.opt_out_path, writer.opt_out_rows, "OPT_OUT"),
        ):
            if count:
                uploads += package(self.profile, code, path, action)
        return uploads

    def _deliver(self, transport: Transport, staged: ExportedFile) -> None:
        if isinstance(transport, Submitter):
            self._submit(transport, staged)
            return
        assert staged.remote_path is not None
        folder = staged.remote_path.rsplit("/", 1)[0]
        uploads = self.delivery.send(transport, staged.uploads, folder)
        self._mark_sent(staged, uploads, f"{folder}/{uploads[0].name}")

    def _mark_sent(
        self, staged: ExportedFile, uploads: list[Path], remote_path: str, refused: Sequence[str] = ()
    ) -> None:
        """The provider has the rows: the reports are kept beside the copies in ``sent/``, then the ledger's new
        generation is made current (``refused``: the keys whose old ledger rows stay)."""
        staged.uploads, staged.uploaded, staged.remote_path = uploads, True, remote_path
        staged.reports = self.work.keep_sent(staged.reports)
        staged.local_path = uploads[0]
        with self.engine.begin() as connection:
            commit_pending(connection, self.profile.name, staged.list_code, refused)

    def _submit(self, transport: Submitter, staged: ExportedFile) -> None:
        """The rows go through the provider's API; the ledger moves for the rows it accepted, the others keep
        their last state there (so they go out again) and are listed with the provider's reason."""
        calls = transport.calls
        submission = transport.submit(staged.uploads, staged.list_code)
        staged.api_calls, staged.rejected = transport.calls - calls, len(submission.rejected)
        if submission.accepted + len(submission.rejected) != staged.rows:  # a verdict on every row, or none
            raise TransportError(
                f"list {staged.list_code}: the provider's verdict covers {submission.accepted} accepted and "
                f"{len(submission.rejected)} refused rows of the {staged.rows} sent: the ledger stays, all go again"
            )
        refused = []
        if submission.rejected:
            report = staged.uploads[0].with_name(staged.uploads[0].name + ".rejected.csv")
            with ReportWriter(report, self.profile.export, ["line", "email", "list", "reason"]) as writer:
                for row in submission.rejected:
                    writer.write([str(row.line), row.email, staged.list_code, row.reason])
            staged.reports.append(report)
            refused = [email_key(row.email) for row in submission.rejected]
            log.warning("list %s: the provider refused %d rows (see %s)", staged.list_code, len(refused), report.name)
        where = f"{self.profile.transport.kind}:{self.profile.lists[staged.list_code].id}"
        self._mark_sent(staged, self.work.keep_sent(staged.uploads), where, refused)

    def _recover_outbox(self) -> None:
        self.delivery.recover(self.transport_factory)

    def _remove_partial_uploads(self, transport: Transport) -> None:
        self.delivery.remove_partial_uploads(transport, {code: self._remote_dir(code) for code in self.profile.lists})

    def _free_path(self, folder: Path, code: str, mode: Mode, now: datetime) -> Path:
        """Never reuse the name of a file sent before: the provider may not have taken it yet. A name that is
        taken is made again a tenth of a millisecond later (a provider may accept only names of its own
        pattern, as MailUp does), and numbered when that does not change it."""
        for tick in range(10):
            name = self._file_name(code, mode, now + timedelta(microseconds=100 * tick))
            if not (folder / name).exists() and not (self.work.sent / name).exists():
                return folder / name
        return unique_path(folder, self._file_name(code, mode, now), also_in=(self.work.sent,))

    def _file_name(self, code: str, mode: Mode, now: datetime) -> str:
        return _fill(self.profile.export.file_name, "export.file_name", placeholders(self.profile, code, mode, now))

    def _remote_dir(self, code: str) -> str:
        return remote_folder(self.profile, code, self.clock.now())


def placeholders(profile: Profile, code: str, mode: Mode, now: datetime) -> dict[str, str]:
    utc = now.astimezone(UTC)
    return {
        "profile": profile.name,
        "list": code,
        "list_id": profile.lists[code].id,
        "stamp": utc_stamp(now),
        "mailup_stamp": f"{utc:%Y%m%d%H%M%S}{utc.microsecond // 100:04d}",  # yyyyMMddhhmmssffff, 24-hour, UTC
        "mode": mode,
    }


def remote_folder(profile: Profile, code: str, now: datetime) -> str:
    """The remote folder a list's files go to (``export.remote_dir`` filled in)."""
    return _fill(profile.export.remote_dir, "export.remote_dir", placeholders(profile, code, "full", now)).rstrip("/")


def commit_pending(connection: Connection, profile: str, list_code: str, refused: Sequence[str] = ()) -> None:
    """The step after a confirmed upload (the provider's verdict, for an API: ``refused`` holds the keys of the
    rows it refused); a module-level name so that tests can make it fail."""
    snapshots.commit(connection, profile, list_code, refused)


def _fill(template: str, key: str, values: dict[str, str]) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + name + "}" for name in values)
        raise ConfigError(f"{key}: cannot fill {template!r} ({exc}); placeholders are {known}") from None
