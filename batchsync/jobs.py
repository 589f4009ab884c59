"""One profile under the daemon: its nights, polls and inbox imports, each run as a guarded job.

    runtime = ProfileRuntime.start(profile, clock, stop, metrics)
    runtime.run_due()        # prepare once, then whatever is due now; never raises for a job's failure
    runtime.close()

A job's failure is logged once per change of state and backed off (trouble.py), mailed (alerts.py) and counted
(metrics.py); the daemon and the other profiles go on. Nights:
- a night is named by its slot (slots.py); the same slot is never started twice by the schedule (the
  ``schedule`` library may fire a job more than once across a change of daylight saving time);
- a failed night is tried again after each of ``schedule.retry_minutes``, never past the next night; a night
  that found another run holding the lock is tried again a minute later, without using up a try;
- at start (once the database answers), the latest slot runs if it has not ended well and the profile has run a
  night before, within the same number of tries; the mode (full or diff) is the slot's day's, not today's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import schedule
from watchdog.observers import Observer

from batchsync.alerts import Alerts
from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.db import ledger
from batchsync.db.schema import make_engine
from batchsync.errors import BatchsyncError, first_line
from batchsync.export import choose_mode
from batchsync.hooks import Hooks
from batchsync.locks import LockBusy
from batchsync.logs import log_fields
from batchsync.metrics import Metrics
from batchsync.notify import send_summary
from batchsync.slots import Slot, latest_slot, next_nightly
from batchsync.sync import ImportReport, InitReport, RunReport, Sync
from batchsync.trouble import Trouble
from batchsync.watcher import InboxWatcher

log = logging.getLogger(__name__)
BUSY_RETRY = timedelta(minutes=1)
CUT_AFTER = 1.0  # seconds a callback's rows wait in the journal, so that a burst makes one file
Result = Literal["ok", "failed", "busy"]


@dataclass
class Retry:
    """A failed night to try again: its slot, the tries used, and when."""

    slot: Slot
    attempt: int  # tries of this slot used so far by this daemon
    at: datetime


@dataclass
class ProfileRuntime:
    """One profile under the daemon: its schedule, inbox watcher, back-off, alerts and the state of its nights; runs
    each job guarded, so a failure never reaches the daemon."""

    sync: Sync
    trouble: Trouble
    alerts: Alerts
    metrics: Metrics
    scheduler: schedule.Scheduler = field(default_factory=schedule.Scheduler)
    watcher: InboxWatcher | None = None
    observer: Any = None
    prepared: bool = False  # tables checked, a night missed while stopped found
    retry: Retry | None = None
    slots_started: set[str] = field(default_factory=set)
    reload_error: str | None = None  # the profile file changed into one that cannot be used: this one runs on
    job: tuple[str, float] | None = None  # the job in hand and when it began (monotonic)
    hooks: Hooks | None = None  # where the listener journals this profile's callbacks
    receive_only: bool = False  # `serve`: cut the callbacks' journals into the inbox, nothing else
    cut_waiting: set[str] = field(default_factory=set)  # callback files the cutter made, to import
    _cut_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(
        cls,
        profile: Profile,
        clock: Clock,
        stop: threading.Event,
        metrics: Metrics,
        hooks: Hooks | None = None,
        receive_only: bool = False,
    ) -> ProfileRuntime:
        """Make the profile's runtime and start watching its inbox; nothing touches its database yet."""
        watcher = InboxWatcher(clock)
        # A receiver alone (`serve`) never opens the CRM, which it may not reach: an engine that is never used.
        engine = make_engine("sqlite://") if receive_only else None
        sync = Sync(profile, clock=clock, engine=engine, stop=stop, inbox_busy=watcher.busy)
        runtime = cls(sync, Trouble(profile.name, clock), Alerts(profile, clock), metrics, watcher=watcher)
        runtime.hooks, runtime.receive_only = hooks, receive_only
        sync.work.inbox.mkdir(parents=True, exist_ok=True)
        if receive_only:
            return runtime
        config = profile.schedule
        if config.nightly:
            runtime.scheduler.every().day.at(config.nightly, config.timezone).do(runtime.scheduled_night)
        if config.poll_minutes:
            runtime.scheduler.every(config.poll_minutes).minutes.do(runtime.poll)
        runtime.observer = Observer()
        runtime.observer.schedule(watcher, str(sync.work.inbox), recursive=False)
        runtime.observer.start()
        return runtime

    @property
    def profile(self) -> Profile:
        return self.sync.profile

    @property
    def clock(self) -> Clock:
        return self.sync.clock

    def run_due(self) -> None:
        if self.receive_only:
            return
        if self.prepared and self.cut_waiting and not self.trouble.blocked("callback"):
            cut = self.take_cut()  # a file not imported now stays in the inbox: the watcher or the next run take it
            self.guarded("callback import", "callback", lambda: self.sync.import_files(ready=cut, remote=False))
        if not self.prepared:
            if not self.trouble.blocked("start"):
                self.prepare()
            return
        self.scheduler.run_pending()
        self.retry_if_due()
        self.import_ready()

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
        self.sync.engine.dispose()

    # --- jobs -------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create what is missing and find a night to catch up; then run that night, or else an import that takes
        up what a stop left behind (a night imports first anyway)."""
        missed: list[Slot] = []

        def prepare() -> InitReport:
            report = self.sync.init()
            missed.extend(self._missed_slot())
            return report

        if self.guarded("start-up", "start", prepare) != "ok":
            return
        self.prepared = True
        for slot in missed:
            log.warning("profile %s: the %s run has not ended well: running it now", self.profile.name, slot.name)
            self.slots_started.add(slot.name)
            self.night(slot)
        if not missed:
            self.guarded("start-up import", "start", self.sync.import_files)

    def _missed_slot(self) -> list[Slot]:
        slot = latest_slot(self.profile, self.clock.now())
        if slot is None or slot.name in self.slots_started:
            return []
        name, tries = self.profile.name, 1 + len(self.profile.schedule.retry_minutes)
        with self.sync.engine.connect() as connection:
            if ledger.last_nightly(connection, name) is None or ledger.slot_done(connection, name, slot.name):
                return []
            if ledger.slot_attempts(connection, name, slot.name) >= tries:
                log.error("profile %s: the %s run failed %d times: not tried again", name, slot.name, tries)
                return []
        return [slot]

    def scheduled_night(self) -> None:
        slot = latest_slot(self.profile, self.clock.now())
        if slot is None or slot.name in self.slots_started:
            log.debug("profile %s: the schedule fired again for a night already started", self.profile.name)
            return
        self.slots_started.add(slot.name)
        self.night(slot)

    def night(self, slot: Slot, attempt: int = 0) -> None:
        self.retry = None
        mode = choose_mode(self.profile, slot.due)
        result = self.guarded(f"the {slot.name} run", "nightly", lambda: self.sync.run(mode, slot=slot.name))
        if result == "busy":
            self._retry(slot, attempt, self.clock.now() + BUSY_RETRY)
        elif result == "failed":
            waits = self.profile.schedule.retry_minutes
            if attempt < len(waits):
                self._retry(slot, attempt + 1, self.clock.now() + timedelta(minutes=waits[attempt]))
            else:
                log.error("profile %s: the %s run failed; no more tries tonight", self.profile.name, slot.name)

    def _retry(self, slot: Slot, attempt: int, at: datetime) -> None:
        upcoming = next_nightly(self.profile, self.clock.now())
        if upcoming is not None and at >= upcoming:
            log.error(
                "profile %s: the %s run is not tried again: the next night comes first", self.profile.name, slot.name
            )
            return
        self.retry = Retry(slot, attempt, at)
        log.info("profile %s: the %s run is tried again at %s UTC", self.profile.name, slot.name, f"{at:%H:%M:%S}")

    def retry_if_due(self) -> None:
        retry = self.retry
        if retry is not None and self.clock.now() >= retry.at and not self.trouble.blocked("nightly"):
            self.night(retry.slot, retry.attempt)

    def poll(self) -> None:
        if self.trouble.blocked("poll"):
            return
        log.debug("profile %s: polling the inboxes", self.profile.name)
        self.guarded("inbox poll", "poll", self.sync.import_files)

    def import_ready(self) -> None:
        watcher = self.watcher
        if watcher is None or not watcher.pending() or self.trouble.blocked("inbox"):
            return
        ready = watcher.ready(self.sync.work.inbox)
        log.debug("profile %s: inbox looked at, %d files ready", self.profile.name, len(ready))
        if ready:
            self.guarded("inbox import", "inbox", lambda: self.sync.import_files(ready=ready))

    def cut_callbacks(self) -> None:
        """Cut the journals of the profile's callbacks into inbox files once their oldest row waited CUT_AFTER;
        called by the daemon's cutter thread, so that callbacks go on during a long job. The files made wait in
        ``cut_waiting`` for the main loop to import."""
        for config in self.profile.callback if self.hooks is not None else ():
            journal = self.hooks.journal(self.profile, config)  # type: ignore[union-attr]
            since = journal.waiting_since
            if not journal.has_rows() or (since is not None and time.monotonic() - since < CUT_AFTER):
                continue
            try:
                made = journal.cut(self.sync.work.inbox, config.kind, f"{self.clock.now():%Y%m%dT%H%M%S%f}")
            except Exception as exc:  # the thread goes on; the journal waits, and /healthz says so after a while
                log.error("profile %s: cannot cut the %s journal: %s", self.profile.name, config.name, exc)
                continue
            with self._cut_lock:
                self.cut_waiting |= {path.name for path in made}

    def take_cut(self) -> set[str]:
        with self._cut_lock:
            names, self.cut_waiting = self.cut_waiting, set()
        return names

    # --- guarding ---------------------------------------------------------------------------------------

    def guarded(self, what: str, job: str, action: Callable[[], Any]) -> Result:
        """Run a job; a failure is logged (once per change of state), mailed and counted, and never raised."""
        name = self.profile.name
        started = self.clock.monotonic()
        self.job = (what, started)
        try:
            with log_fields(profile=name, job=job):
                report = action()
        except LockBusy as exc:
            self.trouble.busy(str(exc))
            return "busy"
        except Exception as exc:  # whatever it is, the daemon and the other profiles go on
            self._failed(what, job, exc, self.clock.monotonic() - started)
            return "failed"
        finally:
            self.job = None
        self.trouble.cleared(job)
        self.metrics.finished(name, job, report, self.clock.monotonic() - started)
        if isinstance(report, RunReport | ImportReport) and _worth_a_summary(report):
            self._notify(report)
        elif report is None and job == "nightly":
            log.info("profile %s: %s already ran", name, what)
        return "ok"

    def _failed(self, what: str, job: str, exc: Exception, seconds: float) -> None:
        if isinstance(exc, BatchsyncError):
            message = str(exc)
        else:
            message = f"unexpected {type(exc).__name__}: {first_line(exc)}"
            log.debug("profile %s: %s failed", self.profile.name, what, exc_info=exc)
        self.trouble.failed(job, exc, message)
        self.metrics.failed(self.profile.name, job, seconds)
        self.alerts.failed(job, what, exc, message)

    def _notify(self, report: RunReport | ImportReport) -> None:
        if self.profile.notify is None:
            return
        try:
            send_summary(self.profile, report)
        except BatchsyncError as exc:
            log.error("profile %s: summary email not sent: %s", self.profile.name, exc)


def _worth_a_summary(report: RunReport | ImportReport) -> bool:
    """A nightly run always is; an inbox import or poll only when it took files or refused names."""
    if isinstance(report, ImportReport):
        return bool(report.files or report.refused)
    return True
