"""The daemon: each profile's nightly run and inbox polls on a schedule, a watched local inbox, clean stops.

    daemon = Daemon([Path("profiles/")])
    daemon.run_forever()        # or, in tests: daemon.start(); clock.advance(...); daemon.run_once()

One ``run_once()`` runs the jobs that are due and imports the inbox files whose writer has finished; a loop
around it does the rest. Signals: the first SIGTERM or SIGINT lets the file in hand commit and then stops
(exit 0); a second stops at once (the open transaction rolls back); SIGHUP reloads the profiles: files added to
a named folder are taken up, files removed are dropped, and a file that is now broken keeps its old profile.

Unattended means nothing stops it and nothing goes unsaid:
- a profile that cannot be loaded (a missing environment variable, a bad file) is reported and skipped; the
  others run;
- a profile whose jobs fail (its database or server down, or anything else) waits with back-off, logged once
  per change of state (see trouble.py); the daemon starts whatever is down;
- a failed run is mailed (the same kind at most once a day, see alerts.py); a failed nightly run is tried
  again after each of ``schedule.retry_minutes``, never past the next night;
- a nightly slot missed while the daemon was stopped runs once at start (as systemd's ``Persistent=true``),
  when the profile has run a night before.

Surprises, written down: ``schedule`` reads the time through ``datetime.datetime.now``, so while a daemon
lives that name is routed through the daemon's clock (tests move time instead of sleeping). A nightly run is
named by its slot (``nightly 2026-01-05 02:30``) in ``bs_runs``: a slot that any daemon has run is never run
again, so two daemons sharing one CRM run each night once.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import schedule
from watchdog.observers import Observer

from batchsync import __version__
from batchsync.alerts import Alerts
from batchsync.clock import Clock
from batchsync.config import Profile, load_profile
from batchsync.db import ledger
from batchsync.errors import BatchsyncError, ConfigError, first_line
from batchsync.locks import LockBusy
from batchsync.logs import log_fields
from batchsync.metrics import Metrics
from batchsync.notify import send_summary
from batchsync.slots import Slot, latest_slot, next_nightly
from batchsync.sync import ImportReport, InitReport, RunReport, Sync
from batchsync.trouble import Trouble
from batchsync.watcher import InboxWatcher

log = logging.getLogger(__name__)


def profile_paths(arguments: list[Path]) -> list[Path]:
    """Profile files named directly, or every ``*.toml`` in a named folder."""
    found: list[Path] = []
    for path in arguments:
        found += sorted(path.glob("*.toml")) if path.is_dir() else [path]
    if not found:
        raise ConfigError("no profile files given (name files, or a folder of *.toml)")
    return found


@dataclass
class Retry:
    slot: Slot
    attempt: int  # the retry this is: 1 for the first
    at: dt.datetime


@dataclass
class ProfileRuntime:
    sync: Sync
    trouble: Trouble
    alerts: Alerts
    scheduler: schedule.Scheduler = field(default_factory=schedule.Scheduler)
    watcher: InboxWatcher | None = None
    observer: Any = None
    prepared: bool = False  # tables checked, what a stop left behind taken up, a missed night caught up
    retry: Retry | None = None

    @property
    def profile(self) -> Profile:
        return self.sync.profile


class Daemon:
    def __init__(self, paths: list[Path], *, clock: Clock | None = None, tick_seconds: float = 1.0) -> None:
        self.arguments = list(paths)
        profile_paths(self.arguments)  # nothing to run is a usage error, at once
        self.clock = clock or Clock()
        self.tick_seconds = tick_seconds
        self.stop = threading.Event()
        self.reload_requested = False
        self.runtimes: dict[Path, ProfileRuntime] = {}
        self.broken: dict[Path, str] = {}  # profile files that cannot be used, and why
        self.metrics = Metrics()
        self.heartbeat = self.clock.monotonic()  # when the loop last came round (the listener's "alive")
        self.job: tuple[str, float] | None = None  # the job in hand and when it began
        schedule.datetime = _clock_datetime(self.clock)  # type: ignore[attr-defined]  # see the docstring

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the profiles (a broken one is reported and skipped), say what will run when, and prepare each
        profile (a database that is down is tried again by the loop)."""
        self.load_profiles()
        now = self.clock.now()
        plans = [f"{r.profile.name} next night {_when(next_nightly(r.profile, now))}" for r in self.runtimes.values()]
        log.info(
            "batchsync %s started: %d profiles (%s)%s",
            __version__,
            len(self.runtimes),
            "; ".join(plans) or "none usable",
            f"; {len(self.broken)} skipped: " + ", ".join(str(path) for path in self.broken) if self.broken else "",
        )
        for runtime in self.runtimes.values():
            self._prepare(runtime)

    def run_forever(self) -> int:
        self._install_signals()
        self.start()
        try:
            while not self.stop.is_set():
                if self.reload_requested:
                    self.reload()
                self.run_once()
                self.stop.wait(self.tick_seconds)
        finally:
            self.close()
        log.info("stopped")
        return 0

    def run_once(self) -> None:
        self.heartbeat = self.clock.monotonic()
        for runtime in list(self.runtimes.values()):
            if self.stop.is_set():
                return
            if runtime.trouble.blocked():
                continue
            if not runtime.prepared:
                self._prepare(runtime)
                continue
            runtime.scheduler.run_pending()
            self._retry_if_due(runtime)
            self._import_ready(runtime)

    def reload(self) -> None:
        self.reload_requested = False
        log.info("reloading the profiles")
        self.load_profiles()

    def load_profiles(self) -> None:
        """(Re)load every profile file named or in a named folder; drop the ones that are gone."""
        try:
            paths = profile_paths(self.arguments)
        except ConfigError:
            paths = []
        for gone in [path for path in self.runtimes if path not in paths]:
            log.info("profile file %s is gone: profile %s dropped", gone, self.runtimes[gone].profile.name)
            self._close(self.runtimes.pop(gone))
        self.broken = {path: reason for path, reason in self.broken.items() if path in paths}
        for path in paths:
            self._load(path)

    def close(self) -> None:
        for runtime in self.runtimes.values():
            self._close(runtime)

    def _load(self, path: Path) -> None:
        try:
            runtime = self._runtime(load_profile(path))
        except BatchsyncError as exc:
            if path in self.runtimes:
                log.error("profile file %s: %s; keeping the profile as it was", path, exc)
            else:
                self.broken[path] = str(exc)
                log.error("profile file %s: %s; skipped until it is fixed (then send SIGHUP)", path, exc)
            return
        old = self.runtimes.pop(path, None)
        if old is not None:
            self._close(old)
        log.info("%s profile %s from %s", "reloaded" if old else "loaded", runtime.profile.name, path)
        self.broken.pop(path, None)
        self.runtimes[path] = runtime

    # --- jobs -------------------------------------------------------------------------------------------

    def _runtime(self, profile: Profile) -> ProfileRuntime:
        watcher = InboxWatcher(self.clock)
        sync = Sync(profile, clock=self.clock, stop=self.stop, inbox_busy=watcher.busy)
        runtime = ProfileRuntime(sync, Trouble(profile.name, self.clock), Alerts(profile, self.clock), watcher=watcher)
        config = profile.schedule
        if config.nightly:
            runtime.scheduler.every().day.at(config.nightly, config.timezone).do(self._nightly, runtime)
        if config.poll_minutes:
            runtime.scheduler.every(config.poll_minutes).minutes.do(self._poll, runtime)
        sync.work.inbox.mkdir(parents=True, exist_ok=True)
        runtime.observer = Observer()
        runtime.observer.schedule(watcher, str(sync.work.inbox), recursive=False)
        runtime.observer.start()
        return runtime

    def _prepare(self, runtime: ProfileRuntime) -> None:
        """Create what is missing and find a night missed meanwhile; then run that night, or else an import that
        takes up what a stop left behind (a night imports first anyway)."""
        missed: list[Slot] = []

        def prepare() -> InitReport:
            report = runtime.sync.init()
            missed.extend(self._missed_slot(runtime))
            return report

        if not self._guarded(runtime, "start-up", "start", prepare):
            return
        runtime.prepared = True
        for slot in missed:
            name = runtime.profile.name
            log.warning(
                "profile %s: the %s run was missed while the daemon was stopped: running it now", name, slot.name
            )
            self._nightly(runtime, slot)
        if not missed:
            self._guarded(runtime, "start-up import", "start", runtime.sync.import_files)

    def _missed_slot(self, runtime: ProfileRuntime) -> list[Slot]:
        slot = latest_slot(runtime.profile, self.clock.now())
        if slot is None:
            return []
        name = runtime.profile.name
        with runtime.sync.engine.connect() as connection:
            ran_before = ledger.last_nightly(connection, name) is not None
            if not ran_before or ledger.slot_taken(connection, name, slot.name):
                return []
        return [slot]

    def _nightly(self, runtime: ProfileRuntime, slot: Slot | None = None, attempt: int = 0) -> None:
        now = self.clock.now()
        slot = slot or latest_slot(runtime.profile, now)
        assert slot is not None  # only scheduled for a profile with a nightly time
        runtime.retry = None
        if self._guarded(runtime, f"the {slot.name} run", "nightly", lambda: runtime.sync.run(slot=slot.name)):
            return
        waits = runtime.profile.schedule.retry_minutes
        upcoming = next_nightly(runtime.profile, now)
        if attempt < len(waits):
            at = now + timedelta(minutes=waits[attempt])
            if upcoming is None or at < upcoming:
                runtime.retry = Retry(slot, attempt + 1, at)
                log.info(
                    "profile %s: the %s run is tried again at %s UTC (%d of %d)",
                    runtime.profile.name,
                    slot.name,
                    f"{at:%H:%M:%S}",
                    attempt + 1,
                    len(waits),
                )
                return
        log.error("profile %s: the %s run failed; no more tries tonight", runtime.profile.name, slot.name)

    def _retry_if_due(self, runtime: ProfileRuntime) -> None:
        retry = runtime.retry
        if retry is not None and self.clock.now() >= retry.at:
            self._nightly(runtime, retry.slot, retry.attempt)

    def _poll(self, runtime: ProfileRuntime) -> None:
        log.debug("profile %s: polling the inboxes", runtime.profile.name)
        self._guarded(runtime, "inbox poll", "poll", runtime.sync.import_files)

    def _import_ready(self, runtime: ProfileRuntime) -> None:
        watcher = runtime.watcher
        if watcher is None or not watcher.pending():
            return
        ready = watcher.ready(runtime.sync.work.inbox)
        log.debug("profile %s: inbox looked at, %d files ready", runtime.profile.name, len(ready))
        if ready:
            self._guarded(runtime, "inbox import", "inbox", lambda: runtime.sync.import_files(ready=ready))

    def _guarded(self, runtime: ProfileRuntime, what: str, job: str, action: Callable[[], Any]) -> bool:
        """Run a job; a failure is logged (once per change of state), mailed and counted, and the daemon goes on.
        True when the job ended without an error (or another process had the profile's lock)."""
        name = runtime.profile.name
        started = self.clock.monotonic()
        self.job = (f"{name}: {what}", started)
        try:
            with log_fields(profile=name, job=job):
                report = action()
        except LockBusy as exc:
            log.info("%s: %s; skipped", what, exc)
            return True
        except Exception as exc:  # whatever it is, the daemon and the other profiles go on
            self._failed(runtime, what, job, exc, self.clock.monotonic() - started)
            return False
        finally:
            self.job = None
        runtime.trouble.cleared()
        self.metrics.finished(name, job, report, self.clock.monotonic() - started)
        if report is None:
            log.info("profile %s: %s already ran", name, what)
        elif runtime.profile.notify is not None and _worth_a_summary(report):
            self._notify(runtime, report)
        return True

    def _failed(self, runtime: ProfileRuntime, what: str, job: str, exc: Exception, seconds: float) -> None:
        if isinstance(exc, BatchsyncError):
            message = str(exc)
        else:
            message = f"unexpected {type(exc).__name__}: {first_line(exc)}"
            log.debug("profile %s: %s failed", runtime.profile.name, what, exc_info=exc)
        runtime.trouble.failed(exc, f"{what} failed: {message}")
        self.metrics.failed(runtime.profile.name, job, seconds)
        runtime.alerts.failed(job, what, exc, message)

    def _notify(self, runtime: ProfileRuntime, report: Any) -> None:
        try:
            send_summary(runtime.profile, report)
        except BatchsyncError as exc:
            log.error("profile %s: summary email not sent: %s", runtime.profile.name, exc)

    def _close(self, runtime: ProfileRuntime) -> None:
        if runtime.observer is not None:
            runtime.observer.stop()
            runtime.observer.join(timeout=5)
            runtime.observer = None
        runtime.sync.engine.dispose()

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_stop_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if self.stop.is_set():
            log.warning("second stop signal: stopping now; the open transaction rolls back")
            raise KeyboardInterrupt
        log.info("stop signal: finishing the file in hand, then stopping (send it again to stop now)")
        self.stop.set()

    def _on_hangup(self, signum: int, frame: types.FrameType | None) -> None:
        self.reload_requested = True


def _worth_a_summary(report: Any) -> bool:
    """A nightly run always is; an inbox import or poll only when it took files or refused names."""
    if isinstance(report, ImportReport):
        return bool(report.files or report.refused)
    return isinstance(report, RunReport)


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC" if moment is not None else "not scheduled"


def _clock_datetime(clock: Clock) -> types.ModuleType:
    """A stand-in for the datetime module whose ``datetime.now`` reads the daemon's clock."""

    class ClockDatetime(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            moment = clock.now()
            return moment.astimezone(tz) if tz is not None else moment.astimezone().replace(tzinfo=None)

    module = types.ModuleType("clock_datetime")
    module.datetime = ClockDatetime  # type: ignore[attr-defined]
    module.timedelta = dt.timedelta  # type: ignore[attr-defined]
    module.time = dt.time  # type: ignore[attr-defined]
    module.date = dt.date  # type: ignore[attr-defined]
    return module
