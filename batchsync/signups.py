"""Sign-ups at the provider become CRM contacts, where the profile asks (``policy.create_contacts``).

A subscribe event the provider reports (its own file, its API's report, its callback) for an address no live
contact holds creates the contact, with the fields the file maps in (``direction = "in"`` or ``"both"``), and
its subscription to the row's list: subscribed, with the row's time (the provider's opt-in) as its consent,
given by the provider (``consent_by = "provider:<profile>"``). Each creation is audited (rule "signed up at the
provider") and its row reads "applied". An admin's file never creates contacts: a person adds them in the CRM.
Off (the default), such a row is "no_contact", as any row for an unknown address.

    created = create_signed_up(state, events, found)   # line, contact_id of each contact made
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import polars as pl

from batchsync.db import crm, ledger
from batchsync.db.mapping import crm_tables
from batchsync.formats.csvframe import cell

if TYPE_CHECKING:
    from batchsync.setimport import FileImport

log = logging.getLogger(__name__)
RULE = "signed up at the provider: contact created, its opt-in as consent"
CREATED = {"line": pl.Int64, "contact_id": pl.Int64}


def create_signed_up(state: FileImport, events: pl.DataFrame, found: pl.DataFrame) -> pl.DataFrame:
    """Create the contacts of the batch's sign-ups (see the module docstring); returns ``line`` and
    ``contact_id`` of each, the first row of an address making it."""
    if not (state.profile.policy.create_contacts and state.reported):
        return pl.DataFrame(schema=CREATED)
    signups = (
        events.filter((pl.col("kind") == "subscribe") & pl.col("list_code").is_not_null())
        .join(found.select("email_key").unique(), on="email_key", how="anti")
        .unique("email_key", keep="first", maintain_order=True)
    )
    made = [
        _create(state, row)
        for row in signups.select("line", "email", "email_key", "list_code", "at", *_fields(state)).iter_rows(
            named=True
        )
    ]
    if made:
        log.info("%s: %d contacts created for sign-ups at the provider", state.source, len(made))
    return pl.DataFrame(made, schema=CREATED, orient="row")


def _fields(state: FileImport) -> list[pl.Expr]:
    """The row's cells that map onto CRM fields, named by the field."""
    return [
        state.value(cell(state.position[column.header])).alias(column.field)
        for column in state.profile.export.columns
        if column.direction in ("in", "both") and column.header in state.position and column.field != "email"
    ]


def _create(state: FileImport, row: dict[str, Any]) -> tuple[int, int]:
    tables = crm_tables(state.connection)
    custom = {name.removeprefix("custom."): value for name, value in row.items() if name.startswith("custom.")}
    contact = {
        "email": row["email"],
        "email_key": row["email_key"],
        "first_name": row.get("first_name") or None,
        "last_name": row.get("last_name") or None,
        "custom": custom or None,
        "created_at": state.now,
        "updated_at": state.now,
        "deleted": False,
    }
    inserted = state.connection.execute(tables.contacts.insert().values(**contact)).inserted_primary_key
    assert inserted is not None
    contact_id = int(inserted[0])
    at, consent_by = row["at"] or state.now, f"provider:{state.profile.name}"
    crm.insert_rows(
        state.connection,
        "subscriptions",
        [
            {
                "contact_id": contact_id,
                "list_id": state.list_ids[row["list_code"]],
                "status": "subscribed",
                "status_at": at,
                "source": state.status_source,
                "reason": "signed up at the provider",
                "consent_by": consent_by,
                "consent_at": at,
            }
        ],
    )
    ledger.record_changes(
        state.connection,
        [
            {
                "run_id": state.run_id,
                "contact_id": contact_id,
                "list_code": row["list_code"],
                "old_status": None,
                "new_status": "subscribed",
                "rule": RULE,
                "source_file": state.source,
                "source_line": row["line"],
                "event": "subscribe",
                "origin": state.origin,
                "file_id": state.file_id,
                "at": state.now,
                "new_status_at": at,
            }
        ],
    )
    return int(row["line"]), contact_id
