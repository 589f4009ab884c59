"""From CRM rows to the provider's rows: one row per email and list, with a fingerprint of its content.

Several CRM contacts with one email become one row whose status is merged (an opt-out wins), and a suppressed
address is never written as subscribed. The row's other cells (the address as entered, names, custom fields)
are those of the contact with the lowest id (the oldest record, a choice no later change can move; the
sources arrive ordered by address, then id); its groups are all of theirs. The fingerprint covers every column
but the status, which the ledger keeps on its own so that a status the provider reported is not echoed back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from datetime import date, datetime
from functools import cached_property
from itertools import groupby
from operator import attrgetter
from typing import NamedTuple

from batchsync.config import ExportColumn, Profile
from batchsync.db.sources import ExportSource
from batchsync.rules import Status, email_problem, export_status, merge_statuses

ROWS_VERSION = 1  # raise when a change here renders the same CRM rows differently
InvalidSink = Callable[[int, str, str], None]
Cell = Callable[[list[ExportSource], Status], str]


class ProviderRow(NamedTuple):
    email_key: str
    email: str
    contact_ids: tuple[int, ...]
    status: Status
    source_statuses: tuple[str, ...]
    values: list[str]
    fingerprint: int
    from_provider: bool  # every contact's status was last set by the provider: it knows this row already
    source_digest: int | None = None  # the sum of its CRM rows' digests (db.digest), when read with them
    provider_opt_out: datetime | None = None  # the provider's remembered opt-out of the address on the list
    consent_at: datetime | None = None  # the earliest consent of its contacts; None when one has none


def fingerprint(values: Iterable[str]) -> int:
    """A signed 64-bit digest (it fits a BIGINT column) of the row's values."""
    digest = hashlib.blake2b("\x1f".join(values).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class RowBuilder:
    def __init__(self, profile: Profile, list_code: str) -> None:
        self.export = profile.export
        self.list = profile.lists[list_code]
        self.columns = written_columns(profile)
        self.fields = [column.field for column in self.columns]
        self.status_index = self.fields.index("status") if "status" in self.fields else None
        self.needs_custom = any(name.startswith("custom.") for name in self.fields)
        self.cells = [self._cell(column) for column in self.columns]
        self.needs_groups = "groups" in self.fields
        self._names_cache: dict[tuple[str, ...], str] = {}

    def rows(self, sources: Iterable[ExportSource], on_invalid: InvalidSink) -> Iterator[ProviderRow]:
        """Provider rows in email order; invalid addresses go to ``on_invalid`` and are not exported."""
        for key, grouped in groupby(sources, key=attrgetter("email_key")):
            group = list(grouped)
            problem = email_problem(group[0].email)
            if problem is not None:
                for source in group:
                    on_invalid(source.contact_id, source.email, problem)
                continue
            first = group[0]
            ids: tuple[int, ...]
            statuses: tuple[str, ...]
            if len(group) == 1:  # the common case, without the generators below
                status = export_status(first.status, first.suppressed)
                ids, statuses, from_provider = (first.contact_id,), (first.status,), first.source == "provider"
                consent = first.consent_at
            else:
                status = merge_statuses(export_status(s.status, s.suppressed) for s in group)
                ids, statuses = tuple(s.contact_id for s in group), tuple(s.status for s in group)
                from_provider = all(s.source == "provider" for s in group)
                consent = _earliest_consent(group)
            if not self.sendable(status):
                continue  # a status the provider has no value for (say, pending at MailUp) is not sent
            values = [cell(group, status) for cell in self.cells]
            at = self.status_index
            content = values if at is None else values[:at] + values[at + 1 :]
            digest = first.digest if len(group) == 1 else _digest_sum(group)
            yield ProviderRow(
                key,
                first.email.strip(),
                ids,
                status,
                statuses,
                values,
                fingerprint(content),
                from_provider,
                digest,
                first.provider_opt_out,
                consent,
            )

    @cached_property
    def salt(self) -> str:
        """What, besides the CRM rows, decides this list's rows: the digests of rows read under another salt
        (another profile setting, another way of building rows) never match, so such rows are compared in full.
        """
        settings = [ROWS_VERSION, self.export.model_dump(mode="json"), self.list.model_dump(mode="json")]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def sendable(self, status: str) -> bool:
        return status in self.sendable_statuses

    @cached_property
    def sendable_statuses(self) -> tuple[str, ...]:
        """The statuses a row goes out with (others, say pending at MailUp, are not sent)."""
        return tuple(self.export.status_values) if self.status_index is not None else ("subscribed",)

    @property
    def tombstones(self) -> bool:
        """Whether leaving a list can be said in this format (it has a status column)."""
        return self.status_index is not None

    def with_status(self, row: ProviderRow, status: Status) -> ProviderRow:
        """The same row sent with another status (a re-subscription going out as pending)."""
        assert self.status_index is not None
        values = list(row.values)
        values[self.status_index] = self.export.status_values[status]
        return row._replace(status=status, values=values)

    def tombstone(self, email: str) -> list[str]:
        """The row that tells the provider an address left the list: only email, list and status are filled."""
        values = {"email": email, "list_id": self.list.id, "status": self.export.status_values["unsubscribed"]}
        return [values.get(name, "") for name in self.fields]

    def _cell(self, column: ExportColumn) -> Cell:
        """A function that renders one column of a row: chosen once per export, called for every row."""
        name = column.field
        if name == "status":
            values = self.export.status_values
            return lambda group, status: values[status]
        if name == "list_id":
            list_id = self.list.id
            return lambda group, status: list_id
        if name == "groups":
            return lambda group, status: self._groups(group)
        if name == "email":
            return lambda group, status: group[0].email.strip()
        plain = not (column.date_format or column.transform or column.values)
        if name in ("first_name", "last_name"):
            field = attrgetter(name)
            if plain and not column.default:
                return lambda group, status: field(group[0]) or ""
            return lambda group, status: self._render(column, field(group[0]) or "")
        key = name.removeprefix("custom.")
        return lambda group, status: self._render(column, _text((group[0].custom or {}).get(key)))

    def _render(self, column: ExportColumn, value: str) -> str:
        if not value:
            return column.default
        if column.date_format:
            with suppress(ValueError):  # a value that is not an ISO date is sent as it is
                value = date.fromisoformat(value[:10]).strftime(column.date_format)
        if column.transform is not None:
            value = getattr(value, column.transform)()
        return column.values.get(value, value)

    def _groups(self, group: list[ExportSource]) -> str:
        if len(group) == 1:
            return self._group_names(group[0].group_codes)  # already sorted
        return self._group_names(tuple(sorted({code for source in group for code in source.group_codes})))

    def _group_names(self, codes: tuple[str, ...]) -> str:
        names = self._names_cache.get(codes)
        if names is None:  # a list has few groups, so few combinations: each is joined once
            names = self.export.group_separator.join(self.list.groups.get(code, code) for code in codes)
            if len(self._names_cache) < 10_000:
                self._names_cache[codes] = names
        return names


def _earliest_consent(group: list[ExportSource]) -> datetime | None:
    """Consent for an address several contacts share: the earliest of theirs, none when one has none."""
    moments = [source.consent_at for source in group]
    return None if None in moments else min(moments)  # type: ignore[type-var]


def _digest_sum(group: list[ExportSource]) -> int | None:
    digests = [source.digest for source in group]
    return None if None in digests else sum(digests)  # type: ignore[arg-type]


def written_columns(profile: Profile) -> list[ExportColumn]:
    """The export columns, in file order, less those the provider only sends to us (direction "in")."""
    return [column for column in profile.export.columns if column.direction != "in"]


def _text(value: object) -> str:
    return "" if value is None else str(value)
