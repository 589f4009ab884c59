"""The one source of time.

Everything that needs "now" takes a :class:`Clock`, so tests can set time instead of sleeping::

    clock = ManualClock(datetime(2026, 1, 1, 2, 30, tzinfo=UTC))
    clock.advance(seconds=60)
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class Clock:
    """The real clock: aware UTC datetimes and a monotonic counter."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ManualClock(Clock):
    """A clock that moves only when told to (``advance``) or when code sleeps on it."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)


def utc_stamp(moment: datetime) -> str:
    """A compact UTC stamp for file names, e.g. ``20260101T023000Z``."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
