"""A profile whose jobs keep failing (a database or server that is down, or anything else): tried again with
back-off, and logged once per change of state rather than on every try::

    trouble = Trouble("mailup", clock)
    if not trouble.blocked():
        try:
            job()
            trouble.cleared()        # "back after 3 min" when it had been failing
        except BatchsyncError as exc:
            trouble.failed(exc)      # logged when new; repeats at debug, a reminder every REMIND_EVERY seconds

The waits double from FIRST_WAIT up to LONGEST_WAIT: a database back up is used again within half a minute.
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


def kind_of(exc: BaseException) -> str:
    """What is wrong, in a word: 'database' or 'server' when it is down (waiting may help), else 'error'."""
    if isinstance(exc, DatabaseUnavailable):
        return "database"
    if isinstance(exc, TransportError) and exc.retryable:
        return "server"
    return "error"


@dataclass
class _State:
    kind: str
    message: str
    since: datetime
    since_monotonic: float
    wait: float
    next_try: float
    said_at: float
    tries: int = 1


class Trouble:
    def __init__(self, profile: str, clock: Clock) -> None:
        self.profile = profile
        self.clock = clock
        self.state: _State | None = None

    def blocked(self) -> bool:
        """Whether the profile's jobs wait: it failed, and its back-off has not run out."""
        return self.state is not None and self.clock.monotonic() < self.state.next_try

    def describe(self) -> str | None:
        """The trouble, for /healthz and the status page, or None when there is none."""
        state = self.state
        if state is None:
            return None
        down = "down" if state.kind in ("database", "server") else "failing"
        return f"{state.kind} {down} since {state.since:%Y-%m-%d %H:%M:%S} UTC ({state.tries} tries): {state.message}"

    def failed(self, exc: BaseException, message: str) -> None:
        now = self.clock.monotonic()
        kind, state = kind_of(exc), self.state
        if state is None or (state.kind, state.message) != (kind, message):
            what = f"{kind} unavailable" if kind != "error" else "failed"
            log.error("profile %s: %s: %s; trying again with back-off", self.profile, what, message)
            self.state = _State(kind, message, self.clock.now(), now, FIRST_WAIT, now + FIRST_WAIT, now)
            return
        state.tries += 1
        state.wait = min(state.wait * 2, LONGEST_WAIT)
        state.next_try = now + state.wait
        if now - state.said_at >= REMIND_EVERY:
            state.said_at = now
            log.warning(
                "profile %s: still %s, since %s UTC (%d tries)", self.profile, message, state.since, state.tries
            )
        else:
            log.debug("profile %s: still failing (%d tries): %s", self.profile, state.tries, message)

    def cleared(self) -> None:
        state = self.state
        if state is not None:
            minutes = (self.clock.monotonic() - state.since_monotonic) / 60
            log.info("profile %s: working again after %.1f min (%s)", self.profile, minutes, state.message)
            self.state = None
