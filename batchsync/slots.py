"""The nightly slots of a profile: when its scheduled run is due, and what each night's run is called.

    latest_slot(profile, now)   # Slot(name="nightly 2026-01-05 02:30", due=...) or None without a schedule
    next_nightly(profile, now)  # when the next one is due (aware UTC)

A slot is named by its local date and time, so a run that starts late (a database that was down, a daemon that
was stopped) still carries the name of the night it belongs to, and two daemons sharing one CRM run it once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from batchsync.config import Profile


@dataclass(frozen=True)
class Slot:
    """One night of a profile's schedule: its name (by local date and time) and when it is due."""

    name: str
    due: dt.datetime  # aware UTC


def latest_slot(profile: Profile, now: dt.datetime) -> Slot | None:
    """The most recent nightly slot due at or before ``now``, or None without a nightly schedule."""
    config = profile.schedule
    if not config.nightly:
        return None
    local = now.astimezone(ZoneInfo(config.timezone))
    due = _at(local.date(), config.nightly, config.timezone)
    if due > local:
        due = _at(local.date() - dt.timedelta(days=1), config.nightly, config.timezone)
    return Slot(f"nightly {due:%Y-%m-%d} {config.nightly}", due.astimezone(dt.UTC))


def next_nightly(profile: Profile, now: dt.datetime) -> dt.datetime | None:
    """When the profile's next nightly run is due (aware UTC), or None without a schedule."""
    config = profile.schedule
    if not config.nightly:
        return None
    local = now.astimezone(ZoneInfo(config.timezone))
    due = _at(local.date(), config.nightly, config.timezone)
    if due <= local:
        due = _at(local.date() + dt.timedelta(days=1), config.nightly, config.timezone)
    return due.astimezone(dt.UTC)


def _at(day: dt.date, hh_mm: str, zone: str) -> dt.datetime:
    hours, minutes = (int(part) for part in hh_mm.split(":"))
    return dt.datetime(day.year, day.month, day.day, hours, minutes, tzinfo=ZoneInfo(zone))
