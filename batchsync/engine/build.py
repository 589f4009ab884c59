"""From a bucket of CRM rows to the provider's rows, column at a time: one row per address and list.

Several CRM contacts with one address become one row whose status is merged (an opt-out wins), and a suppressed
address is never written as subscribed. The row's other cells (the address as entered, names, custom fields)
are those of the contact with the lowest id (the oldest record, a choice no later change can move); its groups
are all of theirs. The fingerprint covers every column but the status, which the ledger keeps on its own so
that a status the provider reported is not echoed back. ``rules.py`` says all this one row at a time; this is
its vectorised form (tests/test_export_rules.py holds the two to the same answers).

A JSON value of a custom field is written as its JSON text (``true``, ``5``, ``1.5``), a string as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import polars as pl

from batchsync.config import ExportColumn, Profile
from batchsync.engine.crmread import GROUP_SEP
from batchsync.rules import OPTED_OUT, PRECEDENCE, email_problem
from batchsync.vrules import python_whitespace

HASHER = f"polars {pl.__version__}; rows 2"  # what makes the fingerprints: stored with each snapshot
SEED = 0x62617463  # a fixed seed: the same row, the same fingerprint, for one polars version
# rules.email_problem's checks as one Rust regular expression: the address's shape, with the control characters
# refused before the "@" too (the domain holds none), so that one pass over the text makes both checks.
SHAPE = r"^[^@\s\"(),:;<>\[\\\]\x00-\x1f\x7f-\x9f]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"
RANK = {status: rank for rank, status in enumerate(PRECEDENCE)}


@dataclass(frozen=True)
class Built:
    """A bucket's provider rows (sorted by key), the rows of addresses several contacts share (for the
    duplicates report) and the contacts skipped for an invalid address (contact_id, email, reason)."""

    rows: pl.DataFrame
    duplicates: pl.DataFrame
    invalid: pl.DataFrame


def written_columns(profile: Profile) -> list[ExportColumn]:
    """The export columns, in file order, less those the provider only sends to us (direction "in")."""
    return [column for column in profile.export.columns if column.direction != "in"]


class FrameBuilder:
    """Builds one list's provider rows from buckets of its CRM rows (``engine.crmread.ROW_SCHEMA``)."""

    def __init__(self, profile: Profile, list_code: str) -> None:
        self.export = profile.export
        self.list = profile.lists[list_code]
        self.columns = written_columns(profile)
        self.fields = [column.field for column in self.columns]
        self.status_index = self.fields.index("status") if "status" in self.fields else None
        self.needs_custom = self.list.segment is not None or any(f.startswith("custom.") for f in self.fields)
        self.needs_groups = "groups" in self.fields and self.list.segment is None

    @cached_property
    def sendable_statuses(self) -> tuple[str, ...]:
        """The statuses a row goes out with (others, say pending at MailUp, are not sent)."""
        return tuple(self.export.status_values) if self.status_index is not None else ("subscribed",)

    @property
    def tombstones(self) -> bool:
        """Whether leaving a list can be said in this format (it has a status column)."""
        return self.status_index is not None

    @property
    def cell_names(self) -> list[str]:
        return [f"c{index}" for index in range(len(self.columns))]

    def build(self, frame: pl.DataFrame, *, every_invalid: bool = True) -> Built:
        """The bucket's rows. The skipped report lists every invalid address in a full export
        (``every_invalid``); a diff lists those that would go out were they valid (a status the provider takes,
        or several contacts), as the ones it cannot send."""
        frame = self._segment(frame) if self.list.segment is not None else frame
        # The frame is in key, then id, order: an address's contacts are neighbours, its first one first.
        key = pl.col("email_key")
        first = (key != key.shift(1)).fill_null(True)
        firsts = frame.select(key=normal_email(pl.col("email").filter(first)))  # checked once per address
        valid = firsts.select(valid_key(pl.col("key"))).to_series()
        frame = frame.with_columns(
            xstatus=pl.when(pl.col("suppressed") & ~pl.col("status").is_in(list(OPTED_OUT)))
            .then(pl.lit("unsubscribed"))
            .otherwise(pl.col("status")),
            valid=pl.lit(valid).gather(first.cum_sum() - 1),
        )
        invalid = self._invalid(frame.filter(~pl.col("valid")), every_invalid)
        frame = frame.filter(pl.col("valid"))
        twice = (key == key.shift(1)).fill_null(False) | (key == key.shift(-1)).fill_null(False)
        rows = pl.concat([self._singles(frame.filter(~twice)), self._merged(frame.filter(twice))])
        rows = rows.filter(pl.col("status").is_in(list(self.sendable_statuses))).sort("email_key")
        if self.needs_groups:
            rows = rows.with_columns(group_names=self._group_names(rows["codes"]))
        rows = rows.with_columns(self._cells()).with_columns(fingerprint=self._fingerprint())
        duplicates = rows.filter(pl.col("ids").is_not_null()).select(
            pl.col("email").str.strip_chars(), "ids", "statuses", "status"
        )
        dropped = ["codes", "custom", "first_name", "last_name", "ids", "statuses"]
        return Built(rows.drop(dropped + (["group_names"] if self.needs_groups else [])), duplicates, invalid)

    def _group_names(self, codes: pl.Series) -> pl.Series:
        """The groups cell from each row's codes (joined by GROUP_SEP, any order, perhaps repeated): the codes
        sorted, each named by the profile's list, joined by the group separator. A list has few groups, so a
        bucket few combinations: each is named once, here."""
        names = {}
        for combination in codes.drop_nulls().unique().to_list():
            ordered = sorted(set(combination.split(GROUP_SEP)) - {""})
            names[combination] = self.export.group_separator.join(self.list.groups.get(c, c) for c in ordered)
        return codes.replace_strict(names, default="", return_dtype=pl.String).fill_null("")

    def _singles(self, frame: pl.DataFrame) -> pl.DataFrame:
        return frame.select(
            *_KEPT,
            status=pl.col("xstatus"),
            from_provider=(pl.col("source") == "provider").fill_null(False),
            consent_at=pl.col("consent_at"),
            codes=pl.col("codes"),
            ids=pl.lit(None, pl.String),
            statuses=pl.lit(None, pl.String),
        )

    def _merged(self, frame: pl.DataFrame) -> pl.DataFrame:
        """One row for the contacts sharing an address (the frame is in key, then id, order)."""
        rank = pl.col("xstatus").replace_strict(RANK, return_dtype=pl.Int64).min()
        merged = frame.group_by("email_key", maintain_order=True).agg(
            *(pl.col(name).first() for name in _KEPT if name != "email_key"),
            status=rank.replace_strict(dict(enumerate(PRECEDENCE)), return_dtype=pl.String),
            from_provider=(pl.col("source") == "provider").fill_null(False).all(),
            consent_at=pl.when(pl.col("consent_at").is_null().any()).then(None).otherwise(pl.col("consent_at").min()),
            codes=pl.col("codes").str.join(GROUP_SEP),
            ids=pl.col("contact_id").cast(pl.String).str.join(","),
            statuses=pl.col("status").fill_null("").str.join(","),
        )
        return merged.select(*_KEPT, "status", "from_provider", "consent_at", "codes", "ids", "statuses")

    def _segment(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Every live contact whose field matches the list's segment filter; subscribed unless its row says."""
        segment = self.list.segment
        assert segment is not None
        name = segment.field
        if name.startswith("custom."):
            value = _custom(name.removeprefix("custom."))
        elif name == "suppressed":
            value = pl.when(pl.col(name)).then(pl.lit("1")).otherwise(pl.lit(""))
        else:
            value = pl.col(name).cast(pl.String)
        text = value.fill_null("").str.strip_chars()
        matches = text != "" if segment.equals is None else text == segment.equals
        return frame.filter(matches).with_columns(
            status=pl.col("status").fill_null("subscribed"), source=pl.col("source").fill_null("segment")
        )

    def _invalid(self, frame: pl.DataFrame, every: bool) -> pl.DataFrame:
        """The contacts skipped for their address's first contact's address, with rules.email_problem's reason
        (a few rows: the reasons are worded one at a time)."""
        if not every:
            sendable = pl.col("xstatus").is_in(list(self.sendable_statuses)).any().over("email_key")
            frame = frame.filter(sendable | (pl.len().over("email_key") > 1))
        first = frame.group_by("email_key", maintain_order=True).agg(pl.col("email").first().alias("first"))
        reasons = {row[0]: email_problem(row[1]) or "invalid email" for row in first.iter_rows()}
        return frame.select(
            "contact_id",
            "email",
            reason=pl.col("email_key").replace_strict(reasons, default="invalid email", return_dtype=pl.String),
        )

    def _cells(self) -> list[pl.Expr]:
        """One expression per written column; the status cell is filled once the status to send is known."""
        return [self._cell(column).alias(f"c{index}") for index, column in enumerate(self.columns)]

    def _cell(self, column: ExportColumn) -> pl.Expr:
        name = column.field
        if name == "status":
            return pl.lit(None, pl.String)
        if name == "list_id":
            return pl.lit(self.list.id, pl.String)
        if name == "groups":
            return pl.col("group_names")
        if name == "email":
            return pl.col("email").str.strip_chars()
        if name in ("first_name", "last_name"):
            value = pl.col(name).fill_null("")
            plain = not (column.date_format or column.transform or column.values or column.default)
            return value if plain else render(column, value)
        return render(column, _custom(name.removeprefix("custom.")).fill_null(""))

    def _fingerprint(self) -> pl.Expr:
        content = [f"c{i}" for i in range(len(self.columns)) if i != self.status_index]
        if not content:
            return pl.lit(0, pl.Int64)
        return pl.concat_str(content, separator="\x1f").hash(SEED).reinterpret(signed=True)

    def status_cell(self, status: pl.Expr) -> pl.Expr:
        """The status cell for a status to send."""
        return status.replace_strict(dict(self.export.status_values), default=None, return_dtype=pl.String)


_KEPT = ("email_key", "email", "contact_id", "first_name", "last_name", "custom", "opt_out_at")


def _custom(key: str) -> pl.Expr:
    return pl.col("custom").str.json_path_match(f"$[{json.dumps(key)}]")


def render(column: ExportColumn, value: pl.Expr) -> pl.Expr:
    """A column's cell from its CRM value: the default when empty, else the date format, the case transform and
    the value map, in that order (a value that is not an ISO date is sent as it is)."""
    out = value
    if column.date_format:
        parsed = value.str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False)
        out = pl.when(parsed.is_not_null()).then(parsed.dt.strftime(column.date_format)).otherwise(out)
    if column.transform == "upper":
        out = out.str.to_uppercase()
    elif column.transform == "lower":
        out = out.str.to_lowercase()
    elif column.transform == "title":
        out = out.str.to_titlecase()
    if column.values:
        out = out.replace(column.values)
    return pl.when(value == "").then(pl.lit(column.default, pl.String)).otherwise(out)


def valid_email(email: pl.Expr) -> pl.Expr:
    """rules.email_problem(email) is None, column at a time."""
    return valid_key(normal_email(email))


def normal_email(email: pl.Expr) -> pl.Expr:
    """rules.email_key: trimmed of what Python's ``str.strip`` trims, and lower-cased."""
    return email.fill_null("").str.strip_chars(python_whitespace()).str.to_lowercase()


def valid_key(key: pl.Expr) -> pl.Expr:
    """rules.email_problem's checks on a key :func:`normal_email` made (an empty key fails the shape)."""
    return (key.str.len_chars() <= 254) & key.str.contains(SHAPE) & ~key.str.contains("..", literal=True)


def export_decision(pending_supported: bool) -> pl.Expr:
    """rules.export_decision, column at a time, over ``status``, ``opt_out_at`` and ``consent_at``: the status to
    send, or null where the provider opted the address out and no consent since lets it go out."""
    status, opted_out, consent = pl.col("status"), pl.col("opt_out_at"), pl.col("consent_at")
    keep = opted_out.is_null() | ~status.is_in(["subscribed", "pending"])
    pending = consent.is_not_null() & (consent > opted_out) & pl.lit(pending_supported)
    return pl.when(keep).then(status).when(pending).then(pl.lit("pending")).otherwise(pl.lit(None, pl.String))
