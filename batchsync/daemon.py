"""The daemon: each profile's nightly run and inbox polls on a schedule, a watched local inbox, clean stops.

    daemon = Daemon([Path("profiles/")])
    daemon.run_forever()        # or, in tests: daemon.start(); clock.advance(...); daemon.run_once()

One ``run_once()`` runs, for each profile, the jobs that are due (jobs.py); a loop around it does the rest.
Signals: the first SIGTERM or SIGINT lets the file in hand commit and then stops (exit 0; a night it cut short
is recorded as interrupted, and runs again at the next start); a second stops at once (the open transaction
rolls back); SIGHUP reloads the profiles: files added to a named folder are taken up, files removed are
dropped, and a file that is now broken keeps its old profile (reported as a problem until it is fixed).

Unattended means nothing stops it and nothing goes unsaid: a profile file that cannot be used (a missing
environment variable, a bad file, a name another file already has) is reported and skipped, and the others
run; a profile whose database or server is down waits with back-off, and the daemon starts whatever is down.

Surprises, written down: ``schedule`` reads the time through ``datetime.datetime.now``, so while a daemon lives
that name is routed through the daemon's clock (tests move time instead of sleeping). A nightly run is named by
its slot (``nightly 2026-01-05 02:30``) in ``bs_runs``: a slot that any daemon has run is never run again, so two
daemons sharing one CRM run each night once.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import types
from pathlib import Path

import schedule

from batchsync import __version__
from batchsync.clock import Clock
from batchsync.config import Profile, load_profile
from batchsync.errors import BatchsyncError, ConfigError
from batchsync.hooks import Hooks
from batchsync.jobs import ProfileRuntime
from batchsync.metrics import Metrics
from batchsync.profiles import profile_paths
from batchsync.slots import next_nightly

log = logging.getLogger(__name__)
CUT_EVERY = 0.5  # seconds between looks at the callbacks' journals


class Daemon:
    """Runs every profile unattended: loads them (skipping a broken one), runs what is due through each ProfileRuntime,
    cuts the callbacks' journals, and answers stop and reload signals."""

    def __init__(
        self, paths: list[Path], *, clock: Clock | None = None, tick_seconds: float = 1.0, receive_only: bool = False
    ) -> None:
        """``receive_only``: take callbacks and cut their journals into the inboxes, nothing else (``serve``)."""
        self.arguments = list(paths)
        self.receive_only = receive_only
        profile_paths(self.arguments)  # nothing to run is a usage error, at once
        self.clock = clock or Clock()
        self.tick_seconds = tick_seconds
        self.stop = threading.Event()
        self.reload_requested = False
        self.runtimes: dict[Path, ProfileRuntime] = {}
        self.broken: dict[Path, str] = {}  # profile files that cannot be used, and why
        self.metrics = Metrics()
        self.hooks = Hooks(self.clock, self.metrics.registry)  # the callbacks the listener takes
        self.heartbeat = self.clock.monotonic()  # when the loop last came round (the listener's "alive")
        self.started = False  # the profiles were loaded once (the listener may answer before)
        schedule.datetime = _clock_datetime(self.clock)  # type: ignore[attr-defined]  # see the docstring

    @property
    def job(self) -> tuple[str, float] | None:
        """The job in hand, named with its profile, and when it began (monotonic)."""
        for runtime in list(self.runtimes.values()):
            if runtime.job is not None:
                return f"{runtime.profile.name}: {runtime.job[0]}", runtime.job[1]
        return None

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the profiles (a broken one is reported and skipped), say what will run when, and prepare each
        profile (a database that is down is tried again by the loop)."""
        self.load_profiles()
        self.started = True
        now = self.clock.now()
        plans = [f"{r.profile.name} next night {_when(next_nightly(r.profile, now))}" for r in self.runtimes.values()]
        skipped = f"; {len(self.broken)} skipped: " + ", ".join(str(path) for path in self.broken)
        log.info(
            "batchsync %s started: %d profiles (%s)%s",
            __version__,
            len(self.runtimes),
            "; ".join(plans) or "none usable",
            skipped if self.broken else "",
        )
        self.run_once()

    def run_forever(self) -> int:
        self._install_signals()
        self.start()
        cutter = threading.Thread(target=self._cut_forever, name="batchsync-cutter", daemon=True)
        cutter.start()
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

    def _cut_forever(self) -> None:
        """The callbacks' journals cut into inbox files every CUT_EVERY seconds, whatever job the loop is in."""
        while not self.stop.wait(CUT_EVERY):
            self.cut_callbacks()

    def cut_callbacks(self) -> None:
        for runtime in list(self.runtimes.values()):
            runtime.cut_callbacks()

    def run_once(self) -> None:
        self.heartbeat = self.clock.monotonic()
        for runtime in list(self.runtimes.values()):
            if self.stop.is_set():
                return
            runtime.run_due()

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
            self.runtimes.pop(gone).close()
        self.broken = {path: reason for path, reason in self.broken.items() if path in paths}
        for path in paths:
            self._load(path)
        self.hooks.use([runtime.profile for runtime in self.runtimes.values()])

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()

    def _load(self, path: Path) -> None:
        old = self.runtimes.get(path)
        try:
            profile = load_profile(path)
            self._check_name(path, profile)
            runtime = ProfileRuntime.start(profile, self.clock, self.stop, self.metrics, self.hooks, self.receive_only)
        except (BatchsyncError, OSError) as exc:
            reason = str(exc)
            if old is not None:
                old.reload_error = reason
                log.error("profile file %s: %s; keeping the profile as it was", path, reason)
            else:
                self.broken[path] = reason
                log.error("profile file %s: %s; skipped until it is fixed (then send SIGHUP)", path, reason)
            return
        if old is not None:  # a reload keeps what this daemon knows of the profile's nights
            runtime.retry, runtime.slots_started = old.retry, old.slots_started
            old.close()
        log.info("%s profile %s from %s", "reloaded" if old else "loaded", profile.name, path)
        self.broken.pop(path, None)
        self.runtimes[path] = runtime

    def _check_name(self, path: Path, profile: Profile) -> None:
        for other_path, other in self.runtimes.items():
            if other_path != path and other.profile.name == profile.name:
                raise ConfigError(f"profile name {profile.name!r} is taken by {other_path}: names must differ")

    # --- signals ----------------------------------------------------------------------------------------

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


def _when(moment: dt.datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC" if moment is not None else "not scheduled"


def _clock_datetime(clock: Clock) -> types.ModuleType:
    """A stand-in for the datetime module whose ``datetime.now`` reads the daemon's clock."""

    class ClockDatetime(dt.datetime):
        """``datetime`` whose ``now`` is the daemon's clock."""

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
