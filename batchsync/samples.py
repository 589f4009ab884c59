"""A deterministic, realistic sample CRM and matching MailUp unsubscribers files.

The same seed and size always give the same rows::

    summary = write_sample_crm(engine, profile, contacts=10_000, seed=7)
    write_unsubscribers_file(Path("unsubscribers_20260105.csv"), summary.picks, profile)

What makes it realistic: names with accents and in non-Latin scripts, duplicate emails that differ only in case
or surrounding spaces, invalid emails, suppressed addresses, and a mix of per-list statuses and groups. Rows are
written in chunks, so a million contacts take no more memory than ten thousand.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from batchsync.config import Profile
from batchsync.db import crm
from batchsync.rules import email_key, email_problem

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
FIRST = [
    "Anna",
    "José",
    "Zoë",
    "François",
    "Łukasz",
    "Søren",
    "Dmitri",
    "Ана",
    "Дмитрий",
    "美咲",
    "陈伟",
    "محمد",
    "Αλέξης",
    "Giulia",
    "Chloé",
    "Jürgen",
    "Ngọc",
    "Siobhán",
    "Ærin",
    "Marco",
]
LAST = [
    "Rossi",
    "García",
    "Müller",
    "Nowak",
    "Øster",
    "Иванова",
    "Петров",
    "佐藤",
    "王",
    "الحسن",
    "Παπαδόπουλος",
    "Bianchi",
    "Dubois",
    "Šimić",
    "Nguyễn",
    "O'Brien",
    "Smith",
    "Côté",
    "Gómez",
    "Lefèvre",
]
ASCII = [
    "anna",
    "jose",
    "zoe",
    "francois",
    "lukasz",
    "soren",
    "dmitri",
    "ana",
    "dmitry",
    "misaki",
    "chen",
    "mohamed",
    "alexis",
    "giulia",
    "chloe",
    "juergen",
    "ngoc",
    "siobhan",
    "aerin",
    "marco",
]
DOMAINS = ["example.com", "example.org", "example.net", "mail.example.it"]
BROKEN = ["{u}@", "{u}.example.com", "{u}@@example.com", "{u} x@example.com", "@example.com", ""]
# share of (contact, list) rows per status; the rest are not on the list at all
STATUS_WEIGHTS = {"subscribed": 70, "unsubscribed": 14, "pending": 5, "cleaned": 3, None: 8}
# MailUp optout_type codes, one of each documented group (profiles/mailup.toml lists them all): admin, own link,
# the mail client's link and mail, imported as unsubscribed, right to be forgotten, inactive, blocked, repeated
# soft bounces, hard bounces, spam complaints.
OPTOUT_TYPES = ("0", "01", "2", "21", "32", "640", "4", "41", "1024", "128", "2561", "512", "8", "82", "16", "161")


@dataclass
class SampleSummary:
    """What ``write_sample_crm`` wrote: counts of contacts, subscriptions and the deliberate faults, and addresses to
    use."""

    contacts: int = 0
    subscriptions: int = 0
    duplicates: int = 0
    invalid: int = 0
    suppressed: int = 0
    picks: list[tuple[str, str]] = field(default_factory=list)  # (email, list code) of subscribed rows


def write_sample_crm(
    engine: Engine, profile: Profile, *, contacts: int, seed: int, chunk: int = 10_000
) -> SampleSummary:
    """Fill an initialised CRM with ``contacts`` generated contacts; the tables must be empty of contacts."""
    rng = random.Random(seed)
    summary = SampleSummary()
    with engine.begin() as connection:
        if crm.count_contacts(connection):
            raise ValueError("the CRM already holds contacts; samples go into an empty CRM")
        found = crm.list_ids(connection, profile.lists)
        list_ids = {code: found[code] for code in profile.lists}  # the profile's order, whatever the database's
        group_ids = crm.group_ids(connection, list_ids.values())
    for start in range(1, contacts + 1, chunk):
        rows = _chunk_rows(rng, start, min(start + chunk, contacts + 1), list_ids, group_ids, summary)
        with engine.begin() as connection:
            for table, values in rows.items():
                crm.insert_rows(connection, table, values)
    return summary


def _chunk_rows(
    rng: random.Random,
    start: int,
    stop: int,
    list_ids: dict[str, int],
    group_ids: dict[int, list[int]],
    summary: SampleSummary,
) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {
        "contacts": [],
        "subscriptions": [],
        "group_members": [],
        "suppressions": [],
    }
    codes = list(list_ids)
    for contact_id in range(start, stop):
        email = _email(rng, contact_id, rows["contacts"], summary)
        first, last = rng.randrange(len(FIRST)), rng.randrange(len(LAST))
        created = EPOCH - timedelta(days=rng.randrange(400, 800))
        rows["contacts"].append(
            {
                "id": contact_id,
                "email": email,
                "email_key": email_key(email),
                "first_name": FIRST[first],
                "last_name": LAST[last],
                "custom": {"customer_id": f"C{contact_id:08d}", "city": rng.choice(_CITIES)},
                "created_at": created,
                "updated_at": created,
                "deleted": False,
            }
        )
        if rng.random() < 0.005 and email_problem(email) is None:
            rows["suppressions"].append(_suppression(rng, email))
            summary.suppressed += 1
        for code in codes:
            _subscription(rng, contact_id, email, code, list_ids[code], group_ids, rows, summary)
        summary.contacts += 1
    _unique_suppressions(rows)
    return rows


_CITIES = ["Milano", "Roma", "Zürich", "København", "Kraków", "São Paulo", "東京", "Москва", "Αθήνα", "Lyon"]


def _email(rng: random.Random, contact_id: int, previous: list[dict[str, Any]], summary: SampleSummary) -> str:
    draw = rng.random()
    if previous and draw < 0.01:  # a duplicate of an earlier contact, differing in case or spaces
        summary.duplicates += 1
        other = str(rng.choice(previous)["email"]).strip()
        return rng.choice([other.upper(), f"  {other} ", other.capitalize(), f"{other.title()} "])
    user = f"{ASCII[contact_id % len(ASCII)]}.{contact_id}"
    if draw < 0.015:
        summary.invalid += 1
        return rng.choice(BROKEN).format(u=user)
    return f"{user}@{rng.choice(DOMAINS)}"


def _suppression(rng: random.Random, email: str) -> dict[str, Any]:
    reason = rng.choice(["hard_bounce", "complaint", "admin"])
    return {
        "email_key": email_key(email),
        "email": email.strip(),
        "reason": reason,
        "at": EPOCH - timedelta(days=rng.randrange(1, 300)),
        "source": "crm",
    }


def _unique_suppressions(rows: dict[str, list[dict[str, Any]]]) -> None:
    seen: dict[str, dict[str, Any]] = {}
    for row in rows["suppressions"]:
        seen.setdefault(row["email_key"], row)
    rows["suppressions"] = list(seen.values())


def _subscription(
    rng: random.Random,
    contact_id: int,
    email: str,
    code: str,
    list_id: int,
    group_ids: dict[int, list[int]],
    rows: dict[str, list[dict[str, Any]]],
    summary: SampleSummary,
) -> None:
    status = rng.choices(list(STATUS_WEIGHTS), weights=list(STATUS_WEIGHTS.values()))[0]
    if status is None:
        return
    at = EPOCH - timedelta(days=rng.randrange(2, 360), seconds=rng.randrange(86_400))
    consent = status in ("subscribed", "pending")
    rows["subscriptions"].append(
        {
            "contact_id": contact_id,
            "list_id": list_id,
            "status": status,
            "status_at": at,
            "source": "crm",
            "reason": None if consent else "crm",
            "consent_by": "web-form" if consent else None,
            "consent_at": at if consent else None,
        }
    )
    summary.subscriptions += 1
    if status == "subscribed":
        for group_id in group_ids.get(list_id, []):
            if rng.random() < 0.3:
                rows["group_members"].append({"contact_id": contact_id, "group_id": group_id})
        if len(summary.picks) < 200 and "@" in email and rng.random() < 0.2:
            summary.picks.append((email.strip(), code))


# The columns of MailUp's export of unsubscribers, by the header names it documents
# (https://help.mailup.com/display/mailupapi/Export+of+email+unsubscribers).
UNSUBSCRIBERS_HEADER = [
    "email",
    "Phone Number",
    "idList",
    "OptOut_Date",
    "Subscription Date",
    "optout_nl",
    "optout_type",
    "optout_subtype",
]


def unsubscriber_rows(picks: list[tuple[str, str]], profile: Profile, seed: int) -> Iterator[list[str]]:
    """MailUp returned-unsubscribers rows for the picked (email, list) pairs, using every optout_type."""
    rng = random.Random(seed)
    zone = ZoneInfo("Europe/Rome")
    for index, (email, code) in enumerate(picks):
        kind = OPTOUT_TYPES[index % len(OPTOUT_TYPES)]
        moment = (EPOCH + timedelta(days=3, seconds=rng.randrange(86_400))).astimezone(zone)
        since = (moment - timedelta(days=rng.randrange(30, 700))).strftime("%Y%m%dT%H%M%S")
        yield [email, "", profile.lists[code].id, moment.strftime("%Y%m%dT%H%M%S"), since, "161", kind, ""]


def write_unsubscribers_file(path: Path, picks: list[tuple[str, str]], profile: Profile, seed: int = 1) -> int:
    """Write a MailUp unsubscribers file (``;``, UTF-8, header row); returns the number of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=";", lineterminator="\r\n")
        writer.writerow(UNSUBSCRIBERS_HEADER)
        for row in unsubscriber_rows(picks, profile, seed):
            writer.writerow(row)
            count += 1
    return count
