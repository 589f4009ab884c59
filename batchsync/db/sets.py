"""The set-based import's statements, each for a whole batch of rows (``db.frames`` carries them): on the CRM
tables, a batch's contacts, subscriptions and soft-bounce counts read at once, and its statuses, activities,
suppressions and address changes written at once (each starting from ``crm_tables(connection)``, as every
statement on a CRM table does); on batchsync's own, the provider's remembered opt-outs of its addresses read and
written, and its audit rows. Only the import loads polars, so these live apart from ``crm``, ``optouts`` and
``trail``, which every command loads.

Keys to look up go to SQLite in a temporary table that the lookup joins (an IN list would outgrow SQLite's limit
on parameters) and to PostgreSQL as one array. On SQLite the joins are written as CROSS JOIN, which SQLite
takes as the order to join in: from the batch's few keys into the CRM's large tables by their indexes (without
statistics on the temporary table it scanned every subscription instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import polars as pl
from sqlalchemy import Connection

from batchsync.db import crm, driver, frames, optouts
from batchsync.db.frames import TIME
from batchsync.db.mapping import crm_tables

SUBSCRIPTION = {
    "contact_id": pl.Int64,
    "list_id": pl.Int64,
    "status": pl.String,
    "status_at": TIME,
    "source": pl.String,
    "stored_reason": pl.String,
    "consent_by": pl.String,
    "consent_at": TIME,
}


def _name(connection: Connection, table: str) -> str:
    return crm_tables(connection).sql_name(table, connection)


def contact_ids(connection: Connection, keys: frames.Among) -> pl.DataFrame:
    """The live contacts of each address key of ``keys`` (``email_key``): ``email_key``, ``contact_id`` (several
    where the CRM holds duplicates), by key and id."""
    contacts = keys.source(_name(connection, "contacts"), "c")
    statement = f"SELECT c.email_key, c.id FROM {contacts} WHERE {keys.where('c')} AND NOT c.deleted"
    found = frames.fetch(connection, statement, keys.values, {"email_key": pl.String, "contact_id": pl.Int64})
    return found.sort("email_key", "contact_id")


def subscriptions(connection: Connection, pairs: pl.DataFrame) -> pl.DataFrame:
    """The stored subscriptions of some (``contact_id``, ``list_id``) pairs, with their consent (SUBSCRIPTION);
    on PostgreSQL those of the contacts on every list (see ``frames.among``)."""
    wanted = frames.among(connection, "bs_import_pairs", pairs.unique())
    statement = (
        "SELECT s.contact_id, s.list_id, s.status, s.status_at, s.source, s.reason, s.consent_by, s.consent_at "
        f"FROM {wanted.source(_name(connection, 'subscriptions'), 's')} WHERE {wanted.where('s')}"
    )
    return frames.fetch(connection, statement, wanted.values, SUBSCRIPTION)


def activity_counts(connection: Connection, contacts: pl.Series, kind: str) -> pl.DataFrame:
    """How many activities of ``kind`` each contact has: ``contact_id``, ``count`` (none: no row)."""
    wanted = frames.among(connection, "bs_import_ids", contacts.unique().alias("contact_id").to_frame())
    activities = wanted.source(_name(connection, "activities"), "a")
    where = f"{wanted.where('a')} AND a.kind = ?"
    statement = f"SELECT a.contact_id, count(*) FROM {activities} WHERE {where} GROUP BY a.contact_id"
    return frames.fetch(connection, statement, [*wanted.values, kind], {"contact_id": pl.Int64, "count": pl.Int64})


def contact_emails(connection: Connection, contacts: pl.Series) -> dict[int, str]:
    """The addresses of some contacts, as entered."""
    wanted = frames.among(connection, "bs_import_id", contacts.unique().alias("id").to_frame())
    contacts_ = wanted.source(_name(connection, "contacts"), "c")
    statement = f"SELECT c.id, c.email FROM {contacts_} WHERE {wanted.where('c')}"
    found = frames.fetch(connection, statement, wanted.values, {"contact_id": pl.Int64, "email": pl.String})
    return dict(zip(found["contact_id"].to_list(), found["email"].to_list(), strict=True))


def set_statuses(connection: Connection, changes: pl.DataFrame, *, existing: bool) -> None:
    """Write subscription statuses (``contact_id``, ``list_id``, ``status``, ``status_at``, ``source``,
    ``reason``): ``existing`` rows updated, the others inserted."""
    subscriptions_ = _name(connection, "subscriptions")
    if existing:
        keys = ("contact_id", "list_id")
        frames.update(connection, subscriptions_, changes, keys, staging="bs_import_statuses")
    else:
        frames.insert(connection, subscriptions_, changes)


def add_activities(connection: Connection, rows: pl.DataFrame) -> None:
    """Activities (``contact_id``, ``kind``, ``at``, ``detail``), in the frame's order."""
    frames.insert(connection, _name(connection, "activities"), rows)


def suppress(connection: Connection, entries: pl.DataFrame) -> None:
    """Add the addresses not on the suppression list yet (``email_key``, ``email``, ``reason``, ``at``,
    ``source``); the ones there keep their entry."""
    if entries.is_empty():
        return
    frames.stage(connection, "bs_import_suppress", entries)
    suppressions = _name(connection, "suppressions")
    columns = ", ".join(entries.columns)
    connection.exec_driver_sql(
        f"INSERT INTO {suppressions} ({columns}) SELECT {columns} FROM bs_import_suppress AS n "
        f"WHERE NOT EXISTS (SELECT 1 FROM {suppressions} AS s WHERE s.email_key = n.email_key)"
    )


def change_emails(connection: Connection, changes: pl.DataFrame, now: datetime) -> None:
    """Contacts' addresses (``contact_id``, ``email``, ``email_key``); a contact twice: its last change stands."""
    updated = pl.lit(now, dtype=TIME).alias("updated_at")
    rows = changes.select(pl.col("contact_id").alias("id"), "email", "email_key", updated)
    frames.update(connection, _name(connection, "contacts"), rows, ("id",), staging="bs_import_contacts")


def update_fields(connection: Connection, fields: Mapping[int, Mapping[str, str]], now: datetime) -> None:
    """Contacts' first_name, last_name and custom.<name> fields (contact -> fields)."""
    for contact_id, values in fields.items():
        crm.update_fields(connection, contact_id, values, now)


def drop_staging(connection: Connection, names: Sequence[str] = ()) -> None:
    """Drop the temporary tables the import made, so a pooled connection does not keep their rows."""
    driver.drop_temporary(
        connection,
        "bs_import_keys",
        "bs_import_pairs",
        "bs_import_ids",
        "bs_import_id",
        "bs_import_suppress",
        "bs_import_statuses",
        "bs_import_contacts",
        "bs_import_optouts",
        *names,
    )


# --- batchsync's own tables -------------------------------------------------------


def stored_times(connection: Connection, profile: str, keys: frames.Among) -> pl.DataFrame:
    """The time of each opt-out the provider reported for the addresses of ``keys`` (``email_key``):
    ``list_code``, ``email_key``, ``stored_at``."""
    statement = (
        f"SELECT o.list_code, o.email_key, o.at FROM {keys.source('bs_provider_optouts', 'o')} "
        f"WHERE {keys.where('o')} AND o.profile = ?"
    )
    schema = {"list_code": pl.String, "email_key": pl.String, "stored_at": TIME}
    return frames.fetch(connection, statement, [*keys.values, profile], schema)


def latest(reported: pl.DataFrame, stored: pl.DataFrame) -> pl.DataFrame:
    """:meth:`optouts.ProviderOptOuts.remember` for every reported opt-out of a batch at once (``reported``:
    ``list_code``, ``email_key``, ``email``, ``kind``, ``at``, ``reason``, ``source``, in the file's order): per
    list and address, the latest report (the first of equal times) where it is later than the stored one, with
    ``stored`` (it replaces a row) or not (a new row)."""
    keys = ["list_code", "email_key"]
    first = reported.sort("at", descending=True, maintain_order=True).unique(keys, keep="first", maintain_order=True)
    joined = first.join(stored, on=keys, how="left")
    later = pl.col("stored_at").is_null() | (pl.col("at") > pl.col("stored_at"))
    return joined.filter(later).with_columns(stored=pl.col("stored_at").is_not_null()).drop("stored_at")


def save_latest(connection: Connection, profile: str, rows: pl.DataFrame, now: datetime) -> None:
    """Write what :func:`latest` found, as :meth:`optouts.ProviderOptOuts.save` writes its reports."""
    written = rows.with_columns(
        pl.col("reason").str.slice(0, 100),
        pl.col("source").str.slice(0, 600),
        recorded_at=pl.lit(now, dtype=TIME),
        profile=pl.lit(profile),
    )
    update = written.filter(pl.col("stored")).select(*optouts.OPT_OUT_COLUMNS)
    frames.update(
        connection, "bs_provider_optouts", update, ("profile", "list_code", "email_key"), staging="bs_import_optouts"
    )
    new = written.filter(~pl.col("stored")).sort("email_key", "list_code")  # the table's key order: appended
    frames.insert(connection, "bs_provider_optouts", new.select(*optouts.OPT_OUT_COLUMNS))


def record_changes(connection: Connection, frame: pl.DataFrame) -> None:
    """Audit rows of a batch (``ledger.CHANGE_COLUMNS`` and ``CHANGE_TIMES`` among the frame's columns), in the
    frame's order: their ids keep the order the file made the changes in, newest last, as a revert reads them."""
    frames.insert(connection, "bs_changes", frame)
