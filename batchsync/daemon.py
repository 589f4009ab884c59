"""The daemon: each profile's nightly run and inbox polls on a schedule, a watched local inbox, clean stops.

    daemon = Daemon([Path("profiles/mailup.toml")])
    daemon.run_forever()        # or, in tests: daemon.start(); clock.advance(...); daemon.run_once()

One ``run_once()`` runs the jobs that are due and imports the inbox files whose writer has finished; a loop
around it does the rest. Signals: the first SIGTERM or SIGINT lets the file in hand commit and then stops
(exit 0); a second stops at once (the open transaction rolls back); SIGHUP reloads the profiles, keeping the
old one where a new one is broken.

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schedule
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from batchsync.clock import Clock
from batchsync.config import Profile, load_profile
from batchsync.errors import BatchsyncError, ConfigError
from batchsync.locks import LockBusy
from batchsync.notify import send_summary
from batchsync.sync import ImportReport, Sync

log = logging.getLogger(__name__)
SETTLE_SECONDS = 3.0  # an inbox file whose size has not changed this long counts as complete
OPEN_GIVE_UP_SECONDS = 6 * 3600  # open this long with no event: its close was missed (an inotify overflow)


def profile_paths(arguments: list[Path]) -> list[Path]:
    """Profile files named directly, or every ``*.toml`` in a named folder."""
    found: list[Path] = []
    for path in arguments:
        found += sorted(path.glob("*.toml")) if path.is_dir() else [path]
    if not found:
        raise ConfigError("no profile files given (name files, or a folder of *.toml)")
    return found


class InboxWatcher(FileSystemEventHandler):
    """Remembers which inbox files changed when, which are open, and which were closed after writing.

    Where the platform reports opens and closes (Linux's inotify), a file is complete when its writer closes
    it, and a file still open is never taken, however long its writer pauses. Elsewhere a file counts as
    complete once unchanged for SETTLE_SECONDS.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._changed: dict[str, float] = {}
        self._closed: set[str] = set()
        self._open: Counter[str] = Counter()  # opens not yet closed (a reader's too: it may be the writer's)
        self._touched: dict[str, float] = {}  # when each file's last event came

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        name = Path(str(path)).name
        with self._lock:
            self._touched[name] = self.clock.monotonic()
            if event.event_type == "opened":
                self._open[name] += 1
            elif event.event_type in ("closed", "closed_no_write"):
                self._open[name] = max(self._open[name] - 1, 0)
                if event.event_type == "closed":
                    self._closed.add(name)
            elif event.event_type in ("created", "modified", "moved"):
                self._changed[name] = self.clock.monotonic()
                self._closed.discard(name)

    def ready(self, inbox: Path) -> set[str]:
        """Names of inbox files that are complete: closed after writing, or unchanged for a few seconds and
        open nowhere."""
        now = self.clock.monotonic()
        with self._lock:
            present = {p.name for p in inbox.iterdir() if p.is_file()} if inbox.is_dir() else set()
            for name in list(self._changed):
                if name not in present:
                    del self._changed[name]
            self._closed &= present
            self._open = Counter({name: count for name, count in self._open.items() if count and name in present})
            settled = {name for name, at in self._changed.items() if now - at >= SETTLE_SECONDS}
            return (self._closed | settled) - {name for name, count in self._open.items() if count}

    def pending(self) -> bool:
        with self._lock:
            return bool(self._changed or self._closed)

    def busy(self) -> set[str]:
        """Names of inbox files some process still has open: no import takes them, whatever their age; after
        OPEN_GIVE_UP_SECONDS without an event, a close is taken to have been missed and the minimum age rules."""
        now = self.clock.monotonic()
        with self._lock:
            for name in [name for name in self._open if now - self._touched.get(name, now) >= OPEN_GIVE_UP_SECONDS]:
                log.warning("inbox file %s open for hours with nothing heard of it: taken as closed", name)
                del self._open[name]
            return {name for name, count in self._open.items() if count}


@dataclass
class ProfileRuntime:
    sync: Sync
    scheduler: schedule.Scheduler = field(default_factory=schedule.Scheduler)
    watcher: InboxWatcher | None = None
    observer: Any = None

    @property
    def profile(self) -> Profile:
        return self.sync.profile


class Daemon:
    def __init__(self, paths: list[Path], *, clock: Clock | None = None, tick_seconds: float = 1.0) -> None:
        self.paths = profile_paths(paths)
        self.clock = clock or Clock()
        self.tick_seconds = tick_seconds
        self.stop = threading.Event()
        self.reload_requested = False
        self.runtimes: dict[Path, ProfileRuntime] = {}
        schedule.datetime = _clock_datetime(self.clock)  # type: ignore[attr-defined]  # see the docstring

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load every profile (a broken one stops the start), then catch up on what a crash left behind."""
        for path in self.paths:
            self.runtimes[path] = self._runtime(load_profile(path))
        for runtime in self.runtimes.values():
            self._guarded(runtime, "recovery import", lambda r=runtime: r.sync.import_files())

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
        for runtime in list(self.runtimes.values()):
            if self.stop.is_set():
                return
            runtime.scheduler.run_pending()
            if runtime.watcher is not None and runtime.watcher.pending():
                ready = runtime.watcher.ready(runtime.sync.work.inbox)
                if ready:
                    self._guarded(runtime, "inbox import", lambda r=runtime, n=ready: r.sync.import_files(ready=n))

    def reload(self) -> None:
        self.reload_requested = False
        for path, old in list(self.runtimes.items()):
            try:
                profile = load_profile(path)
            except ConfigError as exc:
                log.error("reload: %s; keeping the profile as it was", exc)
                continue
            self._stop_watching(old)
            self.runtimes[path] = self._runtime(profile)
            log.info("reloaded profile %s", profile.name)

    def close(self) -> None:
        for runtime in self.runtimes.values():
            self._stop_watching(runtime)
            runtime.sync.engine.dispose()

    # --- jobs -------------------------------------------------------------------------------------------

    def _runtime(self, profile: Profile) -> ProfileRuntime:
        watcher = InboxWatcher(self.clock)
        sync = Sync(profile, clock=self.clock, stop=self.stop, inbox_busy=watcher.busy)
        sync.init()
        runtime = ProfileRuntime(sync, watcher=watcher)
        config = profile.schedule
        if config.nightly:
            runtime.scheduler.every().day.at(config.nightly, config.timezone).do(self._nightly, runtime)
        if config.poll_minutes:
            runtime.scheduler.every(config.poll_minutes).minutes.do(
                lambda: self._guarded(runtime, "inbox poll", runtime.sync.import_files)
            )
        runtime.observer = Observer()
        runtime.observer.schedule(watcher, str(sync.work.inbox), recursive=False)
        runtime.observer.start()
        return runtime

    def _nightly(self, runtime: ProfileRuntime) -> None:
        config = runtime.profile.schedule
        local = self.clock.now().astimezone(_zone(config.timezone))
        slot = f"nightly {local:%Y-%m-%d} {config.nightly}"
        self._guarded(runtime, slot, lambda: runtime.sync.run(slot=slot))

    def _guarded(self, runtime: ProfileRuntime, what: str, action: Any) -> None:
        """Run a job; a failure is logged and the daemon goes on."""
        name = runtime.profile.name
        try:
            report = action()
        except LockBusy as exc:
            log.info("%s: %s; skipped", what, exc)
            return
        except BatchsyncError as exc:
            log.error("profile %s: %s failed: %s", name, what, exc)
            return
        except Exception:
            log.exception("profile %s: %s failed", name, what)
            return
        if report is None:
            log.info("profile %s: %s already ran", name, what)
        elif runtime.profile.notify is not None and _worth_a_summary(report):
            self._notify(runtime, report)

    def _notify(self, runtime: ProfileRuntime, report: Any) -> None:
        try:
            send_summary(runtime.profile, report)
        except BatchsyncError as exc:
            log.error("profile %s: summary email not sent: %s", runtime.profile.name, exc)

    def _stop_watching(self, runtime: ProfileRuntime) -> None:
        if runtime.observer is not None:
            runtime.observer.stop()
            runtime.observer.join(timeout=5)
            runtime.observer = None

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
    return True


def next_nightly(profile: Profile, now: dt.datetime) -> dt.datetime | None:
    """When the profile's next nightly run is due (aware UTC), or None without a schedule."""
    config = profile.schedule
    if not config.nightly:
        return None
    zone = _zone(config.timezone)
    hours, minutes = (int(part) for part in config.nightly.split(":"))
    local = now.astimezone(zone)
    due = local.replace(hour=hours, minute=minutes, second=0, microsecond=0)
    if due <= local:
        due = (local + dt.timedelta(days=1)).replace(hour=hours, minute=minutes, second=0, microsecond=0)
    return due.astimezone(dt.UTC)


def _zone(name: str) -> dt.tzinfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


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
