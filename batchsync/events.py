"""Reading one inbound row into an event, or into the reason it was rejected.

Timestamps are read in the profile's time zone and turned into UTC. A row is rejected (not the file) for an
invalid email, an unknown list id, an unknown reason code or an unparsable date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

from batchsync.config import EventKind, InboundConfig, Profile
from batchsync.formats.csvfile import Record
from batchsync.rules import OPT_OUT_KINDS, OptOut, email_key, email_problem


@dataclass(frozen=True)
class InboundEvent:
    line: int
    email: str
    email_key: str
    list_code: str | None  # None: the row names no list, so it concerns every list of the profile
    kind: EventKind
    at: datetime
    reason: str
    code: str
    new_email: str | None = None
    values: dict[str, str] = field(default_factory=dict)  # the row, for "update" events
    raw: list[str] = field(default_factory=list)  # the row as read, for the errors file

    @property
    def opt_out(self) -> OptOut:
        assert self.kind in OPT_OUT_KINDS
        return OptOut(self.kind, self.at, self.reason)  # type: ignore[arg-type]


REASON_LENGTH = 100  # subscriptions.reason


class RowError(ValueError):
    """A row that cannot be applied; the message is the reason written to the errors file."""


class EventReader:
    def __init__(self, profile: Profile, kind: InboundConfig, received_at: datetime) -> None:
        self.profile, self.kind, self.received_at = profile, kind, received_at
        self.columns = kind.columns
        # strptime costs more than the rest of a row, and a provider's file repeats its timestamps.
        self._parse_time = lru_cache(maxsize=65536)(self._parse_time)  # type: ignore[method-assign]

    def required_columns(self) -> list[str]:
        names = [self.columns.email, self.columns.list_id, self.columns.at, self.columns.reason, self.columns.new_email]
        return [name for name in names if name]

    def read(self, record: Record) -> InboundEvent:
        if len(record.raw) != record.expected:
            raise RowError(f"{len(record.raw)} fields where the header has {record.expected}")
        email = record.values.get(self.columns.email, "").strip()
        problem = email_problem(email)
        if problem is not None:
            raise RowError(problem)
        kind, code = self._event_kind(record)
        return InboundEvent(
            record.line,
            email,
            email_key(email),
            self._list_code(record),
            kind,
            self._moment(record, kind),
            self._reason(kind, code, record),
            code,
            self._new_email(record, kind),
            record.values if kind == "update" else {},
            record.raw,
        )

    def _new_email(self, record: Record, kind: EventKind) -> str | None:
        if kind != "email_change":
            return None
        if not self.columns.new_email:
            raise RowError("an email change needs the profile's columns.new_email")
        new = record.values.get(self.columns.new_email, "").strip()
        problem = email_problem(new)
        if problem is not None:
            raise RowError(f"new address: {problem}")
        return new

    def _list_code(self, record: Record) -> str | None:
        if self.kind.list_code:
            return self.kind.list_code
        if not self.columns.list_id:
            return None
        value = record.values.get(self.columns.list_id, "").strip()
        if not value:
            return None
        code = self.profile.list_by_provider_id(value)
        if code is None:
            raise RowError(f"unknown list id {value!r}")
        return code

    def _moment(self, record: Record, kind: EventKind) -> datetime:
        if not self.columns.at:
            return self.received_at
        value = record.values.get(self.columns.at, "").strip()
        if not value and kind in ("update", "ignore", "open", "click"):
            return self.received_at  # no status changes on these: their time may be missing
        try:
            return self._parse_time(value)
        except ValueError:
            raise RowError(f"unparsable date {value!r} (expected {self.kind.timestamp_format})") from None

    def _parse_time(self, value: str) -> datetime:
        local = datetime.strptime(value, self.kind.timestamp_format)
        if local.tzinfo is None:
            local = local.replace(tzinfo=self.kind.zone)
        return local.astimezone(UTC)

    def _event_kind(self, record: Record) -> tuple[EventKind, str]:
        if self.columns.reason and self.kind.codes:
            code = record.values.get(self.columns.reason, "").strip()
            mapped = self.kind.codes.get(code)
            if mapped is None:
                raise RowError(f"unknown reason code {code!r} in column {self.columns.reason}")
            return mapped.event, code
        assert self.kind.event is not None  # the profile check guarantees one of the two
        return self.kind.event, ""

    def _reason(self, kind: EventKind, code: str, record: Record) -> str:
        mapped = self.kind.codes.get(code)
        reason = f"{mapped.reason} ({self.columns.reason}={code})" if mapped else kind
        note = record.values.get(self.columns.note, "").strip() if self.columns.note else ""
        return (f"{reason}: {note}" if note else reason)[:REASON_LENGTH]
