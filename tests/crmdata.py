"""A small, hand-made CRM whose every row a test can name, and helpers to change it as a CRM user would.

The helpers reach the CRM tables through the engine's mapping (``crm_tables``), as batchsync does: on a CRM of
one's own (conftest's mapped-postgresql) they read and write its views."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from batchsync.db import crm
from batchsync.db.mapping import crm_tables
from batchsync.db.schema import bs_changes
from batchsync.rules import email_key

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NEWSLETTER_FLAG = {1, 2, 4, 5, 7, 8, 11}  # custom.newsletter = "1": the Flexmail segment
RESUBSCRIBED = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)

# id, email, first, last, {list: status}, groups
PEOPLE: list[tuple[int, str, str, str, dict[str, str], list[str]]] = [
    (1, "alice@example.com", "Alice", "Ädler", {"newsletter": "subscribed", "offers": "subscribed"}, []),
    (2, "bob@example.com", "Bob", "Brown", {"newsletter": "subscribed"}, []),
    (3, "carol@example.com", "Carol", "Çelik", {"newsletter": "unsubscribed"}, []),
    (4, "dave@example.com", "Dave", "Davies", {"newsletter": "subscribed", "offers": "subscribed"}, ["vip"]),
    (5, " Eve@Example.com ", "Eve", "One", {"newsletter": "subscribed"}, []),
    (6, "eve@example.com", "Eve", "Two", {"newsletter": "unsubscribed"}, []),
    (7, "not-an-email", "Nobody", "Invalid", {"newsletter": "subscribed"}, []),
    (8, "frank@example.com", "Frank", "Suppressed", {"newsletter": "subscribed"}, []),
    (9, "grace@example.com", "Grace", "Pending", {"newsletter": "subscribed", "events": "pending"}, []),
    (10, "heidi@example.com", "Heidi", "Leaving", {"newsletter": "subscribed"}, []),
    (11, "ivan@example.com", "Иван", "Петров", {"newsletter": "subscribed", "offers": "subscribed"}, []),
    (12, "judy@example.com", "Judy", "Again", {"newsletter": "subscribed"}, []),
]


def build_tiny_crm(engine: Engine) -> None:
    with engine.begin() as connection:
        # the lists and the group this CRM uses, whatever the profile maps
        crm.ensure_lists(connection, {"newsletter": (None, ["vip"]), "offers": (None, []), "events": (None, [])})
        ids = crm.list_ids(connection, ["newsletter", "offers", "events"])
        groups = crm_tables(connection).groups
        group_ids = {code: gid for gid, code in connection.execute(select(groups.c.id, groups.c.code))}
        rows: dict[str, list[dict[str, Any]]] = {"contacts": [], "subscriptions": [], "group_members": []}
        for cid, email, first, last, statuses, member_of in PEOPLE:
            rows["contacts"].append(
                {
                    "id": cid,
                    "email": email,
                    "email_key": email_key(email),
                    "first_name": first,
                    "last_name": last,
                    "custom": {"newsletter": "1" if cid in NEWSLETTER_FLAG else "0"},
                    "created_at": T0,
                    "updated_at": T0,
                    "deleted": False,
                }
            )
            for code, status in statuses.items():
                at = RESUBSCRIBED if cid == 12 else T0
                rows["subscriptions"].append(
                    {
                        "contact_id": cid,
                        "list_id": ids[code],
                        "status": status,
                        "status_at": at,
                        "source": "crm",
                        "reason": None,
                        "consent_by": "web-form",
                        "consent_at": at,
                    }
                )
            rows["group_members"] += [{"contact_id": cid, "group_id": group_ids[g]} for g in member_of]
        for table, values in rows.items():
            crm.insert_rows(connection, table, values)
        crm.insert_rows(
            connection,
            "suppressions",
            [
                {
                    "email_key": "frank@example.com",
                    "email": "frank@example.com",
                    "reason": "hard_bounce",
                    "at": T0,
                    "source": "crm",
                }
            ],
        )


def set_status(
    engine: Engine, contact_id: int, code: str, status: str, at: datetime, consent_by: str | None = None
) -> None:
    with engine.begin() as connection:
        list_id = crm.list_ids(connection, [code])[code]
        subscriptions = crm_tables(connection).subscriptions
        connection.execute(
            update(subscriptions)
            .where(subscriptions.c.contact_id == contact_id, subscriptions.c.list_id == list_id)
            .values(
                status=status, status_at=at, source="crm", consent_by=consent_by, consent_at=at if consent_by else None
            )
        )


def leave_list(engine: Engine, contact_id: int, code: str) -> None:
    """The contact's subscription row on the list removed, as a CRM does when someone is taken off a list."""
    with engine.begin() as connection:
        list_id = crm.list_ids(connection, [code])[code]
        subscriptions = crm_tables(connection).subscriptions
        connection.execute(
            delete(subscriptions).where(subscriptions.c.contact_id == contact_id, subscriptions.c.list_id == list_id)
        )


def join_list(
    engine: Engine, contact_id: int, code: str, status: str, at: datetime, consent_by: str | None = None
) -> None:
    with engine.begin() as connection:
        list_id = crm.list_ids(connection, [code])[code]
        connection.execute(
            insert(crm_tables(connection).subscriptions).values(
                contact_id=contact_id,
                list_id=list_id,
                status=status,
                status_at=at,
                source="crm",
                consent_by=consent_by,
                consent_at=at if consent_by else None,
            )
        )


def set_email(engine: Engine, contact_id: int, email: str, at: datetime) -> None:
    with engine.begin() as connection:
        contacts = crm_tables(connection).contacts
        connection.execute(
            update(contacts)
            .where(contacts.c.id == contact_id)
            .values(email=email, email_key=email_key(email), updated_at=at)
        )


def delete_contact(engine: Engine, contact_id: int) -> None:
    with engine.begin() as connection:
        contacts = crm_tables(connection).contacts
        connection.execute(update(contacts).where(contacts.c.id == contact_id).values(deleted=True))


def status_of(engine: Engine, contact_id: int, code: str) -> str | None:
    with engine.connect() as connection:
        t = crm_tables(connection)
        subscriptions, lists = t.subscriptions, t.lists
        return connection.scalar(
            select(subscriptions.c.status)
            .join(lists, lists.c.id == subscriptions.c.list_id)
            .where(subscriptions.c.contact_id == contact_id, lists.c.code == code)
        )


def suppressed(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        suppressions = crm_tables(connection).suppressions
        return dict(connection.execute(select(suppressions.c.email_key, suppressions.c.reason)).all())


def change_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return len(connection.execute(select(bs_changes.c.id)).all())


def read_csv(path: Path, delimiter: str = ";", encoding: str = "utf-8") -> list[list[str]]:
    with path.open(encoding=encoding, newline="") as handle:
        return list(csv.reader(handle, delimiter=delimiter))


def write_csv(
    path: Path, rows: list[list[str]], delimiter: str = ";", encoding: str = "utf-8", newline: str = "\r\n"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle, delimiter=delimiter, lineterminator=newline).writerows(rows)
    return path


# MailUp's export of unsubscribers, by its documented header names (all but the address are optional)
UNSUB_HEADER = ["email", "Phone Number", "idList", "OptOut_Date", "optout_nl", "optout_type", "optout_subtype"]


def unsub_row(email: str, list_id: str, stamp: str, kind: str) -> list[str]:
    return [email, "", list_id, stamp, "1", kind, ""]
