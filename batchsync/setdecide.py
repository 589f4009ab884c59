"""A batch's opt-outs decided at once: every handler's (the opt-out rows', the soft bounces that clean), on every
(contact, list) they reach, against the subscriptions as stored and what the file's earlier batches changed, by
``vrules.decide_opt_outs``. What comes of it: the statuses to write, the audit rows (with what a revert needs),
the rows' results, and the file's state carried on (``touched``, ``opted_out``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from batchsync import vrules
from batchsync.db import sets
from batchsync.db.frames import TIME
from batchsync.handlers import RESULT, Part

if TYPE_CHECKING:
    from batchsync.setimport import FileImport

STATUS: dict[str, Any] = {
    "contact_id": pl.Int64,
    "list_id": pl.Int64,
    "status": pl.String,
    "status_at": TIME,
    "source": pl.String,
    "reason": pl.String,
    "existing": pl.Boolean,
}
PLACE = ["line", "rank", "place"]  # the order the file makes its changes in


@dataclass
class Decisions:
    statuses: pl.DataFrame  # STATUS: the last change of each subscription; ``existing``: a stored row
    audits: pl.DataFrame  # PLACE and bs_changes columns
    results: pl.DataFrame  # RESULT, of the rows decided here


def decide(state: FileImport, part: Part) -> Decisions:
    if not part.opt_outs:
        return Decisions(pl.DataFrame(schema=STATUS), pl.DataFrame(), pl.DataFrame(schema=RESULT))
    pairs = pl.concat(part.opt_outs).sort(PLACE, maintain_order=True)
    pairs = pairs.with_columns(list_id=pl.col("list_code").replace_strict(state.list_ids, return_dtype=pl.Int64))
    stored = sets.subscriptions(state.connection, pairs.select("contact_id", "list_id"))
    touched = state.touched.with_columns(touched=pl.lit(True))
    pairs = pairs.join(stored, on=["contact_id", "list_id"], how="left", maintain_order="left")
    pairs = pairs.join(touched, on=["contact_id", "list_id"], how="left", maintain_order="left")
    pairs = pairs.with_columns(
        pl.col("touched").fill_null(False), consent_at=vrules.consent_given(pl.col("consent_by"), pl.col("consent_at"))
    )
    decided = vrules.decide_opt_outs(pairs, state.status_source)
    changed = decided.filter(pl.col("changed"))
    state.touched = pl.concat([state.touched, changed.select("contact_id", "list_id")]).unique()
    counted = decided.filter(pl.col("counted")).select("list_code", "email_key")
    state.opted_out = pl.concat([state.opted_out, counted]).unique(maintain_order=True)  # lists as first met
    return Decisions(_statuses(changed, state.status_source), _audits(state, changed), _results(decided))


def _statuses(changed: pl.DataFrame, source: str) -> pl.DataFrame:
    last = changed.unique(["contact_id", "list_id"], keep="last", maintain_order=True)
    return last.select(
        "contact_id",
        "list_id",
        pl.col("new_status").alias("status"),
        pl.col("at").alias("status_at"),
        pl.lit(source).alias("source"),
        "reason",
        pl.col("status").is_not_null().alias("existing"),
    ).sort("contact_id", "list_id")


def _audits(state: FileImport, changed: pl.DataFrame) -> pl.DataFrame:
    """A bs_changes row per change, with what a revert puts back (nothing where the file made the row)."""
    return changed.select(
        *PLACE,
        *audit_constants(state),
        "contact_id",
        "list_code",
        "old_status",
        "new_status",
        "rule",
        pl.col("line").alias("source_line"),
        pl.col("kind").alias("event"),
        "old_source",
        "old_reason",
        pl.col("reason").alias("new_reason"),
        "old_status_at",
        pl.col("at").alias("new_status_at"),
    )


def audit_constants(state: FileImport) -> list[pl.Expr]:
    """What every audit row of the file says: its run, file, origin, and the time it was applied."""
    return [
        pl.lit(state.run_id, dtype=pl.Int64).alias("run_id"),
        pl.lit(state.source).alias("source_file"),
        pl.lit(state.now, dtype=TIME).alias("at"),
        pl.lit(state.origin).alias("origin"),
        pl.lit(state.file_id, dtype=pl.Int64).alias("file_id"),
    ]


def _results(decided: pl.DataFrame) -> pl.DataFrame:
    """Per row: applied when it changed anything; the rule of each (contact,) list it reached."""
    who = pl.when(pl.col("many")).then(pl.format("contact {} ", pl.col("contact_id"))).otherwise(pl.lit(""))
    said = pl.format("{}{}: {}", who, pl.col("list_code"), pl.col("rule"))
    label = pl.when(pl.col("changed").any()).then(pl.lit("applied")).otherwise(pl.lit("unchanged"))
    grouped = decided.group_by("line", maintain_order=True).agg(
        pl.col("shown").first().alias("lists"), label.alias("label"), said.str.join("; ").alias("detail")
    )
    return grouped.select(*RESULT)
