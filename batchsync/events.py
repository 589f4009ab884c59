"""Reading one inbound row into an event, or into the reason it was rejected.

Timestamps are read in the profile's time zone and turned into UTC. A row is rejected (not the file) for an
invalid email, an unknown list id, an unparsable date, or a date later than now plus the kind's tolerance.

Opt-outs fail safe: in a file whose reason codes are all opt-outs, a code the table lacks is still an opt-out (an
unsubscribe, its reason "unknown code N", with a warning in the result file); elsewhere, or with
``unknown_codes = "reject"``, such a row is rejected. The columns a kind names as optional (MailUp lets the
unsubscribers export leave out all but the address) may be missing from a file: without a list, a row concerns
every list; without a time, it counts as happening when the file is applied; without a reason, it is the
kind's ``event``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

from batchsync.config import InboundConfig, Profile
from batchsync.formats.csvfile import Record, restored
from batchsync.rules import OPT_OUT_KINDS, EventKind, OptOut, email_key, email_problem


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
    warning: str | None = None  # applied, but someone should look (an unknown code taken as an unsubscribe)

    @property
    def opt_out(self) -> OptOut:
        assert self.kind in OPT_OUT_KINDS
        return OptOut(self.kind, self.at, self.reason)


REASON_LENGTH = 100  # subscriptions.reason


class RowError(ValueError):
    """A row that cannot be applied; the message is the reason written to the errors file."""


class EventReader:
    def __init__(self, profile: Profile, kind: InboundConfig, received_at: datetime) -> None:
        self.profile, self.kind, self.received_at = profile, kind, received_at
        self.columns = kind.columns
        self.latest = received_at + kind.tolerance  # a later event time is a rejected row
        self.present: set[str] = set()  # the columns of the file being read (see use_header)
        # strptime costs more than the rest of a row, and a provider's file repeats its timestamps.
        self._parse_time = lru_cache(maxsize=65536)(self._parse_time)  # type: ignore[method-assign]

    def required_columns(self) -> list[str]:
        c, optional = self.columns, set(self.kind.optional_columns)
        named = {"list_id": c.list_id, "at": c.at, "reason": c.reason}
        names = [c.email, c.new_email, *(name for key, name in named.items() if key not in optional)]
        return [name for name in names if name]

    def use_header(self, header: list[str]) -> None:
        self.present = set(header)

    def _column(self, name: str | None) -> str | None:
        """The file's column for a mapped field, or None when the profile maps none or the file lacks it."""
        return name if name and (name in self.present or not self.present) else None

    def read(self, record: Record) -> InboundEvent:
        if len(record.raw) != record.expected:
            raise RowError(f"{len(record.raw)} fields where the header has {record.expected}")
        email = self._value(record, self.columns.email)
        problem = email_problem(email)
        if problem is not None:
            raise RowError(problem)
        kind, code, warning = self._event_kind(record)
        return InboundEvent(
            record.line,
            email,
            email_key(email),
            self._list_code(record),
            kind,
            self._moment(record, kind),
            self._reason(kind, code, record, warning),
            code,
            self._new_email(record, kind),
            record.values if kind == "update" else {},
            record.raw,
            warning,
        )

    def _value(self, record: Record, column: str | None) -> str:
        """A cell, trimmed, without the quote batchsync's own reports put before a formula character."""
        return restored(record.values.get(column, "").strip()) if column else ""

    def _new_email(self, record: Record, kind: EventKind) -> str | None:
        if kind != "email_change":
            return None
        if not self.columns.new_email:
            raise RowError("an email change needs the profile's columns.new_email")
        new = self._value(record, self.columns.new_email)
        problem = email_problem(new)
        if problem is not None:
            raise RowError(f"new address: {problem}")
        return new

    def _list_code(self, record: Record) -> str | None:
        if self.kind.list_code:
            return self.kind.list_code
        value = self._value(record, self._column(self.columns.list_id))
        if not value:
            return None
        code = self.profile.list_by_provider_id(value)
        if code is None:
            raise RowError(f"unknown list id {value!r}")
        return code

    def _moment(self, record: Record, kind: EventKind) -> datetime:
        column = self._column(self.columns.at)
        if column is None:
            return self.received_at
        value = self._value(record, column)
        if not value and kind in ("update", "ignore", "open", "click"):
            return self.received_at  # no status changes on these: their time may be missing
        try:
            moment = self._parse_time(value)
        except ValueError:
            expected = " or ".join(self.kind.timestamp_formats)
            raise RowError(f"unparsable date {value!r} (expected {expected})") from None
        if moment > self.latest:
            raise RowError(
                f"date {value!r} ({moment:%Y-%m-%d %H:%M} UTC) is in the future, beyond the tolerance of "
                f"{self.kind.future_tolerance} (inbound.future_tolerance)"
            )
        return moment

    def _parse_time(self, value: str) -> datetime:
        *others, last = self.kind.timestamp_formats
        for form in others:
            try:
                return self._in_utc(datetime.strptime(value, form))
            except ValueError:
                continue
        return self._in_utc(datetime.strptime(value, last))

    def _in_utc(self, local: datetime) -> datetime:
        if local.tzinfo is None:
            local = local.replace(tzinfo=self.kind.zone)
        return local.astimezone(UTC)

    def _event_kind(self, record: Record) -> tuple[EventKind, str, str | None]:
        """The row's event, its reason code, and a warning where an unknown code was taken as an opt-out."""
        column = self._column(self.columns.reason)
        if column and self.kind.codes:
            code = self._value(record, column)
            mapped = self.kind.codes.get(code)
            if mapped is not None:
                return mapped.event, code, None
            fallback = self.kind.unknown_code_event
            if fallback is None:
                raise RowError(f"unknown reason code {code!r} in column {column}")
            return fallback, code, f"unknown code {code!r} in column {column}: taken as an {fallback}"
        assert self.kind.event is not None  # the profile check guarantees one of the two
        return self.kind.event, "", None

    def _reason(self, kind: EventKind, code: str, record: Record, warning: str | None) -> str:
        mapped = self.kind.codes.get(code)
        if warning is not None:
            reason = f"unknown code {code}"
        else:
            reason = f"{mapped.reason} ({self.columns.reason}={code})" if mapped else kind
        note = self._value(record, self._column(self.columns.note))
        return (f"{reason}: {note}" if note else reason)[:REASON_LENGTH]
