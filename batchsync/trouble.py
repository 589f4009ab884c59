"""A profile whose jobs keep failing (a database or server that is down, or anything else): tried again with
back-off, and logged once per change of state rather than on every try::

    trouble = Trouble("mailup", clock)
    if not trouble.blocked("inbox"):
        try:
            job()
            trouble.cleared("inbox")        # "working again after 3 min" when it had been failing
        except BatchsyncError as exc:
            trouble.failed("inbox", exc, "the database ... cannot be used: ...")

Each job (start, inbox, poll, nightly) has its own state, so a poll that fails on a mistyped folder does not
hold back the inbox. A database or server that is down holds back every job of the profile: one job finding it
down is enough, and the others do not log it again. The waits double from FIRST_WAIT up to LONGEST_WAIT, so a
database back up is used again within half a minute; a state still failing is recalled every REMIND_EVERY.
Another run holding the profile's lock is not a failure: the job waits BUSY_WAIT, said once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from batchsync.clock import Clock
from batchsync.errors import DatabaseUnavailable, TransportError

log = logging.getLogger(__name__)
FIRST_WAIT = 5.0
LONGEST_WAIT = 30.0
REMIND_EVERY = 600.0
BUSY_WAIT = 5.0
OUTAGES = ("database", "server")


def kind_of(exc: BaseException) -> str:
    """What is wrong, in a word: 'database' or 'server' when it is down (waiting may help), else 'error'."""
    if isinstance(exc, DatabaseUnavailable):
        return "database"
    if isinstance(exc, TransportError) and exc.retryable:
        return "server"
    return "error"


@dataclass
class _State:
    """One job's failing state: what is wrong since when, the back-off, and when it was last said."""

    kind: str
    message: str
    since: datetime
    since_monotonic: float
    wait: float
    next_try: float
    said_at: float
    tries: int = 1


class Trouble:
    """A profile's failing jobs: which wait and until when, and the log lines said once per change of state."""

    def __init__(self, profile: str, clock: Clock) -> None:
        self.profile = profile
        self.clock = clock
        self.states: dict[str, _State] = {}
        self._busy_until = 0.0
        self._busy_said = False

    def blocked(self, job: str) -> bool:
        """Whether the job waits: it failed and its back-off runs, the profile's database or server is down and
        its back-off runs, or another run held the lock a moment ago."""
        now = self.clock.monotonic()
        if now < self._busy_until:
            return True
        return any(
            now < state.next_try and (name == job or state.kind in OUTAGES) for name, state in self.states.items()
        )

    def describe(self) -> list[str]:
        """The trouble, for /healthz and the status page."""
        found = []
        for job, state in self.states.items():
            what = f"{state.kind} down" if state.kind in OUTAGES else f"job {job} failing"
            since = f"{state.since:%Y-%m-%d %H:%M:%S} UTC"
            found.append(f"{what} since {since} ({state.tries} tries): {state.message}")
        return found

    def failed(self, job: str, exc: BaseException, message: str) -> None:
        now = self.clock.monotonic()
        kind, state = kind_of(exc), self.states.get(job)
        if state is not None and (state.kind, state.message) == (kind, message):
            self._again(state, now)
            return
        known = any((other.kind, other.message) == (kind, message) for other in self.states.values())
        if known:  # another job found the same: said already
            log.debug("profile %s: %s also failed: %s", self.profile, job, message)
        else:
            what = f"{kind} unavailable" if kind in OUTAGES else f"{job} failed"
            log.error("profile %s: %s: %s; trying again with back-off", self.profile, what, message)
        self.states[job] = _State(kind, message, self.clock.now(), now, FIRST_WAIT, now + FIRST_WAIT, now)

    def _again(self, state: _State, now: float) -> None:
        state.tries += 1
        state.wait = min(state.wait * 2, LONGEST_WAIT)
        state.next_try = now + state.wait
        if now - state.said_at >= REMIND_EVERY:
            state.said_at = now
            log.warning(
                "profile %s: still failing since %s UTC (%d tries): %s",
                self.profile,
                f"{state.since:%H:%M}",
                state.tries,
                state.message,
            )
        else:
            log.debug("profile %s: still failing (%d tries): %s", self.profile, state.tries, state.message)

    def cleared(self, job: str) -> None:
        """The job ended well: its trouble is over, and an outage it shared with other jobs too."""
        state = self.states.pop(job, None)
        self._busy_said = False
        if state is None:
            return
        if state.kind in OUTAGES:
            self.states = {name: other for name, other in self.states.items() if other.kind != state.kind}
        minutes = (self.clock.monotonic() - state.since_monotonic) / 60
        log.info("profile %s: working again after %.1f min (%s)", self.profile, minutes, state.message)

    def busy(self, reason: str) -> None:
        """Another run holds the profile's lock: wait a moment; said once until a job gets through."""
        self._busy_until = self.clock.monotonic() + BUSY_WAIT
        if not self._busy_said:
            self._busy_said = True
            log.info("profile %s: %s; waiting for it", self.profile, reason)
        else:
            log.debug("profile %s: still busy: %s", self.profile, reason)
