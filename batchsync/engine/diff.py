"""The export of one list: CRM rows -> provider rows -> compared with the ledger's snapshot -> file and new snapshot.

The algorithm, for one list (``export_list``):

1. Take the list's CRM rows bucket by bucket from the export's scan (``engine.scan``: every table read once
   for all lists and dealt into ranges of the address key of about ``export.chunk_rows`` contacts, spilled to
   disk), each bucket in key order: memory holds one bucket, whatever the list's size.
2. Build each bucket's provider rows column at a time (``engine.build``): contacts sharing an address merged
   (an opt-out wins), suppressed addresses unsubscribed, invalid ones reported and skipped, cells rendered, and
   each row's fingerprint: a 64-bit hash of every cell but the status.
3. Take the ledger's rows with keys up to the bucket's last key (``db.snapshots.LedgerStream``: the current
   snapshot, with the notes of what the provider reported since folded in) and full-join them by key.
4. Decide per row (:func:`compare`, ``rules.py`` column at a time): what to send (a provider opt-out is never
   sent back as subscribed: pending with later consent where the format has it, else nothing); whether it
   changed (no ledger row, another fingerprint or another status); whether to write it (a full export writes
   every row, a diff the changed ones the provider does not know already); and a tombstone for an address the
   provider has from us as subscribed that is no longer on the list.
5. Write the rows to the file (``engine.csvout``) and the bucket's new ledger rows as a chunk of a new
   snapshot generation (``db.snapshots.SnapshotWriter``): changed rows as sent, the others as they were.

The new generation is made current after the provider's server confirms the upload (``export.Exporter``), in one
small commit: a crash before it sends the same rows again (at least once), never fewer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import polars as pl
from sqlalchemy import Connection

from batchsync import progress
from batchsync.config import Profile
from batchsync.db.snapshots import CHUNK_SCHEMA, LedgerStream, SnapshotWriter
from batchsync.engine.build import HASHER, Built, FrameBuilder, export_decision
from batchsync.engine.crmread import ListPlace
from batchsync.engine.csvout import ListFiles
from batchsync.engine.scan import CrmScan
from batchsync.engine.sqlitereader import ReadAhead
from batchsync.rules import LIVE, OPTED_OUT, TOMBSTONE

log = logging.getLogger(__name__)
Mode = Literal["full", "diff"]


@dataclass
class ListExport:
    """What one list's export wrote, and the ledger's count of addresses the provider has as subscribed."""

    files: ListFiles
    subscribed: int = 0
    snapshot: SnapshotWriter | None = None
    buckets: int = field(default=0)


def export_list(
    scan: CrmScan,
    connection: Connection,
    profile: Profile,
    place: ListPlace,
    mode: Mode,
    now: datetime,
    files: ListFiles,
    *,
    keep_snapshot: bool,
) -> ListExport:
    """Write the list's rows into ``files`` and, with ``keep_snapshot``, its new ledger generation (pending)."""
    builder = FrameBuilder(profile, place.code)
    stream = LedgerStream.open(connection, profile.name, place.code, HASHER)
    done = ListExport(files)
    if keep_snapshot:
        done.snapshot = SnapshotWriter.begin(connection, profile.name, place.code, HASHER, stream.notes_upto, now)
    seen = 0
    every_invalid = mode == "full" or builder.list.segment is not None

    def buckets() -> Iterator[tuple[int, str | None, Built]]:
        for crm_rows, last_key in scan.list_rows(place, segment=builder.list.segment is not None):
            yield len(crm_rows), last_key, builder.build(crm_rows, every_invalid=every_invalid)

    # The next bucket is joined and built by a thread of its own while this one is compared and written: polars
    # leaves the interpreter's lock while it works, so the two share the cores.
    ahead = ReadAhead(buckets(), 1)
    try:
        for count, last_key, built in ahead:
            known = stream.upto(last_key)
            done.subscribed += known.filter(pl.col("status").is_in(list(LIVE))).height
            written, snapshot = compare(built.rows, known, builder, mode, now)
            files.write(written)
            files.report_duplicates(built.duplicates)
            files.report_invalid(built.invalid)
            if done.snapshot is not None:
                done.snapshot.add(snapshot)
            seen += count
            done.buckets += 1
            progress.report(f"export {place.code}", seen)
    finally:
        ahead.stop()
    if done.snapshot is not None:
        done.snapshot.finish()
    log.debug("list %s: %d CRM rows in %d buckets", place.code, seen, done.buckets)
    return done


def compare(
    rows: pl.DataFrame, known: pl.DataFrame, builder: FrameBuilder, mode: Mode, now: datetime
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows to write (cells and flags, in key order) and the bucket's new ledger rows (CHUNK_SCHEMA)."""
    pending_supported = "pending" in builder.export.status_values and builder.tombstones
    ours = rows.with_columns(decided=export_decision(pending_supported), in_crm=pl.lit(True))
    theirs = known.rename({name: f"k_{name}" for name in CHUNK_SCHEMA if name != "email_key"})
    both = ours.join(theirs, on="email_key", how="full", coalesce=True).sort("email_key")
    flags = _flags(mode == "full", builder.tombstones)
    both = both.with_columns(**flags).with_columns(tombstone=pl.col("gone") & pl.col("live") & builder.tombstones)
    written = both.filter(pl.col("written") | pl.col("tombstone")).select(
        *_cells(builder),
        opted_out=pl.col("opted") | pl.col("tombstone"),
        takes_off=(pl.col("opted") & pl.col("live")) | pl.col("tombstone"),
        tombstone=pl.col("tombstone"),
    )
    return written, _snapshot(both, now)


def _flags(full: bool, tombstones: bool) -> dict[str, pl.Expr]:
    """The decisions of Exporter's rules for each joined row (rules.py, export_decision and the ledger's)."""
    in_crm = pl.col("in_crm").fill_null(False)
    known = pl.col("k_status").is_not_null()
    live = pl.col("k_status").is_in(list(LIVE)).fill_null(False)  # the provider has it from us as subscribed
    decided = pl.col("decided")
    sendable = in_crm & decided.is_not_null()
    differs = (pl.col("k_fingerprint") != pl.col("fingerprint")).fill_null(True)
    changed = sendable & (~known | differs | (pl.col("k_status") != decided).fill_null(True))
    opted = decided.is_in(list(OPTED_OUT)).fill_null(False)
    # An opt-out the provider itself reported, for an address it does not have from us as subscribed: no need
    # to send it back. Where it has it as subscribed, the opt-out goes out all the same.
    reported = pl.col("opt_out_at").is_not_null() | (~known & pl.col("from_provider").fill_null(False))
    known_to_provider = opted & ~live & reported
    written = sendable & (pl.lit(full) | (changed & ~known_to_provider))
    consent = (decided == "pending") & (pl.col("status") == "subscribed")
    origin = (
        pl.when(consent.fill_null(False))
        .then(pl.lit("consent"))
        .when(known & (pl.col("k_origin") == "provider") & opted)
        .then(pl.lit("provider"))
        .otherwise(pl.lit("export"))
    )
    gone = ~in_crm & known & (pl.col("k_status") != TOMBSTONE)
    return {
        "known": known,
        "live": live,
        "changed": changed,
        "opted": opted & in_crm,
        "written": written,
        "gone": gone,
        "origin_new": origin,
    }


def _cells(builder: FrameBuilder) -> list[pl.Expr]:
    """The written cells: the row's own, with the status to send; for a tombstone, only the address, the list
    and the unsubscribed status."""
    tomb = pl.col("tombstone")
    unsubscribed = builder.export.status_values.get("unsubscribed", "")
    cells = []
    for index, name in enumerate(builder.fields):
        own = builder.status_cell(pl.col("decided")) if index == builder.status_index else pl.col(f"c{index}")
        if name == "email":
            stone = pl.col("k_email")
        elif name == "list_id":
            stone = pl.lit(builder.list.id, pl.String)
        elif name == "status":
            stone = pl.lit(unsubscribed, pl.String)
        else:
            stone = pl.lit("", pl.String)
        cells.append(pl.when(tomb).then(stone).otherwise(own).alias(f"c{index}"))
    return cells


def _snapshot(both: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """The new ledger rows: a changed row as sent, a row gone from the list as a tombstone, the rest as it was."""
    changed, gone = pl.col("changed"), pl.col("gone")

    def pick(mine: pl.Expr, stone: pl.Expr, name: str) -> pl.Expr:
        return pl.when(changed).then(mine).when(gone).then(stone).otherwise(pl.col(f"k_{name}")).alias(name)

    moment = pl.lit(now).cast(pl.Datetime("us", "UTC"))
    return both.filter(changed | pl.col("known")).select(
        pl.col("email_key"),
        pick(pl.col("email").str.strip_chars(), pl.col("k_email"), "email"),
        pick(pl.col("contact_id"), pl.lit(None, pl.Int64), "contact_id"),
        pick(pl.col("fingerprint"), pl.lit(0, pl.Int64), "fingerprint"),
        pick(pl.col("decided"), pl.lit(TOMBSTONE), "status"),
        pick(pl.col("origin_new"), pl.lit("export"), "origin"),
        pick(moment, moment, "at"),
    )


__all__ = ["HASHER", "ListExport", "Mode", "compare", "export_list"]
