"""Which contacts each row of a batch reaches, and the batch's email changes, decided in file order.

A row reaches the live contacts its address has at that row. Only email changes move contacts between addresses,
so every other row reaches what the CRM holds, read at once for the whole batch. The rows of addresses an email
change of the batch touches (its old one or its new one) are gone through in file order, as one by one: each
change moves its contacts to the new address unless another contact owns it (counting the changes before it in
the file: ``rules.email_change_conflict``), and a later row of either address sees the result::

    rows, changes = reach(events, found, emails)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from batchsync.rules import email_change_conflict

CONTACTS = pl.List(pl.Int64)


@dataclass
class EmailChanges:
    """A batch's email changes: the refused ones (line -> reason), and per contact changed: its row, place among
    the row's contacts, address before and after."""

    refused: dict[int, str] = field(default_factory=dict)
    applied: list[dict[str, Any]] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)  # (old key, new key, new address), in order

    def frame(self) -> pl.DataFrame:
        schema = {
            "line": pl.Int64,
            "rank": pl.Int64,
            "contact_id": pl.Int64,
            "old_email": pl.String,
            "new_email": pl.String,
            "new_key": pl.String,
            "email": pl.String,
        }
        return pl.DataFrame(self.applied, schema=schema)


def reach(
    events: pl.DataFrame, found: pl.DataFrame, emails: Callable[[list[int]], dict[int, str]]
) -> tuple[pl.DataFrame, EmailChanges]:
    """``events`` with ``contacts`` (the ids each row reaches, in id order), and the batch's email changes;
    ``found``: the CRM's contacts of the batch's keys (``email_key``, ``contact_id``, in id order); ``emails``:
    the addresses of some contacts as the CRM holds them."""
    owners = found.group_by("email_key", maintain_order=True).agg(pl.col("contact_id").alias("contacts"))
    rows = events.join(owners, on="email_key", how="left", maintain_order="left")
    rows = rows.with_columns(pl.col("contacts").fill_null(pl.lit([], dtype=CONTACTS)))
    changing = rows.filter(pl.col("kind") == "email_change")
    if changing.is_empty():
        return rows, EmailChanges()
    touched = set(changing["email_key"].to_list()) | set(changing["new_key"].drop_nulls().to_list())
    held = rows.filter(pl.col("email_key").is_in(list(touched)))
    mapping = {key: list(ids) for key, ids in owners.filter(pl.col("email_key").is_in(list(touched))).iter_rows()}
    addresses = emails(sorted({cid for ids in mapping.values() for cid in ids}))
    changes, reached = EmailChanges(), {}
    for row in held.select("line", "email_key", "kind", "email", "new_email", "new_key").iter_rows(named=True):
        reached[row["line"]] = mapping.get(row["email_key"], [])
        if row["kind"] == "email_change" and reached[row["line"]]:
            _change(row, mapping, addresses, changes)
    replay = pl.DataFrame(
        {"line": list(reached), "moved": list(reached.values())}, schema={"line": pl.Int64, "moved": CONTACTS}
    )
    rows = rows.join(replay, on="line", how="left", maintain_order="left")
    return rows.with_columns(pl.coalesce("moved", "contacts").alias("contacts")).drop("moved"), changes


def _change(
    row: dict[str, Any], mapping: dict[str, list[int]], addresses: dict[int, str], changes: EmailChanges
) -> None:
    """One email change, as the one-row-at-a-time import made it: refused when another contact owns the new address."""
    key, new_key, contacts = row["email_key"], row["new_key"], mapping[row["email_key"]]
    owner = email_change_conflict(contacts, mapping.get(new_key, []))
    if owner is not None:
        changes.refused[row["line"]] = f"the new address {row['new_email']} belongs to another contact ({owner})"
        return
    for rank, contact in enumerate(contacts):
        old, addresses[contact] = addresses.get(contact), row["new_email"]
        changes.applied.append(
            {
                "line": row["line"],
                "rank": rank,
                "contact_id": contact,
                "old_email": old,
                "new_email": row["new_email"],
                "new_key": new_key,
                "email": row["email"],
            }
        )
    if new_key != key:  # the next rows of the file see the address taken
        mapping[new_key] = sorted({*mapping.get(new_key, []), *contacts})
        del mapping[key]
    changes.renamed.append((key, new_key, row["new_email"]))
