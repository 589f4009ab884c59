"""The provider's opt-outs, kept for good (``bs_provider_optouts``): per profile, list and address, the latest
opt-out the provider reported. An import reads those of a batch's addresses, changes them as its rows say, and
writes them back in the file's transaction::

    reports = ProviderOptOuts(connection, "mailup", {"bob@example.com"})
    reports.remember("newsletter", "bob@example.com", "bob@example.com", "unsubscribe", at, "link", "file:2")
    reports.save(now)

Every export reads the table (``engine.crmread``): such an address is never sent as subscribed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from batchsync.db import driver


@dataclass(frozen=True)
class ProviderReport:
    """The latest opt-out the provider reported for one list and address: its kind, time, reason and source."""

    email: str
    kind: str
    at: datetime
    reason: str
    source: str


LOOKUP = 5000
OPT_OUT_COLUMNS = ("email", "kind", "at", "reason", "source", "recorded_at", "profile", "list_code", "email_key")


class ProviderOptOuts:
    """The opt-outs the provider reported for some addresses, per list: read once per batch of a file, changed in
    memory by its rows, one at a time (each list and address keeps the latest; a later re-subscription the
    provider reports clears it), and written back by :meth:`save` in the file's transaction. The import uses it
    where the batch's subscribes or email changes make the order of its rows matter; ``db.sets.latest`` is the
    same for a batch of opt-outs alone, at once."""

    def __init__(self, connection: Connection, profile: str, keys: set[str]) -> None:
        self.connection, self.profile = connection, profile
        self.known: dict[tuple[str, str], ProviderReport] = {}
        wanted = sorted(keys)
        for start in range(0, len(wanted), LOOKUP):  # a batch's keys, a few thousand at a time (SQLite's limit)
            condition, values = driver.one_of(connection, "email_key", wanted[start : start + LOOKUP])
            statement = (
                "SELECT list_code, email_key, email, kind, at, reason, source FROM bs_provider_optouts "
                f"WHERE profile = ? AND {condition}"
            )
            for code, key, email, kind, at, reason, source in driver.query(connection, statement, [profile, *values]):
                self.known[(code, key)] = ProviderReport(email, kind, driver.read_time(at), reason, source)  # type: ignore[arg-type]
        self.stored = set(self.known)
        self.dirty: set[tuple[str, str]] = set()
        self.gone: set[tuple[str, str]] = set()

    def remember(self, code: str, key: str, email: str, kind: str, at: datetime, reason: str, source: str) -> None:
        earlier = self.known.get((code, key))
        if earlier is None or at > earlier.at:
            self.known[(code, key)] = ProviderReport(email, kind, at, reason, source)
            self.dirty.add((code, key))
            self.gone.discard((code, key))

    def forget(self, code: str, key: str, at: datetime) -> bool:
        """A re-subscription the provider reported at ``at``: it clears an older opt-out; True when it did."""
        earlier = self.known.get((code, key))
        if earlier is None or earlier.at >= at:
            return False
        del self.known[(code, key)]
        self.dirty.discard((code, key))
        self.gone.add((code, key))
        return True

    def carry(self, old_key: str, new_key: str, new_email: str) -> None:
        """An email change the provider reported: its opt-outs of the old address hold for the new one too."""
        for (code, key), report in list(self.known.items()):
            if key == old_key:
                self.remember(code, new_key, new_email, report.kind, report.at, report.reason, report.source)

    def save(self, now: datetime) -> None:
        gone = [(self.profile, code, key) for code, key in self.gone if (code, key) in self.stored]
        driver.execute_many(
            self.connection,
            "DELETE FROM bs_provider_optouts WHERE profile = ? AND list_code = ? AND email_key = ?",
            gone,
        )
        recorded = driver.stored_time(self.connection, now)
        rows = {
            (code, key): (
                self.known[(code, key)].email,
                self.known[(code, key)].kind,
                driver.stored_time(self.connection, self.known[(code, key)].at),
                self.known[(code, key)].reason[:100],
                self.known[(code, key)].source[:600],
                recorded,
                self.profile,
                code,
                key,
            )
            for code, key in self.dirty
        }
        table, keys = "bs_provider_optouts", ("profile", "list_code", "email_key")
        driver.update_many(
            self.connection, table, OPT_OUT_COLUMNS[:6], keys, [r for k, r in rows.items() if k in self.stored]
        )
        driver.insert_many(
            self.connection, table, OPT_OUT_COLUMNS, [r for k, r in rows.items() if k not in self.stored]
        )
