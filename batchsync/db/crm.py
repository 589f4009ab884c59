"""Every statement on the CRM tables but the export's reads (``engine.crmread``).

Each one starts from ``crm_tables(connection)`` (``db.mapping``): the canonical tables, or the relations the
profile maps them onto; raw SQL takes the relation's quoted name from it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    func,
    insert,
    select,
    update,
)

from batchsync.db import driver
from batchsync.db.mapping import crm_tables
from batchsync.rules import Status, Subscription


def ordered_key(column: ColumnElement[str], connection: Connection) -> ColumnElement[str]:
    """Order strings by code point, as Python compares them, whatever the database's locale."""
    return column.collate("C") if connection.dialect.name == "postgresql" else column


def list_ids(connection: Connection, codes: Iterable[str]) -> dict[str, int]:
    lists = crm_tables(connection).lists
    rows = connection.execute(select(lists.c.code, lists.c.id).where(lists.c.code.in_(list(codes))))
    return {code: list_id for code, list_id in rows}


def contacts_by_email(connection: Connection, keys: Iterable[str]) -> dict[str, list[int]]:
    """Live contact ids for each email key (several when the CRM holds duplicates)."""
    found: dict[str, list[int]] = defaultdict(list)
    wanted = list(set(keys))
    if wanted:
        # No ORDER BY: with one, SQLite scans the whole table in id order instead of using the email_key index.
        condition, values = driver.one_of(connection, "email_key", wanted)
        contacts = crm_tables(connection).sql_name("contacts", connection)
        statement = f"SELECT email_key, id FROM {contacts} WHERE {condition} AND NOT deleted"
        for key, contact_id in driver.query(connection, statement, values):
            found[key].append(contact_id)
        for ids in found.values():
            ids.sort()
    return found


class StoredSubscriptions:
    """The stored subscriptions of some contacts, turned into :class:`Subscription` only when asked for (a revert
    reads every list of each contact its file touched; the import reads a batch's at once, ``db.sets``)."""

    def __init__(self, rows: Iterable[Sequence[Any]]) -> None:
        self._rows = {(row[0], row[1]): row for row in rows}

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def get(self, key: tuple[int, int]) -> Subscription | None:
        row = self._rows.get(key)
        if row is None:
            return None
        status_at = cast(datetime, driver.read_time(row[3]))  # status_at is NOT NULL
        return Subscription(cast(Status, row[2]), status_at, row[4], driver.read_time(row[5]), row[6], row[7])


def subscriptions_of(
    connection: Connection, contact_ids: Iterable[int], list_ids_: Iterable[int]
) -> StoredSubscriptions:
    ids, lists_ = list(set(contact_ids)), list(set(list_ids_))
    if not ids or not lists_:
        return StoredSubscriptions([])
    by_contact, contact_values = driver.one_of(connection, "contact_id", ids)
    by_list, list_values = driver.one_of(connection, "list_id", lists_)
    subscriptions = crm_tables(connection).sql_name("subscriptions", connection)
    statement = (
        "SELECT contact_id, list_id, status, status_at, source, consent_at, consent_by, reason "
        f"FROM {subscriptions} WHERE {by_contact} AND {by_list}"
    )
    return StoredSubscriptions(driver.query(connection, statement, [*contact_values, *list_values]))


def set_statuses(connection: Connection, changes: Sequence[Mapping[str, Any]], *, existing: bool) -> None:
    """Write subscription statuses: ``existing`` rows are updated, the others inserted.

    Each change holds contact_id, list_id, status, status_at, source and reason.
    """
    rows = [
        (
            c["status"],
            driver.stored_time(connection, c["status_at"]),
            c["source"],
            c["reason"],
            c["contact_id"],
            c["list_id"],
        )
        for c in changes
    ]
    subscriptions = crm_tables(connection).sql_name("subscriptions", connection)
    if existing:
        set_columns = ("status", "status_at", "source", "reason")
        keys = ("contact_id", "list_id")
        driver.update_many(connection, subscriptions, set_columns, keys, rows, staging="bs_update_subscriptions")
    else:
        columns = ("status", "status_at", "source", "reason", "contact_id", "list_id")
        driver.insert_many(connection, subscriptions, columns, rows)


def add_activities(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    driver.insert_many(
        connection,
        crm_tables(connection).sql_name("activities", connection),
        ("contact_id", "kind", "at", "detail"),
        ((row["contact_id"], row["kind"], driver.stored_time(connection, row["at"]), row["detail"]) for row in rows),
    )


def insert_rows(connection: Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bulk insert into a CRM table by its canonical name (the sample generator's door into the CRM)."""
    if rows:
        connection.execute(insert(crm_tables(connection).table(table)), [dict(row) for row in rows])


def count_contacts(connection: Connection) -> int:
    return int(connection.scalar(select(func.count()).select_from(crm_tables(connection).contacts)) or 0)


def ensure_lists(connection: Connection, wanted: Mapping[str, tuple[str | None, Sequence[str]]]) -> int:
    """Create the lists (code -> name, group codes) and groups that are missing; returns how many were added."""
    added = 0
    crm = crm_tables(connection)
    lists, groups = crm.lists, crm.groups
    known = list_ids(connection, wanted)
    for code, (name, group_codes) in wanted.items():
        if code not in known:
            result = connection.execute(insert(lists).values(code=code, name=name or code))
            known[code] = int(result.inserted_primary_key[0])  # type: ignore[index]
            added += 1
        present = set(connection.scalars(select(groups.c.code).where(groups.c.list_id == known[code])))
        for group_code in group_codes:
            if group_code not in present:
                connection.execute(insert(groups).values(list_id=known[code], code=group_code, name=group_code))
                added += 1
    return added


def group_ids(connection: Connection, list_ids_: Iterable[int]) -> dict[int, list[int]]:
    found: dict[int, list[int]] = defaultdict(list)
    groups = crm_tables(connection).groups
    query = select(groups.c.list_id, groups.c.id).where(groups.c.list_id.in_(list(list_ids_))).order_by(groups.c.id)
    for list_id, group_id in connection.execute(query):
        found[list_id].append(group_id)
    return found


def change_email(connection: Connection, contact_id: int, email: str, key: str, now: datetime) -> None:
    contacts = crm_tables(connection).contacts
    connection.execute(
        update(contacts).where(contacts.c.id == contact_id).values(email=email, email_key=key, updated_at=now)
    )


def contacts_of(connection: Connection, contact_ids: Iterable[int]) -> dict[int, tuple[str, str, bool]]:
    """Some contacts' address as entered, its key, and whether the contact is deleted."""
    ids = list(set(contact_ids))
    if not ids:
        return {}
    c = crm_tables(connection).contacts.c
    query = select(c.id, c.email, c.email_key, c.deleted).where(c.id.in_(ids))
    return {row[0]: (row[1], row[2], bool(row[3])) for row in connection.execute(query)}


def contacts_with_key(connection: Connection, key: str) -> list[int]:
    """Every contact whose address has this key, deleted ones too (a history reads them all)."""
    contacts = crm_tables(connection).contacts
    return list(connection.scalars(select(contacts.c.id).where(contacts.c.email_key == key).order_by(contacts.c.id)))


def suppressed_keys(connection: Connection, keys: Iterable[str]) -> set[str]:
    wanted = list(set(keys))
    if not wanted:
        return set()
    suppressions = crm_tables(connection).suppressions
    return set(connection.scalars(select(suppressions.c.email_key).where(suppressions.c.email_key.in_(wanted))))


def delete_subscriptions(connection: Connection, keys: Iterable[tuple[int, int]]) -> None:
    """Remove subscription rows by (contact_id, list_id)."""
    rows = [(contact_id, list_id) for contact_id, list_id in keys]
    subscriptions = crm_tables(connection).sql_name("subscriptions", connection)
    driver.execute_many(connection, f"DELETE FROM {subscriptions} WHERE contact_id = ? AND list_id = ?", rows)


def activities_of(connection: Connection, contact_ids: Iterable[int]) -> list[dict[str, Any]]:
    ids = sorted(set(contact_ids))
    if not ids:
        return []
    activities = crm_tables(connection).activities
    query = select(activities).where(activities.c.contact_id.in_(ids)).order_by(activities.c.at, activities.c.id)
    return [dict(row._mapping) for row in connection.execute(query)]


def email_change_activities(connection: Connection) -> list[tuple[int, str]]:
    """(contact, detail) of every email change recorded as an activity ("OLD -> NEW; origin file:line")."""
    activities = crm_tables(connection).activities
    query = select(activities.c.contact_id, activities.c.detail).where(activities.c.kind == "email_change")
    return [(row[0], row[1] or "") for row in connection.execute(query)]


def update_fields(connection: Connection, contact_id: int, fields: Mapping[str, str], now: datetime) -> None:
    """Set first_name, last_name and custom.<name> fields of a contact."""
    plain = {name: value for name, value in fields.items() if name in ("first_name", "last_name")}
    custom = {name.removeprefix("custom."): value for name, value in fields.items() if name.startswith("custom.")}
    contacts = crm_tables(connection).contacts
    if custom:
        stored = connection.scalar(select(contacts.c.custom).where(contacts.c.id == contact_id)) or {}
        plain["custom"] = {**stored, **custom}  # type: ignore[assignment]
    if plain:
        connection.execute(update(contacts).where(contacts.c.id == contact_id).values(**plain, updated_at=now))


def subscribed_counts(connection: Connection, list_ids_: Mapping[str, int]) -> dict[str, int]:
    """Subscribed (or pending) contacts per list code: the base of the safety stop's share."""
    subscriptions = crm_tables(connection).subscriptions
    query = (
        select(subscriptions.c.list_id, func.count())
        .where(
            subscriptions.c.list_id.in_(list(list_ids_.values())),
            subscriptions.c.status.in_(("subscribed", "pending")),
        )
        .group_by(subscriptions.c.list_id)
    )
    by_id = {list_id: int(count) for list_id, count in connection.execute(query)}
    return {code: by_id.get(list_id, 0) for code, list_id in list_ids_.items()}
