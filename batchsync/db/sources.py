"""The CRM rows an export is made of, and their digests (see ``db.digest``).

Streams are ordered by ``email_key`` in code-point order on every backend, so that the exporter can merge them
with the ledger in Python. A diff first fills this session's ``bs_contact_digests`` once
(:func:`fill_contact_digests`), then asks each list's digests of it (:func:`export_digests`)::

    place = ListPlace(profile, code, list_id)
    fill_contact_digests(connection)
    digests = export_digests(connection, place, builder.salt, builder.sendable_statuses, with_groups=True)
    keys = ledger.changed_keys(connection, profile, code, digests)
    rows = stream_export_sources(connection, place, chunk, salt=builder.salt, only_keys=keys)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast, get_args

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    FromClause,
    Select,
    String,
    and_,
    case,
    column,
    func,
    literal,
    null,
    or_,
    select,
    table,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by

from batchsync.db import driver
from batchsync.db.crm import ordered_key
from batchsync.db.digest import joined, row_digest, text_digest, value_digest
from batchsync.db.mapping import CrmTables, crm_tables
from batchsync.db.schema import bs_provider_optouts
from batchsync.rules import OPTED_OUT, Status

GROUP_SEP = "\x1f"
SOURCES = ("crm", "provider", "admin")
OPT_OUTS = bs_provider_optouts
CONTACT_DIGESTS = table("bs_contact_digests", column("id"), column("email_key"), column("digest"), column("suppressed"))


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
    consent_at: datetime | None = None  # when the subscription's consent was given (None: no consent recorded)
    provider_opt_out: datetime | None = None  # the provider's remembered opt-out of the address on the list


def stream_export_sources(
    connection: Connection,
    place: ListPlace,
    chunk: int,
    *,
    with_custom: bool = True,
    with_groups: bool = True,
    salt: str | None = None,
    only_keys: Select[Any] | None = None,
) -> Iterator[ExportSource]:
    """Live contacts on one list with their status, suppression, groups, consent and the provider's remembered
    opt-out of their address, by email_key then contact id.

    Custom fields and groups are read only when asked for: decoding JSON and joining the group table cost
    more than the rest of a row. With a ``salt``, each row carries its digest (see :func:`export_digests`);
    with ``only_keys``, only the contacts whose email_key that query returns are read.
    """
    list_id, t = place.list_id, crm_tables(connection)
    by_contact = only_keys is not None
    on_list = t.subscriptions.c.list_id == list_id
    if by_contact and connection.dialect.name == "sqlite":
        # SQLite would walk the whole list (its planner cannot weigh a temporary table of keys against it):
        # ``list_id + 0`` is served by no index, so the contacts are found first, then their rows.
        on_list = t.subscriptions.c.list_id + 0 == list_id
    codes, groups_digest, groups_table = _groups(connection, t, list_id, by_contact) if with_groups else _NO_GROUPS
    suppressed = t.suppressions.c.email_key.is_not(None)
    c = t.contacts.c
    columns: list[ColumnElement[Any]] = [
        c.id,
        c.email,
        c.email_key,
        c.first_name,
        c.last_name,
        c.custom if with_custom else null(),
    ]
    columns += [t.subscriptions.c.status, t.subscriptions.c.source, suppressed, codes, *_consent_and_opt_out(t)]
    if salt is not None:
        columns.append(_row_digest(t, salt, contact_digest(t, suppressed), groups_digest))
    rows = _on_list(t, on_list, groups_table).outerjoin(OPT_OUTS, place.opted_out(c.email_key))
    query = select(*columns).select_from(rows).where(c.deleted.is_(False))
    if only_keys is not None:
        query = query.where(c.email_key.in_(only_keys))
    query = query.order_by(ordered_key(c.email_key, connection), c.id)
    for row in connection.execute(query.execution_options(stream_results=True, yield_per=chunk)):
        group_codes = tuple(sorted(row[9].split(GROUP_SEP))) if row[9] else ()
        digest = row[12] if salt is not None else None
        yield _source(row, cast(Status, row[6]), row[7], group_codes, digest, row[10], row[11])


@dataclass(frozen=True)
class ListPlace:
    """A list as one profile exports it: the CRM list's id, and the profile and code its provider opt-outs are
    remembered under."""

    profile: str
    code: str
    list_id: int

    def opted_out(self, email_key: ColumnElement[str]) -> ColumnElement[bool]:
        """The join condition of the provider's remembered opt-out of ``email_key`` on this list."""
        o = OPT_OUTS.c
        return and_(o.profile == self.profile, o.list_code == self.code, o.email_key == email_key)


def _consent_and_opt_out(t: CrmTables) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    """When consent was given (where the subscription names who gave it), and the provider's remembered opt-out of
    the address: both as stored, read into times only for the few rows with an opt-out (``_source``), as they
    matter only there (converting two times for every row cost a tenth of a full export)."""
    s = t.subscriptions.c
    consent = case((and_(s.consent_by.is_not(None), s.consent_by != ""), s.consent_at), else_=null())
    return type_coerce(consent, String), type_coerce(OPT_OUTS.c.at, String)


def _on_list(t: CrmTables, on_list: ColumnElement[bool], groups_table: FromClause | None) -> FromClause:
    """Contacts joined with their subscription (``on_list``), suppression and groups."""
    contacts, subscriptions, suppressions = t.contacts, t.subscriptions, t.suppressions
    rows = contacts.join(subscriptions, and_(subscriptions.c.contact_id == contacts.c.id, on_list))
    rows = rows.outerjoin(suppressions, suppressions.c.email_key == contacts.c.email_key)
    if groups_table is not None:
        rows = rows.outerjoin(groups_table, groups_table.c.contact_id == contacts.c.id)
    return rows


def contact_digest(t: CrmTables, suppressed: ColumnElement[bool]) -> ColumnElement[int]:
    """The digest of a contact's own columns (custom fields always: whether a list uses them is in its salt)
    and whether its address is ``suppressed``."""
    c = t.contacts.c
    return text_digest(joined(c.id, c.email, c.email_key, c.first_name, c.last_name, c.custom, suppressed))


def _row_digest(
    t: CrmTables, salt: str, contact: ColumnElement[int], groups_digest: ColumnElement[Any]
) -> ColumnElement[int]:
    status = value_digest("status", t.subscriptions.c.status, get_args(Status))
    source = value_digest("source", t.subscriptions.c.source, SOURCES)
    return row_digest(salt, contact, status, source, func.coalesce(groups_digest, 0), _opt_out_digest(t))


def _opt_out_digest(t: CrmTables) -> ColumnElement[int]:
    """Where the provider's opt-out of the address is remembered: its time and the row's consent, which decide
    what may be sent (rules.export_decision); 0 elsewhere, so most rows cost no hash for it."""
    s = t.subscriptions.c
    consent = text_digest(joined(OPT_OUTS.c.at, s.consent_at, s.consent_by))
    return case((OPT_OUTS.c.at.is_not(None), consent), else_=literal(0, BigInteger))


_NO_GROUPS: tuple[ColumnElement[Any], ColumnElement[Any], None] = (null(), literal(0), None)


def _groups(
    connection: Connection, t: CrmTables, list_id: int, by_contact: bool, with_codes: bool = True
) -> tuple[ColumnElement[Any], ColumnElement[Any], FromClause | None]:
    """A contact's group codes on the list (in code order), the sum of their digests, and the derived table
    they come from, if any: the list's memberships aggregated once, or, when a few contacts are read
    (``by_contact``), each one's looked up (the whole list's were aggregated or indexed for a few thousand)."""
    contacts, groups, group_members = t.contacts, t.groups, t.group_members
    mine = group_members.c.contact_id == contacts.c.id
    if by_contact and connection.dialect.name == "sqlite":
        each = select(groups.c.code, text_digest(_group_text(t)).label("digest")).join(group_members, _on(t, list_id))
        each = each.where(mine).correlate(contacts)
        ordered = each.order_by(groups.c.code).subquery()  # group_concat takes the rows in the order given
        codes = select(func.group_concat(ordered.c.code, GROUP_SEP)).scalar_subquery()
        return codes, select(_sum(ordered.c.digest)).scalar_subquery(), None
    if by_contact:  # LATERAL: a scalar subquery would run twice a row, for the codes and for the digest
        one = select(contacts.c.id.label("contact_id"), _ordered_codes(connection, groups.c.code).label("codes"))
        one = one.add_columns(_sum(text_digest(_group_text(t))).label("digest"))
        looked_up = one.join(groups, _on(t, list_id)).where(mine).correlate(contacts).lateral()
        return looked_up.c.codes, looked_up.c.digest, looked_up
    # Each group's digest once (a CTE, MATERIALIZED so that SQLite does not hash again per membership).
    digests = select(groups.c.id, groups.c.code, text_digest(_group_text(t)).label("digest"))
    group_digests = digests.where(groups.c.list_id == list_id).cte("bs_group_digests").prefix_with("MATERIALIZED")
    memberships = select(group_members.c.contact_id, group_digests.c.code, group_digests.c.digest)
    memberships = memberships.join(group_digests, group_digests.c.id == group_members.c.group_id)
    if with_codes and connection.dialect.name == "sqlite":
        memberships = memberships.order_by(group_members.c.contact_id, group_digests.c.code)
    listed = memberships.subquery()
    aggregated = [listed.c.contact_id, _sum(listed.c.digest).label("digest")]
    if with_codes:
        aggregated.append(_ordered_codes(connection, listed.c.code).label("codes"))
    per_contact = select(*aggregated).group_by(listed.c.contact_id).subquery()
    return (per_contact.c.codes if with_codes else null()), per_contact.c.digest, per_contact


def _sum(digests: ColumnElement[int]) -> ColumnElement[int]:
    """A contact's few group digests added up, as an integer (PostgreSQL sums bigints into numeric)."""
    return func.sum(digests).cast(BigInteger)


def _on(t: CrmTables, list_id: int) -> ColumnElement[bool]:
    return and_(t.groups.c.id == t.group_members.c.group_id, t.groups.c.list_id == list_id)


def _group_text(t: CrmTables) -> ColumnElement[str]:
    return literal("group" + GROUP_SEP) + t.groups.c.code


def _ordered_codes(connection: Connection, code: ColumnElement[str]) -> ColumnElement[str]:
    if connection.dialect.name == "postgresql":
        return func.string_agg(code, aggregate_order_by(literal(GROUP_SEP), code))
    return func.group_concat(code, GROUP_SEP)  # in the order of the rows it is given


def fill_contact_digests(connection: Connection) -> None:
    """This session's temporary table ``bs_contact_digests``: each live contact's id, email_key, digest and
    whether its address is suppressed. A diff fills it once, then each list joins it: the contact's columns
    are joined into a text and hashed once per run instead of once per list."""
    t = crm_tables(connection)
    contacts, suppressions = t.contacts, t.suppressions
    suppressed = suppressions.c.email_key.is_not(None)
    live = (
        select(
            contacts.c.id,
            contacts.c.email_key,
            contact_digest(t, suppressed).label("digest"),
            case((suppressed, 1), else_=0).label("suppressed"),
        )
        .outerjoin(suppressions, suppressions.c.email_key == contacts.c.email_key)
        .where(contacts.c.deleted.is_(False))
    )
    columns = "id INTEGER PRIMARY KEY, email_key VARCHAR(320), digest INTEGER, suppressed INTEGER"
    driver.temporary_table_as(connection, "bs_contact_digests", live, columns, rowid=True)


def export_digests(
    connection: Connection, place: ListPlace, salt: str, sendable: Sequence[str], *, with_groups: bool
) -> Select[Any]:
    """(email_key, digest, sendable) for every contact on one list: the digest of its row (the digest
    :func:`stream_export_sources` reads with this salt) and 1 when its status, as exported, is one of
    ``sendable`` (a suppressed address goes out as unsubscribed: rules.export_status). An address's digest in
    the ledger is the sum of its contacts' (``ledger.changed_keys`` adds them up, or not: see there). Reads
    ``bs_contact_digests``: see :func:`fill_contact_digests`."""
    known, list_id, t = CONTACT_DIGESTS.c, place.list_id, crm_tables(connection)
    subscriptions = t.subscriptions
    group_parts = _groups(connection, t, list_id, False, with_codes=False) if with_groups else _NO_GROUPS
    _, groups_digest, groups_table = group_parts
    status = subscriptions.c.status
    # Plain comparisons, no IN: the statement is compiled once into PostgreSQL's CREATE TABLE AS.
    opted_in = and_(*(status != value for value in sorted(OPTED_OUT)))
    exported = case((and_(known.suppressed == 1, opted_in), "unsubscribed"), else_=status)
    on_list = and_(subscriptions.c.contact_id == known.id, subscriptions.c.list_id == list_id)
    rows = CONTACT_DIGESTS.join(subscriptions, on_list).outerjoin(OPT_OUTS, place.opted_out(known.email_key))
    if groups_table is not None:
        rows = rows.outerjoin(groups_table, groups_table.c.contact_id == known.id)
    sendable_status = case((or_(*(exported == value for value in sendable)), 1), else_=0)
    digest = _row_digest(t, salt, known.digest, groups_digest)
    return select(known.email_key, digest.label("digest"), sendable_status.label("sendable")).select_from(rows)


def stream_segment_sources(
    connection: Connection, place: ListPlace, field: str, equals: str | None, chunk: int
) -> Iterator[ExportSource]:
    """Live contacts whose ``field`` equals ``equals`` (or is set, when None): a list defined by a filter.

    A contact with a subscription row on the list (an opt-out the provider reported, say) has that status;
    the others count as subscribed.
    """
    t = crm_tables(connection)
    c, s = t.contacts.c, t.subscriptions.c
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
            t.suppressions.c.email_key.is_not(None),
            *_consent_and_opt_out(t),
        )
        .outerjoin(t.subscriptions, and_(s.contact_id == c.id, s.list_id == place.list_id))
        .outerjoin(t.suppressions, t.suppressions.c.email_key == c.email_key)
        .outerjoin(OPT_OUTS, place.opted_out(c.email_key))
        .where(c.deleted.is_(False))
        .order_by(ordered_key(c.email_key, connection), c.id)
    )
    for row in connection.execute(query.execution_options(stream_results=True, yield_per=chunk)):
        status = cast(Status, row[6] or "subscribed")
        source = _source(row, status, row[7] or "segment", (), None, row[9], row[10])
        if _matches(source, field, equals):
            yield source


def _source(
    row: Any,
    status: Status,
    origin: str,
    groups: tuple[str, ...],
    digest: int | None,
    consent_at: Any,
    opted_out_at: Any,
) -> ExportSource:
    """An ExportSource from a row of (id, email, email_key, first, last, custom, status, source, suppressed)."""
    consent, opted_out = None, None
    if opted_out_at is not None:  # stored text on SQLite, a naive datetime on PostgreSQL
        consent, opted_out = driver.read_time(consent_at), driver.read_time(opted_out_at)
    return ExportSource(
        row[0], row[1], row[2], row[3], row[4], row[5], status, origin, bool(row[8]), groups, digest, consent, opted_out
    )


def _matches(source: ExportSource, field: str, equals: str | None) -> bool:
    if field.startswith("custom."):
        value = (source.custom or {}).get(field.removeprefix("custom."))
    else:
        value = getattr(source, field, None)
    if isinstance(value, bool):
        value = "1" if value else ""
    text = "" if value is None else str(value).strip()
    return bool(text) if equals is None else text == equals
