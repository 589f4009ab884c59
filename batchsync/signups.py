"""Sign-ups at the provider become CRM contacts, where the profile asks (``policy.create_contacts``).

A subscribe event the provider reports (its own file, its API's report, its callback) for an address no live
contact holds creates the contact, with the fields the file maps in (``direction = "in"`` or ``"both"``), and
its subscription to the row's list: subscribed, with the row's time (the provider's opt-in) as its consent,
given by the provider (``consent_by = "provider:<profile>"``). Each creation is audited (rule "signed up at the
provider") and its row reads "applied". An admin's file never creates contacts: a person adds them in the CRM.
Nor does a row without an opt-in time, or for an address a deleted contact held or the suppression list holds:
the CRM let those go. Off (the default), such a row is "no_contact", as any row for an unknown address. A revert
of the file does not remove the contacts it made.

    created = create_signed_up(state, events, found)   # line, contact_id of each contact made
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import polars as pl
from sqlalchemy import select, union

from batchsync.db import crm, ledger
from batchsync.db.mapping import crm_tables
from batchsync.formats.csvframe import cell

if TYPE_CHECKING:
    from batchsync.setimport import FileImport

log = logging.getLogger(__name__)
RULE = "signed up at the provider: contact created, its opt-in as consent"
REASON = "signed up at the provider"
CREATED = {"line": pl.Int64, "contact_id": pl.Int64}


def create_signed_up(state: FileImport, events: pl.DataFrame, found: pl.DataFrame) -> pl.DataFrame:
    """Create the contacts of the batch's sign-ups (see the module docstring); returns ``line`` and
    ``contact_id`` of each row that made a contact or a subscription of one it made."""
    if not (state.profile.policy.create_contacts and state.reported):
        return pl.DataFrame(schema=CREATED)
    signups = (
        events.filter((pl.col("kind") == "subscribe") & pl.col("list_code").is_not_null() & pl.col("at").is_not_null())
        .join(found.select("email_key").unique(), on="email_key", how="anti")
        .unique(["email_key", "list_code"], keep="first", maintain_order=True)
    )
    held = _held_elsewhere(state, signups["email_key"].unique().to_list())
    made: list[tuple[int, int]] = []
    contacts: dict[str, int] = {}
    for row in signups.select("line", "email", "email_key", "list_code", "at", *_fields(state)).iter_rows(named=True):
        if row["email_key"] in held:
            continue
        if row["email_key"] not in contacts:
            contacts[row["email_key"]] = _contact(state, row)
        made.append(_subscribe(state, row, contacts[row["email_key"]]))
    if made:
        log.info("%s: %d contacts created for sign-ups at the provider", state.source, len(contacts))
    return pl.DataFrame(made, schema=CREATED, orient="row")


def _held_elsewhere(state: FileImport, keys: list[str]) -> set[str]:
    """Addresses the CRM knows and keeps out: a deleted contact's (the CRM let it go: a sign-up does not bring it
    back) or a suppressed one."""
    if not keys:
        return set()
    tables = crm_tables(state.connection)
    contacts, suppressions = tables.contacts, tables.suppressions
    deleted = select(contacts.c.email_key).where(contacts.c.email_key.in_(keys))
    suppressed = select(suppressions.c.email_key).where(suppressions.c.email_key.in_(keys))
    return {str(key) for key in state.connection.scalars(union(deleted, suppressed))}


def _fields(state: FileImport) -> list[pl.Expr]:
    """The row's cells that map onto CRM fields, named by the field."""
    return [
        state.value(cell(state.position[column.header])).alias(column.field)
        for column in state.profile.export.columns
        if column.direction in ("in", "both") and column.header in state.position and column.field != "email"
    ]


def _contact(state: FileImport, row: dict[str, Any]) -> int:
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
    inserted = state.connection.execute(crm_tables(state.connection).contacts.insert().values(**contact))
    assert inserted.inserted_primary_key is not None
    return int(inserted.inserted_primary_key[0])


def _subscribe(state: FileImport, row: dict[str, Any], contact_id: int) -> tuple[int, int]:
    """The contact's subscription to the row's list, the provider's opt-in time as its consent; audited."""
    at, consent_by = row["at"], f"provider:{state.profile.name}"
    subscription = {
        "contact_id": contact_id,
        "list_id": state.list_ids[row["list_code"]],
        "status": "subscribed",
        "status_at": at,
        "source": state.status_source,
        "reason": REASON,
        "consent_by": consent_by,
        "consent_at": at,
    }
    crm.insert_rows(state.connection, "subscriptions", [subscription])
    audit = {
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
        "new_reason": REASON,
        "at": state.now,
        "new_status_at": at,
    }
    ledger.record_changes(state.connection, [audit])
    return int(row["line"]), contact_id
