"""Every statement on the CRM tables. Mapping batchsync onto another CRM's own tables changes this module only.

Streams are ordered by ``email_key`` in code-point order on every backend (``COLLATE "C"`` on PostgreSQL), so
that the exporter can merge them with the ledger in Python.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Select,
    and_,
    case,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by

from batchsync.db import driver
from batchsync.db.digest import source_digest
from batchsync.db.schema import (
    activities,
    contacts,
    group_members,
    groups,
    lists,
    metadata,
    subscriptions,
    suppressions,
)
from batchsync.rules import OPTED_OUT, Status, Subscription

GROUP_SEP = "\x1f"


class ExportSource(NamedTuple):
    """One CRM contact on one list, as the exporter reads it (a tuple: millions are made per export)."""

    contact_id: int
    email: str
    email_key: str
    first_name: str | None
    last_name: str | None
    custom: Mapping[str, Any] | None
    status: Status
    source: str
    suppressed: bool
    group_codes: tuple[str, ...]
    digest: int | None = None  # of the row's inputs (db.digest), when the export asked for it


def ordered_key(column: ColumnElement[str], connection: Connection) -> ColumnElement[str]:
    """Order strings by code point, as Python compares them, whatever the database's locale."""
    return column.collate("C") if connection.dialect.name == "postgresql" else column


def list_ids(connection: Connection, codes: Iterable[str]) -> dict[str, int]:
    rows = connection.execute(select(lists.c.code, lists.c.id).where(lists.c.code.in_(list(codes))))
    return {code: list_id for code, list_id in rows}


def _group_codes(
    connection: Connection, list_id: int, by_contact: bool
) -> tuple[ColumnElement[Any], FromClause | None]:
    """A contact's group codes on the list, in code order (so that its digest is the same each time), and the
    derived table they come from, if any: the list's memberships aggregated once, or, when a few contacts are
    read (``by_contact``), each one's looked up (joined, the list's memberships were all aggregated or indexed
    for a few thousand contacts)."""
    on_list = and_(groups.c.id == group_members.c.group_id, groups.c.list_id == list_id)
    postgresql = connection.dialect.name == "postgresql"
    if by_contact and not postgresql:
        ordered = (
            select(groups.c.code)
            .join(group_members, on_list)
            .where(group_members.c.contact_id == contacts.c.id)
            .order_by(groups.c.code)
            .correlate(contacts)
            .subquery()
        )
        return select(func.group_concat(ordered.c.code, GROUP_SEP)).scalar_subquery(), None
    if postgresql:
        ordered_codes = func.string_agg(groups.c.code, aggregate_order_by(literal(GROUP_SEP), groups.c.code))
        codes_table: FromClause
        if by_contact:  # LATERAL: a scalar subquery would run twice a row, for the codes and for the digest
            one = select(contacts.c.id.label("contact_id"), ordered_codes.label("codes")).join(groups, on_list)
            mine = group_members.c.contact_id == contacts.c.id
            codes_table = one.where(mine).correlate(contacts).lateral()
        else:
            each = select(group_members.c.contact_id, ordered_codes.label("codes")).join(groups, on_list)
            codes_table = each.group_by(group_members.c.contact_id).subquery()
        return codes_table.c.codes, codes_table
    memberships = (  # SQLite's group_concat takes the rows in the order they are given
        select(group_members.c.contact_id, groups.c.code)
        .join(groups, on_list)
        .order_by(group_members.c.contact_id, groups.c.code)
        .subquery()
    )
    joined = func.group_concat(memberships.c.code, GROUP_SEP).label("codes")
    codes = select(memberships.c.contact_id, joined).group_by(memberships.c.contact_id).subquery()
    return codes.c.codes, codes


def stream_export_sources(
    connection: Connection,
    list_id: int,
    chunk: int,
    *,
    with_custom: bool = True,
    with_groups: bool = True,
    salt: str | None = None,
    only_keys: Select[Any] | None = None,
) -> Iterator[ExportSource]:
    """Live contacts on one list with their status, suppression and groups, by email_key then contact id.

    Custom fields and groups are read only when asked for: decoding JSON and joining the group table cost
    more than the rest of a row. With a ``salt``, each row carries its digest (see :func:`export_digests`);
    with ``only_keys``, only the contacts whose email_key that query returns are read.
    """
    columns, joined = _export_inputs(connection, list_id, with_custom, with_groups, by_contact=only_keys is not None)
    if salt is not None:
        columns.append(source_digest(salt, *columns))
    query = select(*columns).select_from(joined).where(contacts.c.deleted.is_(False))
    if only_keys is not None:
        query = query.where(contacts.c.email_key.in_(only_keys))
    query = query.order_by(ordered_key(contacts.c.email_key, connection), contacts.c.id)
    result = connection.execute(query.execution_options(stream_results=True, yield_per=chunk))
    for row in result:
        groups = tuple(sorted(row[9].split(GROUP_SEP))) if row[9] else ()
        yield _source(row, cast(Status, row[6]), row[7], groups, row[10] if salt is not None else None)


def export_digests(
    connection: Connection,
    list_id: int,
    salt: str,
    sendable: Sequence[str],
    *,
    with_custom: bool,
    with_groups: bool,
) -> Select[Any]:
    """(email_key, digest, contacts, sendable) for every address on one list: the sum of the digests of its
    contacts' rows (the same rows and digests :func:`stream_export_sources` reads with this salt), their number,
    and 1 when a contact's status, as exported, is one of ``sendable`` (a suppressed address goes out as
    unsubscribed: rules.export_status)."""
    columns, joined = _export_inputs(connection, list_id, with_custom, with_groups)
    status, suppressed = subscriptions.c.status, suppressions.c.email_key.is_not(None)
    # Plain comparisons, no IN: the statement is compiled once into PostgreSQL's CREATE TABLE AS.
    opted_in = and_(*(status != value for value in sorted(OPTED_OUT)))
    exported = case((and_(suppressed, opted_in), "unsubscribed"), else_=status)
    return (
        select(
            contacts.c.email_key,
            func.sum(source_digest(salt, *columns)).label("digest"),
            func.count().label("contacts"),
            func.max(case((or_(*(exported == value for value in sendable)), 1), else_=0)).label("sendable"),
        )
        .select_from(joined)
        .where(contacts.c.deleted.is_(False))
        .group_by(contacts.c.email_key)
    )


def _export_inputs(
    connection: Connection, list_id: int, with_custom: bool, with_groups: bool, by_contact: bool = False
) -> tuple[list[ColumnElement[Any]], FromClause]:
    """The columns an export row is made of (ExportSource's order) and the join they come from.

    ``by_contact``: a few contacts are read, found by email_key. SQLite would still walk the whole list's
    subscriptions (its planner has no statistics to weigh a temporary table of keys against them), so the list
    is compared as ``list_id + 0``, which no index serves: the contacts are found first, then their rows."""
    on_list = subscriptions.c.list_id == list_id
    if by_contact and connection.dialect.name == "sqlite":
        on_list = subscriptions.c.list_id + 0 == list_id
    codes, codes_table = _group_codes(connection, list_id, by_contact) if with_groups else (null(), None)
    columns: list[ColumnElement[Any]] = [
        contacts.c.id,
        contacts.c.email,
        contacts.c.email_key,
        contacts.c.first_name,
        contacts.c.last_name,
        contacts.c.custom if with_custom else null(),
        subscriptions.c.status,
        subscriptions.c.source,
        suppressions.c.email_key.is_not(None),
        codes,
    ]
    joined = contacts.join(subscriptions, and_(subscriptions.c.contact_id == contacts.c.id, on_list)).outerjoin(
        suppressions, suppressions.c.email_key == contacts.c.email_key
    )
    if codes_table is not None:
        joined = joined.outerjoin(codes_table, codes_table.c.contact_id == contacts.c.id)
    return columns, joined


def stream_segment_sources(
    connection: Connection, list_id: int, field: str, equals: str | None, chunk: int
) -> Iterator[ExportSource]:
    """Live contacts whose ``field`` equals ``equals`` (or is set, when None): a list defined by a filter.

    A contact with a subscription row on the list (an opt-out the provider reported, say) has that status;
    the others count as subscribed.
    """
    c, s = contacts.c, subscriptions.c
    query = (
        select(
            c.id,
            c.email,
            c.email_key,
            c.first_name,
            c.last_name,
            c.custom,
            s.status,
            s.source,
            suppressions.c.email_key.is_not(None),
        )
        .outerjoin(subscriptions, and_(s.contact_id == c.id, s.list_id == list_id))
        .outerjoin(suppressions, suppressions.c.email_key == c.email_key)
        .where(c.deleted.is_(False))
        .order_by(ordered_key(c.email_key, connection), c.id)
    )
    for row in connection.execute(query.execution_options(stream_results=True, yield_per=chunk)):
        status = cast(Status, row[6] or "subscribed")
        source = _source(row, status, row[7] or "segment", ())
        if _matches(source, field, equals):
            yield source


def _source(row: Any, status: Status, origin: str, groups: tuple[str, ...], digest: int | None = None) -> ExportSource:
    """An ExportSource from a row of (id, email, email_key, first, last, custom, status, source, suppressed)."""
    return ExportSource(row[0], row[1], row[2], row[3], row[4], row[5], status, origin, bool(row[8]), groups, digest)


def _matches(source: ExportSource, field: str, equals: str | None) -> bool:
    if field.startswith("custom."):
        value = (source.custom or {}).get(field.removeprefix("custom."))
    else:
        value = getattr(source, field, None)
    if isinstance(value, bool):
        value = "1" if value else ""
    text = "" if value is None else str(value).strip()
    return bool(text) if equals is None else text == equals


def contacts_by_email(connection: Connection, keys: Iterable[str]) -> dict[str, list[int]]:
    """Live contact ids for each email key (several when the CRM holds duplicates)."""
    found: dict[str, list[int]] = defaultdict(list)
    wanted = list(set(keys))
    if wanted:
        # No ORDER BY: with one, SQLite scans the whole table in id order instead of using the email_key index.
        condition, values = driver.one_of(connection, "email_key", wanted)
        statement = f"SELECT email_key, id FROM contacts WHERE {condition} AND NOT deleted"
        for key, contact_id in driver.query(connection, statement, values):
            found[key].append(contact_id)
        for ids in found.values():
            ids.sort()
    return found


class StoredSubscriptions:
    """The stored subscriptions of some contacts, turned into :class:`Subscription` only when asked for: an
    import reads every list of each contact it touches, but most rows are never weighed (an unsubscribe names
    one list; an opted-out row is decided by its status alone), and reading times costs more than the query."""

    def __init__(self, rows: Iterable[Sequence[Any]]) -> None:
        self._rows = {(row[0], row[1]): row for row in rows}

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def get(self, key: tuple[int, int]) -> Subscription | None:
        row = self._rows.get(key)
        if row is None:
            return None
        status_at = cast(datetime, driver.read_time(row[3]))  # status_at is NOT NULL
        return Subscription(cast(Status, row[2]), status_at, row[4], driver.read_time(row[5]), row[6])


def subscriptions_of(
    connection: Connection, contact_ids: Iterable[int], list_ids_: Iterable[int]
) -> StoredSubscriptions:
    ids, lists_ = list(set(contact_ids)), list(set(list_ids_))
    if not ids or not lists_:
        return StoredSubscriptions([])
    by_contact, contact_values = driver.one_of(connection, "contact_id", ids)
    by_list, list_values = driver.one_of(connection, "list_id", lists_)
    statement = (
        "SELECT contact_id, list_id, status, status_at, source, consent_at, consent_by FROM subscriptions "
        f"WHERE {by_contact} AND {by_list}"
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
    if existing:
        set_columns = ("status", "status_at", "source", "reason")
        driver.update_many(connection, "subscriptions", set_columns, ("contact_id", "list_id"), rows)
    else:
        columns = ("status", "status_at", "source", "reason", "contact_id", "list_id")
        driver.insert_many(connection, "subscriptions", columns, rows)


def suppress(connection: Connection, entries: Mapping[str, Mapping[str, Any]]) -> int:
    """Add addresses to the suppression list (email_key -> email, reason, at, source); keeps existing ones."""
    if not entries:
        return 0
    condition, values = driver.one_of(connection, "email_key", list(entries))
    statement = f"SELECT email_key FROM suppressions WHERE {condition}"
    known = {row[0] for row in driver.query(connection, statement, values)}
    new = [
        (key, e["email"], e["reason"], driver.stored_time(connection, e["at"]), e["source"])
        for key, e in entries.items()
        if key not in known
    ]
    driver.insert_many(connection, "suppressions", ("email_key", "email", "reason", "at", "source"), new)
    return len(new)


def add_activities(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    driver.insert_many(
        connection,
        "activities",
        ("contact_id", "kind", "at", "detail"),
        ((row["contact_id"], row["kind"], driver.stored_time(connection, row["at"]), row["detail"]) for row in rows),
    )


def insert_rows(connection: Connection, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bulk insert into a CRM table by name (the sample generator's door into the CRM)."""
    if rows:
        connection.execute(insert(metadata.tables[table]), [dict(row) for row in rows])


def count_contacts(connection: Connection) -> int:
    return int(connection.scalar(select(func.count()).select_from(contacts)) or 0)


def ensure_lists(connection: Connection, wanted: Mapping[str, tuple[str | None, Sequence[str]]]) -> int:
    """Create the lists (code -> name, group codes) and groups that are missing; returns how many were added."""
    added = 0
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
    query = select(groups.c.list_id, groups.c.id).where(groups.c.list_id.in_(list(list_ids_))).order_by(groups.c.id)
    for list_id, group_id in connection.execute(query):
        found[list_id].append(group_id)
    return found


def activity_counts(connection: Connection, contact_ids: Iterable[int], kind: str) -> dict[int, int]:
    ids = list(set(contact_ids))
    if not ids:
        return {}
    query = (
        select(activities.c.contact_id, func.count())
        .where(activities.c.contact_id.in_(ids), activities.c.kind == kind)
        .group_by(activities.c.contact_id)
    )
    return {contact_id: int(count) for contact_id, count in connection.execute(query)}


def change_email(connection: Connection, contact_id: int, email: str, key: str, now: datetime) -> None:
    connection.execute(
        update(contacts).where(contacts.c.id == contact_id).values(email=email, email_key=key, updated_at=now)
    )


def update_fields(connection: Connection, contact_id: int, fields: Mapping[str, str], now: datetime) -> None:
    """Set first_name, last_name and custom.<name> fields of a contact."""
    plain = {name: value for name, value in fields.items() if name in ("first_name", "last_name")}
    custom = {name.removeprefix("custom."): value for name, value in fields.items() if name.startswith("custom.")}
    if custom:
        stored = connection.scalar(select(contacts.c.custom).where(contacts.c.id == contact_id)) or {}
        plain["custom"] = {**stored, **custom}  # type: ignore[assignment]
    if plain:
        connection.execute(update(contacts).where(contacts.c.id == contact_id).values(**plain, updated_at=now))


def subscribed_counts(connection: Connection, list_ids_: Mapping[str, int]) -> dict[str, int]:
    """Subscribed (or pending) contacts per list code: the base of the safety stop's share."""
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
