"""A batch of an inbound file's rows read into events at once: the vectorised twin of :class:`EventReader`.

Every row that the vectorised checks accept is read by expressions over the whole batch; a row any check doubts
(a bad address, an unknown code or list, a date it cannot read, text outside ASCII, a row of the wrong width)
is read by ``EventReader.read`` itself, which accepts it or says exactly why not. So the scalar reader remains
the specification: the expressions only have to agree with it on the rows they accept (``tests/test_eventframe``
checks that they do, over random rows)::

    events, rejected = EventFrames(reader, header).read(batch)

``events`` holds, per row: ``line``, ``email`` (as entered, trimmed), ``email_key``, ``list_code`` (null: every
list), ``kind``, ``at`` (UTC), ``reason``, ``code``, ``new_email`` and ``new_key`` (email changes), ``warning``,
and the row's own fields and width (for an errors file, and the values of an ``update``). ``rejected``: the
rows read as errors, with their ``reason``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import polars as pl

from batchsync import vrules
from batchsync.events import EventReader, InboundEvent, RowError
from batchsync.formats.csvfile import FORMULA_STARTS, Record
from batchsync.formats.csvframe import cell
from batchsync.rules import email_key

TIME = pl.Datetime("us", "UTC")
EVENT_COLUMNS: dict[str, Any] = {
    "line": pl.Int64,
    "email": pl.String,
    "email_key": pl.String,
    "list_code": pl.String,
    "kind": pl.String,
    "at": TIME,
    "reason": pl.String,
    "code": pl.String,
    "new_email": pl.String,
    "new_key": pl.String,
    "warning": pl.String,
}
UNTIMED = ("update", "ignore", "open", "click")  # no status changes: their time may be missing


def value(column: pl.Expr) -> pl.Expr:
    """``EventReader._value``: a cell trimmed, without the quote batchsync's reports put before a formula."""
    text = column.fill_null("").str.strip_chars(vrules.python_whitespace())
    return pl.when(text.str.starts_with("'")).then(text.str.replace(_QUOTED, "${1}")).otherwise(text)


_QUOTED = "^'([" + "".join(f"\\x{ord(start):02X}" for start in FORMULA_STARTS) + "])"  # csvfile.restored


class EventFrames:
    """Reads batches (``csvframe``) of one file into events, by the rules of the file's :class:`EventReader`."""

    def __init__(self, reader: EventReader, header: list[str]) -> None:
        self.reader, self.header = reader, header
        self.kind, self.columns = reader.kind, reader.columns
        self.position = {name: index for index, name in enumerate(header)}

    def read(self, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The batch's events, and its rejected rows (their fields, ``line``, ``width`` and ``reason``)."""
        parsed = raw.with_columns(self._fields()).with_columns(self._keys()).with_columns(self._event())
        parsed = parsed.with_columns(self._moment(parsed)).with_columns(self._checks())
        fast = parsed.filter(pl.col("fast")).select(*EVENT_COLUMNS, *self._raw_columns())
        events, rejected = self._by_scalar(raw.filter(~parsed["fast"]))
        return pl.concat([fast, events]).sort("line"), rejected

    def _raw_columns(self) -> list[str]:
        return ["width", *(cell(index) for index in range(len(self.header)))]

    def _cell(self, name: str | None) -> pl.Expr:
        """A mapped column's value, or "" where the profile maps none or the file lacks it."""
        column = self.reader._column(name)
        if column is None or column not in self.position:
            return pl.lit("")
        return value(pl.col(cell(self.position[column])))

    def _fields(self) -> list[pl.Expr]:
        return [
            self._cell(self.columns.email).alias("email"),
            self._cell(self.columns.reason).alias("code_cell"),
            self._cell(self.columns.list_id).alias("list_cell"),
            self._cell(self.columns.at).alias("at_cell"),
            self._cell(self.columns.note).alias("note"),
            self._cell(self.columns.new_email).alias("new_email_cell"),
        ]

    def _keys(self) -> list[pl.Expr]:
        email = pl.col("email")
        return [vrules.email_key(email).alias("email_key"), vrules.ascii_only(email).alias("email_ascii")]

    def _event(self) -> list[pl.Expr]:
        """The event of each row by its code (null: a code the table lacks, read by the scalar reader)."""
        codes = self.kind.codes
        by_code = self.reader._column(self.columns.reason) is not None and bool(codes)
        code = pl.col("code_cell") if by_code else pl.lit("")
        events = {key: entry.event for key, entry in codes.items()}
        event = code.replace_strict(events, default=None, return_dtype=pl.String) if by_code else None
        kind = event if event is not None else pl.lit(self.kind.event, dtype=pl.String)
        return [code.alias("code"), kind.alias("kind"), self._list_code().alias("list_code")]

    def _list_code(self) -> pl.Expr:
        if self.kind.list_code:
            return pl.lit(self.kind.list_code, dtype=pl.String)
        ids: dict[str, str] = {}
        for code, entry in self.reader.profile.lists.items():
            ids.setdefault(entry.id, code)  # Profile.list_by_provider_id: the first list with the id
        listed = pl.col("list_cell").replace_strict(ids, default=None, return_dtype=pl.String)
        return pl.when(pl.col("list_cell") == "").then(None).otherwise(listed)

    def _moment(self, parsed: pl.DataFrame) -> pl.Expr:
        """Each row's time in UTC, or null where the scalar reader must say why not (unparsable, too late)."""
        received = pl.lit(self.reader.received_at, dtype=TIME)
        if self.reader._column(self.columns.at) is None:
            return received.alias("at")
        wanted = parsed.filter(pl.col("at_cell") != "")["at_cell"].unique()
        times = pl.DataFrame({"at_cell": wanted, "parsed": [self._parse(text) for text in wanted]})
        times = times.with_columns(pl.col("parsed").cast(TIME))
        moment = pl.col("at_cell").replace_strict(times["at_cell"], times["parsed"], default=None, return_dtype=TIME)
        untimed = (pl.col("at_cell") == "") & pl.col("kind").is_in(UNTIMED)
        return pl.when(untimed).then(received).otherwise(moment).alias("at")

    def _parse(self, text: str) -> datetime | None:
        try:
            moment: datetime = self.reader._parse_time(text)
        except ValueError:
            return None
        return moment if moment <= self.reader.latest else None

    def _checks(self) -> list[pl.Expr]:
        """Whether a row is read here (``fast``), and its reason, new address and key when it is."""
        mapped = {key: entry.reason for key, entry in self.kind.codes.items()}
        label = pl.col("code").replace_strict(mapped, default=None, return_dtype=pl.String)
        named = pl.format("{} ({}={})", label, pl.lit(str(self.columns.reason)), pl.col("code"))
        reason = pl.when(label.is_not_null()).then(named).otherwise(pl.col("kind"))
        noted = pl.when(pl.col("note") != "").then(pl.format("{}: {}", reason, pl.col("note"))).otherwise(reason)
        changes = pl.col("kind") == "email_change"
        new_key = vrules.email_key(pl.col("new_email_cell"))
        new_ok = pl.lit(bool(self.columns.new_email)) & vrules.ascii_only(pl.col("new_email_cell"))
        fast = (
            (pl.col("width") == len(self.header))
            & pl.col("email_ascii")
            & vrules.email_valid(pl.col("email_key"))
            & pl.col("kind").is_not_null()
            & ((pl.col("list_cell") == "") | pl.col("list_code").is_not_null() | pl.lit(bool(self.kind.list_code)))
            & pl.col("at").is_not_null()
            & (~changes | (new_ok & vrules.email_valid(new_key)))
        )
        return [
            noted.str.slice(0, 100).alias("reason"),
            pl.when(changes).then(pl.col("new_email_cell")).alias("new_email"),
            pl.when(changes).then(new_key).alias("new_key"),
            pl.lit(None, dtype=pl.String).alias("warning"),
            fast.fill_null(False).alias("fast"),
        ]

    def _by_scalar(self, raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The doubted rows, read one by one by the scalar reader."""
        accepted: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        for row in raw.iter_rows(named=True):
            fields = [row[cell(index)] for index in range(len(self.header))]
            cells = [field for field in fields[: row["width"]] if field is not None]
            cells += [""] * (row["width"] - len(cells))  # beyond the header: only their count is read
            record = Record(row["line"], dict(zip(self.header, cells, strict=False)), cells, len(self.header))
            try:
                accepted.append({**_event_row(self.reader.read(record)), **row})
            except RowError as exc:
                refused.append({**row, "reason": str(exc)})
        schema: dict[str, Any] = {**EVENT_COLUMNS, **raw.schema}
        rejected_schema: dict[str, Any] = {**raw.schema, "reason": pl.String}
        return pl.DataFrame(accepted, schema=schema), pl.DataFrame(refused, schema=rejected_schema)


def _event_row(event: InboundEvent) -> dict[str, Any]:
    new_key = None if event.new_email is None else email_key(event.new_email)
    return {
        "line": event.line,
        "email": event.email,
        "email_key": event.email_key,
        "list_code": event.list_code,
        "kind": event.kind,
        "at": event.at,
        "reason": event.reason,
        "code": event.code,
        "new_email": event.new_email,
        "new_key": new_key,
        "warning": event.warning,
    }
