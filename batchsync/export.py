"""Export: CRM rows -> provider rows -> fingerprints -> diff against the ledger -> one file per list -> upload.

For each list of the profile, the CRM's rows (one per email, duplicates merged) and the export ledger
(``bs_exported``) are both streamed in email order and merged, so memory stays flat however long the list::

    result = Exporter(profile, engine, clock).run(mode="diff")

A *full* export writes every row; a *diff* writes the rows whose content or status changed since the last
confirmed export, and a tombstone (an unsubscribed row) for every address that left the list. The ledger only
moves after the provider's server confirms the whole file (see ``db.ledger``).

A diff first asks the database which addresses can have changed (their CRM rows' digest differs from the one
the ledger keeps, see ``db.digest`` and ``ledger.changed_keys``), and streams and merges only those. Each
contact's own digest is computed once per run, in the run's connection, for every list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, Select

from batchsync import progress
from batchsync.clock import Clock, utc_stamp
from batchsync.config import Profile
from batchsync.db import crm, driver, ledger, sources
from batchsync.delivery import Delivery
from batchsync.errors import ConfigError
from batchsync.formats.package import package
from batchsync.listwriter import ListWriter
from batchsync.locks import ensure_lock_held
from batchsync.merge import merge_sorted
from batchsync.rows import ProviderRow, RowBuilder
from batchsync.rules import OPTED_OUT, export_decision, export_safety_stop
from batchsync.transport import Transport, open_transport
from batchsync.transport.retry import RetryPolicy
from batchsync.workdir import WorkDir, unique_path

log = logging.getLogger(__name__)
# A diff's temporary tables: 1M contacts' digests take about 60 MB.
DIFF_TABLES = (sources.CONTACT_DIGESTS.name, ledger.CURRENT.name, ledger.DIFF_KEYS.name)
Mode = Literal["full", "diff"]
PROGRESS_EVERY = 250_000
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass
class ExportedFile:
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


@dataclass
class ExportResult:
    mode: Mode
    dry_run: bool
    files: list[ExportedFile]

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.files)

    @property
    def stopped(self) -> list[str]:
        return [item.stopped for item in self.files if item.stopped]


def choose_mode(profile: Profile, now: datetime) -> Mode:
    """Full on the profile's weekday (in its time zone), diff on the other days."""
    local = now.astimezone(ZoneInfo(profile.export.timezone))
    return "full" if WEEKDAYS[local.weekday()] == profile.export.full_weekday else "diff"


class Exporter:
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
        self._digested: Connection | None = None  # the connection whose bs_contact_digests is this run's

    def run(self, mode: Mode | None = None, *, dry_run: bool = False) -> ExportResult:
        now = self.clock.now()
        chosen: Mode = mode or choose_mode(self.profile, now)
        # One connection for the run: a diff's contact digests are this session's temporary table.
        with self.engine.connect() as connection:
            with connection.begin():
                ids = crm.list_ids(connection, self.profile.lists)
            missing = [code for code in self.profile.lists if code not in ids]
            if missing:
                raise ConfigError(f"profile {self.profile.name}: no CRM list with code {', '.join(missing)}")
            if not dry_run:
                ensure_lock_held(self.engine)  # the outbox is the lock holder's to tidy
                self._recover_outbox()
            if chosen == "diff":
                self._fill_contact_digests(connection)
            files = self._write_lists(connection, ids, chosen, now, dry_run)
            if chosen == "diff":  # not after a failure: the connection may be gone, and the error is the news
                with connection.begin():
                    driver.drop_temporary(connection, *DIFF_TABLES)
        if not dry_run:
            self.work.prune(self.work.sent, now - timedelta(days=self.profile.work.retention_days))
        return ExportResult(chosen, dry_run, files)

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
                self._remove_partial_uploads(transport)
            for code in self.profile.lists:
                if self.stop.is_set():
                    log.info("stopping: the export of %s and later lists is left for the next run", code)
                    break
                staged = self._write_list(connection, code, ids[code], mode, now, dry_run)
                if staged.uploads and transport is not None and staged.stopped is None:
                    ensure_lock_held(self.engine)
                    self._deliver(transport, staged)
                files.append(staged)
        finally:
            self._digested = None
            if transport is not None:
                transport.close()
        return files

    def _fill_contact_digests(self, connection: Connection) -> None:
        """Digest every contact once for the whole run, in a transaction of its own (a list's may roll back).
        A contact changed after this is seen by the next diff: its digest in the ledger is the one its rows
        had when they were read."""
        if all(self.profile.lists[code].segment is not None for code in self.profile.lists):
            return
        with connection.begin():
            driver.tune_for_bulk(connection)
            sources.fill_contact_digests(connection)
        self._digested = connection

    def _write_list(
        self, connection: Connection, code: str, list_id: int, mode: Mode, now: datetime, dry_run: bool
    ) -> ExportedFile:
        path = self._free_path(self.work.dry_run if dry_run else self.work.outbox, code, mode, now)
        staged = ExportedFile(code, remote_path=self._remote_dir(code) + "/" + path.name)
        with connection.begin() as transaction:
            driver.tune_for_bulk(connection)
            ledger.clear_pending(connection, self.profile.name, code)
            writer = ListWriter(self.profile, code, path)
            try:
                self._merge(connection, code, list_id, mode, now, writer)
            finally:
                writer.close()
            staged.rows, staged.tombstones = writer.rows, writer.tombstones
            staged.duplicates, staged.invalid = writer.duplicates, writer.invalid
            staged.reports, staged.taken_off = writer.reports, writer.taken_off
            staged.local_path = writer.path if writer.rows else None
            staged.uploads = self._package(code, writer)
            staged.stopped = self._safety_stop(connection, code, writer.taken_off)
            if staged.stopped is not None and not dry_run:
                transaction.rollback()
                self._hold(staged)
                return staged
            if dry_run:
                transaction.rollback()
                return staged
            if not writer.rows:
                ledger.commit_pending(connection, self.profile.name, code)  # tombstones of rows never sent
                staged.reports = [self.work.keep_report(report, code) for report in staged.reports]
        log.info("list %s: %d rows (%d tombstones) for a %s export", code, staged.rows, staged.tombstones, mode)
        return staged

    def _safety_stop(self, connection: Connection, code: str, taken_off: int) -> str | None:
        """Why the list's file may not go up unasked: it takes too large a share of the addresses the provider
        has from us as subscribed off the list (the provider may never undo an opt-out), or None."""
        policy = self.profile.policy
        if self.force or taken_off < policy.safety_min_export_unsubscribes:
            return None
        subscribed = ledger.subscribed_count(connection, self.profile.name, code)
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

    def _merge(
        self, connection: Connection, code: str, list_id: int, mode: Mode, now: datetime, writer: ListWriter
    ) -> None:
        builder = RowBuilder(self.profile, code)
        chunk = self.profile.export.chunk_rows
        only = self.changed_keys(connection, code, list_id, builder) if mode == "diff" else None
        if only is not None:
            driver.prefer_index_lookups(connection)
        current = builder.rows(self._sources(connection, code, list_id, builder, only), writer.report_invalid)
        exported = ledger.stream_exported(connection, self.profile.name, code, chunk, only)
        pending: list[tuple[Any, ...]] = []
        now = driver.stored_time(connection, now)
        merged = merge_sorted(current, exported, lambda r: r.email_key, lambda e: e.email_key)
        for seen, (_key, row, known) in enumerate(merged, start=1):
            if row is not None:
                if row.contact_ids[1:]:
                    writer.report_duplicate(row)
                outgoing, changed = self._outgoing(builder, row, known, mode)
                if outgoing is not None:
                    opted_out = outgoing.status in OPTED_OUT
                    writer.write(outgoing.values, opted_out, opted_out and _subscribed_at_provider(known))
                if changed:  # written, or known to the provider already: the ledger takes it either way
                    sent = outgoing or row
                    origin = _origin(row, sent, known)
                    pending.append(self._pending(code, row.email_key, row.email, row.contact_ids[0], sent, now, origin))
                elif known is not None and known.source_digest != row.source_digest:
                    pending.append(self._refreshed(code, row, known, now))  # same row, new inputs: note them
            elif known is not None and known.status != ledger.TOMBSTONE:
                if _subscribed_at_provider(known) and builder.tombstones:
                    writer.write_tombstone(builder.tombstone(known.email))
                pending.append(self._pending(code, known.email_key, known.email, None, None, now))
            if seen % 10_000 == 0:
                progress.report(f"export {code}", seen)
            if seen % PROGRESS_EVERY == 0:
                log.info("list %s: %d addresses compared, %d rows written", code, seen, writer.rows)
            if len(pending) >= chunk:
                ledger.stage_pending(connection, pending)
                pending.clear()
        ledger.stage_pending(connection, pending)

    def _sources(
        self, connection: Connection, code: str, list_id: int, builder: RowBuilder, only: Select[Any] | None
    ) -> Iterator[Any]:
        chunk = self.profile.export.chunk_rows
        segment = self.profile.lists[code].segment
        place = sources.ListPlace(self.profile.name, code, list_id)
        if segment is not None:
            return sources.stream_segment_sources(connection, place, segment.field, segment.equals, chunk)
        return sources.stream_export_sources(
            connection,
            place,
            chunk,
            with_custom=builder.needs_custom,
            with_groups=builder.needs_groups,
            salt=builder.salt,
            only_keys=only,
        )

    def changed_keys(self, connection: Connection, code: str, list_id: int, builder: RowBuilder) -> Select[Any] | None:
        """For a diff, the addresses whose inputs changed, found in the database, so that only their rows
        are read and built here; None (every row) for a list defined by a segment filter."""
        if self.profile.lists[code].segment is not None:
            return None
        if self._digested is not connection:  # not asked by run(): digest the contacts for this list alone
            sources.fill_contact_digests(connection)
        place = sources.ListPlace(self.profile.name, code, list_id)
        digests = sources.export_digests(
            connection, place, builder.salt, builder.sendable_statuses, with_groups=builder.needs_groups
        )
        return ledger.changed_keys(connection, self.profile.name, code, digests)

    def _outgoing(
        self, builder: RowBuilder, row: ProviderRow, known: ledger.ExportedRow | None, mode: Mode
    ) -> tuple[ProviderRow | None, bool]:
        """The row to write, if any, and whether it differs from what the provider last had from us."""
        pending_supported = "pending" in self.pending_values and builder.tombstones
        status = export_decision(row.status, row.provider_opt_out, row.consent_at, pending_supported)
        if status is None:
            return None, False  # the provider opted the address out, and no consent since lets it go out
        if status != row.status:
            row = builder.with_status(row, status)
        changed = known is None or known.fingerprint != row.fingerprint or known.status != row.status
        if mode == "full" or (changed and not _known_to_provider(row, known)):
            return row, changed
        return None, changed

    def _package(self, code: str, writer: ListWriter) -> list[Path]:
        uploads: list[Path] = []
        for path, count, action in (
            (writer.path, writer.main_rows, "ADD_AND_UPDATE"),
            (writer.opt_out_path, writer.opt_out_rows, "OPT_OUT"),
        ):
            if count:
                uploads += package(self.profile, code, path, action)
        return uploads

    def _pending(
        self,
        code: str,
        key: str,
        email: str,
        contact_id: int | None,
        row: ProviderRow | None,
        now: Any,
        origin: str = "export",
    ) -> tuple[Any, ...]:
        """A bs_pending row, in ledger.PENDING_COLUMNS order."""
        fingerprint = row.fingerprint if row else 0
        status = row.status if row else ledger.TOMBSTONE
        digest = row.source_digest if row else None
        return (self.profile.name, code, key, email, contact_id, fingerprint, status, origin, now, digest)

    def _refreshed(self, code: str, row: ProviderRow, known: ledger.ExportedRow, now: Any) -> tuple[Any, ...]:
        """The ledger row as it is, with the digest of the CRM rows it now comes from."""
        contact_id = row.contact_ids[0]
        return (
            self.profile.name,
            code,
            row.email_key,
            row.email,
            contact_id,
            known.fingerprint,
            known.status,
            known.origin,
            now,
            row.source_digest,
        )

    def _deliver(self, transport: Transport, staged: ExportedFile) -> None:
        assert staged.remote_path is not None
        folder = staged.remote_path.rsplit("/", 1)[0]
        staged.uploads = self.delivery.send(transport, staged.uploads, folder)
        staged.uploaded = True
        staged.remote_path = f"{folder}/{staged.uploads[0].name}"
        # The provider has the files now: keep the reports beside their copies before the ledger moves.
        staged.reports = self.work.keep_sent(staged.reports)
        staged.local_path = staged.uploads[0]
        with self.engine.begin() as connection:
            commit_pending(connection, self.profile.name, staged.list_code)

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


def _origin(row: ProviderRow, sent: ProviderRow, known: ledger.ExportedRow | None) -> str:
    """Why the ledger holds this status: "provider" (it reported the opt-out), "consent" (a re-subscription we
    sent as pending; it stays pending until the provider confirms), or "export" (what the CRM said)."""
    if sent.status == "pending" and row.status == "subscribed":
        return "consent"
    if known is not None and known.origin == "provider" and sent.status in OPTED_OUT:
        return "provider"
    return "export"


def _known_to_provider(row: ProviderRow, known: ledger.ExportedRow | None) -> bool:
    """An opt-out the provider itself reported (remembered, or set by its report alone) for an address it does
    not have from us as subscribed: no need to send it back. Where our ledger says it has it as subscribed, the
    opt-out goes out all the same: an echo is harmless, a missing opt-out is not."""
    if row.status not in OPTED_OUT or _subscribed_at_provider(known):
        return False
    return row.provider_opt_out is not None or (known is None and row.from_provider)


def _subscribed_at_provider(known: ledger.ExportedRow | None) -> bool:
    """Whether the provider has the address from us as subscribed (or pending): an opt-out takes it off."""
    return known is not None and known.status in ("subscribed", "pending")


def commit_pending(connection: Connection, profile: str, list_code: str) -> None:
    """The step after a confirmed upload; a module-level name so that tests can make it fail."""
    ledger.commit_pending(connection, profile, list_code)


def _fill(template: str, key: str, values: dict[str, str]) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join("{" + name + "}" for name in values)
        raise ConfigError(f"{key}: cannot fill {template!r} ({exc}); placeholders are {known}") from None
