"""What each kind of inbound event does, for a whole batch of its rows at once: one handler per kind, found by the
event's name in :data:`HANDLERS`.

A handler reads the rows of its kinds (each with the contacts its address has at that row, and the lists it
reaches) and returns a :class:`Part`: the rows' results, the activities to add, the opt-outs for the rules to
decide (``vrules.decide_opt_outs``, over every handler's at once, as one subscription may meet several kinds),
and the other writes it asks for. Rows without a contact never reach a handler but the subscribe's (see
``setimport``): they are "no_contact" whatever their kind.

- opt-outs (unsubscribe, hard bounce, complaint, clean): an activity per contact; the opt-out on each list;
- soft bounces: counted (an activity each); the one that reaches the threshold cleans the address;
- email changes: decided before any handler runs, in file order (``contactmap``): here, their results;
- subscribes: the provider's clears its remembered opt-outs (``setimport``), and re-subscribes nobody; one for an
  address no contact holds is "no_contact", unless ``signups`` made its contact (``policy.create_contacts``);
- opens and clicks: an activity; updates: the contact's fields; ignore: nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from batchsync import rules, vrules
from batchsync.db.frames import TIME
from batchsync.formats.csvframe import cell
from batchsync.rules import OPT_OUT_KINDS

if TYPE_CHECKING:
    from batchsync.setimport import FileImport

ACTIVITY = {  # the activity an event leaves on a contact; the others: the event's own name
    "hard_bounce": "bounce",
}
RESULT = {"line": pl.Int64, "lists": pl.String, "label": pl.String, "detail": pl.String}
ACTIVITIES = {"line": pl.Int64, "rank": pl.Int64, "contact_id": pl.Int64, "kind": pl.String, "at": TIME}


@dataclass
class Part:
    """What a handler makes of its rows."""

    results: list[pl.DataFrame] = field(default_factory=list)  # RESULT
    activities: list[pl.DataFrame] = field(default_factory=list)  # ACTIVITIES and "detail"
    opt_outs: list[pl.DataFrame] = field(default_factory=list)  # the rows' opt-outs per contact (see opt_out_pairs)
    suppress: list[pl.DataFrame] = field(default_factory=list)  # line, email_key, email, reason, at
    fields: dict[int, dict[str, str]] = field(default_factory=dict)  # contact -> the fields an update sets

    def add(self, other: Part) -> None:
        self.results += other.results
        self.activities += other.activities
        self.opt_outs += other.opt_outs
        self.suppress += other.suppress
        self.fields.update(other.fields)


def per_contact(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per (row, contact), ``rank`` the contact's place among the row's (they are in id order)."""
    exploded = rows.explode("contacts").rename({"contacts": "contact_id"}).drop_nulls("contact_id")
    return exploded.with_columns(rank=pl.int_range(pl.len(), dtype=pl.Int64).over("line"))


def activities(rows: pl.DataFrame, detail: pl.Expr) -> pl.DataFrame:
    """An activity per contact of each row (``rows`` from :func:`per_contact`), the row's origin and place last."""
    kind = pl.col("kind").replace(ACTIVITY)
    return rows.select("line", "rank", "contact_id", kind.alias("kind"), "at", detail.alias("detail"))


def result(rows: pl.DataFrame, label: str | pl.Expr, detail: pl.Expr, lists: pl.Expr | None = None) -> pl.DataFrame:
    listed = (lists if lists is not None else pl.col("lists")).list.join(",")
    label_ = pl.lit(label) if isinstance(label, str) else label
    return rows.select("line", listed.alias("lists"), label_.alias("label"), detail.alias("detail"))


def opt_out_pairs(rows: pl.DataFrame, lists: pl.Expr) -> pl.DataFrame:
    """The opt-out of each (row, contact) on each of ``lists``: the rows for ``vrules.decide_opt_outs``, with
    their place (``line``, ``rank``, ``place``: the list's among the row's) and the row's shown lists."""
    pairs = rows.with_columns(list_code=lists, shown=lists.list.join(","), many=pl.col("contacts").list.len() > 1)
    pairs = per_contact(pairs).explode("list_code")
    pairs = pairs.with_columns(place=pl.int_range(pl.len(), dtype=pl.Int64).over("line", "rank"))
    columns = ("line", "rank", "place", "contact_id", "list_code", "email_key", "kind", "at", "reason", "shown")
    return pairs.select(*columns, "many")


def opt_outs(state: FileImport, rows: pl.DataFrame) -> Part:
    """An activity on each contact; the opt-out on each list the row reaches, for the rules to decide."""
    shown = pl.format("{}; lists {}", pl.col("reason"), pl.col("lists").list.join(","))
    return Part(activities=[activities(per_contact(rows), shown)], opt_outs=[opt_out_pairs(rows, pl.col("lists"))])


def soft_bounces(state: FileImport, rows: pl.DataFrame) -> Part:
    """Each contact's soft bounces counted on; a row that brings any of its contacts to the threshold cleans the
    address on every list (no activity of its own) and, by the policy, suppresses it."""
    threshold = state.profile.policy.soft_bounce_threshold
    each = per_contact(rows).join(state.soft_bounce_counts(rows), on="contact_id", how="left", maintain_order="left")
    each = each.with_columns(so_far=pl.col("count").fill_null(0) + pl.int_range(pl.len()).over("contact_id"))
    each = each.with_columns(cleans=vrules.soft_bounce_cleans(pl.col("so_far"), threshold))
    counted = activities(each, pl.format("soft bounce {} of {}", pl.col("so_far") + 1, pl.lit(threshold)))
    cleaning = each.group_by("line", maintain_order=True).agg(pl.col("cleans").any())
    rows = rows.join(cleaning, on="line", how="left", maintain_order="left").with_columns(
        pl.col("cleans").fill_null(False)
    )
    part = Part(activities=[counted])
    kept = rows.filter(~pl.col("cleans"))
    part.results.append(result(kept, "applied", pl.lit(f"soft bounce counted (cleaned at {threshold})")))
    cleans = rows.filter(pl.col("cleans"))
    cleans = cleans.with_columns(kind=pl.lit("clean"), reason=pl.lit(f"{threshold} soft bounces"))
    every = pl.lit(list(state.profile.lists), dtype=pl.List(pl.String))
    part.opt_outs.append(opt_out_pairs(cleans, every))
    if rules.suppresses("clean", state.profile.policy.hard_bounce_suppresses):  # noted as the soft bounces'
        part.suppress.append(cleans.select("line", "email_key", "email", pl.lit("soft_bounce").alias("reason"), "at"))
    return part


def email_changes(state: FileImport, rows: pl.DataFrame) -> Part:
    """The changes ``contactmap`` applied (the refused ones are rejected rows there)."""
    applied = rows.filter(~pl.col("line").is_in(list(state.changes.refused)))
    moved = activities(per_contact(applied), pl.format("{} -> {}", pl.col("email"), pl.col("new_email")))
    return Part(
        results=[result(applied, "applied", pl.format("email changed to {}", pl.col("new_email")))], activities=[moved]
    )


def subscribes(state: FileImport, rows: pl.DataFrame) -> Part:
    """Only the provider's own subscribe clears its remembered opt-outs (those older than the row)."""
    if not state.reported:
        unasked = pl.lit("only the provider's own subscribe clears its opt-outs")
        return Part(results=[result(rows, "unchanged", unasked)])
    rows = rows.join(state.cleared, on="line", how="left", maintain_order="left")
    rows = rows.with_columns(pl.col("cleared").fill_null(pl.lit([], dtype=pl.List(pl.String))))
    shown = pl.col("cleared").list.join(",")
    detail = pl.format("{}; lists {}", pl.col("reason"), pl.when(shown == "").then(pl.lit("none")).otherwise(shown))
    done = rows.filter(pl.col("cleared").list.len() > 0)
    said = pl.format("the provider's opt-out of {} cleared: it has the address subscribed again", shown)
    nothing = pl.lit("no older opt-out of the provider's to clear")
    left = rows.filter(pl.col("cleared").list.len() == 0)
    alone = pl.col("contacts").list.len() == 0  # a sign-up batchsync makes no contact for (policy.create_contacts)
    results = [
        result(done, "applied", said, pl.col("cleared")),
        result(left.filter(~alone), "unchanged", nothing),
        result(left.filter(alone), "no_contact", pl.lit("no CRM contact with this email")),
    ]
    return Part(results=results, activities=[activities(per_contact(rows), detail)])


def engagement(state: FileImport, rows: pl.DataFrame) -> Part:
    """Opens and clicks: an activity on each contact."""
    said = pl.format("{} recorded as an activity", pl.col("kind"))
    return Part(results=[result(rows, "applied", said)], activities=[activities(per_contact(rows), pl.col("reason"))])


def updates(state: FileImport, rows: pl.DataFrame) -> Part:
    """The row's ``in`` and ``both`` columns update each contact's fields (a contact in several rows: the last)."""
    mapped = {}
    for column in state.profile.export.columns:
        if column.direction in ("in", "both") and column.header in state.position:
            reverse = {provider: crm_value for crm_value, provider in column.values.items()}
            value = state.value(cell(state.position[column.header]))
            mapped[column.field] = value.replace(reverse) if reverse else value
    if not mapped:
        return Part(results=[result(rows, "unchanged", pl.lit("no field mapped as in or both"))])
    each = per_contact(rows).select("contact_id", **mapped)
    fields = {row.pop("contact_id"): row for row in each.iter_rows(named=True)}
    detail = pl.lit(f"fields updated: {', '.join(sorted(mapped))}")
    return Part(results=[result(rows, "applied", detail)], fields=fields)


def ignored(state: FileImport, rows: pl.DataFrame) -> Part:
    """Recorded as unchanged, with the reason the row gave."""
    return Part(results=[result(rows, "unchanged", pl.format("no action for {}", pl.col("reason")))])


Handler = Callable[["FileImport", pl.DataFrame], Part]
HANDLERS: dict[str, Handler] = {
    **dict.fromkeys(sorted(OPT_OUT_KINDS), opt_outs),
    "soft_bounce": soft_bounces,
    "email_change": email_changes,
    "subscribe": subscribes,
    "open": engagement,
    "click": engagement,
    "update": updates,
    "ignore": ignored,
}
