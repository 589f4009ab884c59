"""Writes the providers' sample return files in samples/<provider>/ (run from the repository root).

The addresses are those of the small CRM in tests/crmdata.py, so the tests can say what each file does.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def csv_text(rows: list[list[str]], delimiter: str = ",") -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in members.items():
            archive.writestr(zipfile.ZipInfo(name, (2026, 1, 5, 12, 0, 0)), text)


def mailchimp() -> None:
    common = ["Email Address", "First Name", "Last Name", "CITY", "MEMBER_RATING", "OPTIN_TIME", "LEID", "EUID"]
    subscribed = [
        [*common, "LAST_CHANGED", "TAGS"],
        [
            "alice@example.com",
            "Alicia",
            "Ädler",
            "Torino",
            "3",
            "2025-03-01 09:00:00",
            "11",
            "a1",
            "2026-01-05 10:00:00",
            '"Customer"',
        ],
    ]
    unsubscribed = [
        [*common, "UNSUB_TIME", "UNSUB_CAMPAIGN_TITLE", "UNSUB_REASON", "UNSUB_REASON_OTHER", "LAST_CHANGED", "TAGS"],
        [
            "bob@example.com",
            "Bob",
            "Brown",
            "",
            "2",
            "2025-03-01 09:00:00",
            "12",
            "b1",
            "2026-01-05 11:00:00",
            "January news",
            "No longer interested",
            "",
            "2026-01-05 11:00:00",
            "",
        ],
    ]
    cleaned = [
        [*common, "CLEAN_TIME", "CLEAN_CAMPAIGN_TITLE", "LAST_CHANGED", "TAGS"],
        [
            "dave@example.com",
            "Dave",
            "Davies",
            "",
            "1",
            "2025-03-01 09:00:00",
            "14",
            "d1",
            "2026-01-05 12:00:00",
            "January news",
            "2026-01-05 12:00:00",
            '"VIP"',
        ],
    ]
    write_zip(
        HERE / "mailchimp" / "members_export_sample.zip",
        {
            "subscribed_members_export_sample.csv": csv_text(subscribed),
            "unsubscribed_members_export_sample.csv": csv_text(unsubscribed),
            "cleaned_members_export_sample.csv": csv_text(cleaned),
        },
    )
    # Today's names: a folder inside the zip, and "email_audience" in every member's name.
    nonsubscribed = [
        [*common, "LAST_CHANGED", "TAGS"],
        ["heidi@example.com", "Heidi", "Leaving", "", "1", "", "15", "h1", "2026-01-05 09:00:00", ""],
    ]
    write_zip(
        HERE / "mailchimp" / "audience_export_sample.zip",
        {
            "audience_export_sample/subscribed_email_audience_export_sample.csv": csv_text(subscribed),
            "audience_export_sample/unsubscribed_email_audience_export_sample.csv": csv_text(unsubscribed),
            "audience_export_sample/cleaned_email_audience_export_sample.csv": csv_text(cleaned),
            "audience_export_sample/nonsubscribed_email_audience_export_sample.csv": csv_text(nonsubscribed),
        },
    )


def sfmc() -> None:
    stamp = "1/5/2026 4:00:00 AM"
    head = ["ClientID", "SendID", "SubscriberKey", "EmailAddress", "SubscriberID", "ListID", "EventDate", "EventType"]
    unsubs = [head, ["100", "5", "bob@example.com", "bob@example.com", "2", "1001", stamp, "Unsubscribe"]]
    bounce_head = [*head, "BounceCategory", "SMTPCode", "BounceReason"]
    bounces = [
        bounce_head,
        [
            "100",
            "5",
            "dave@example.com",
            "dave@example.com",
            "4",
            "1001",
            stamp,
            "HardBounce",
            "Hard bounce",
            "550",
            "5.1.1 user unknown",
        ],
    ]
    bounces += [
        [
            "100",
            str(6 + i),
            "ivan@example.com",
            "ivan@example.com",
            "11",
            "1001",
            stamp,
            "SoftBounce",
            "Soft bounce",
            "452",
            "4.2.2 mailbox full",
        ]
        for i in range(3)
    ]
    status = [
        ["ClientID", "SubscriberKey", "EmailAddress", "SubscriberID", "OldStatus", "NewStatus", "DateChanged"],
        ["100", "alice@example.com", "alice@example.com", "1", "Active", "Unsubscribed", stamp],
        ["100", "judy@example.com", "judy@example.com", "12", "Unsubscribed", "Active", stamp],
        ["100", "grace@example.com", "grace@example.com", "9", "Active", "Deleted", stamp],
        ["100", "heidi@example.com", "heidi@example.com", "10", "Active", "Archived", stamp],
    ]  # not listed
    opens = [head, ["100", "5", "judy@example.com", "judy@example.com", "12", "1001", stamp, "Open"]]
    clicks = [
        [*head, "URL"],
        ["100", "5", "judy@example.com", "judy@example.com", "12", "1001", stamp, "Click", "https://example.com/offer"],
    ]
    write_zip(
        HERE / "sfmc" / "TrackingExtract_sample.zip",
        {
            "Unsubs.csv": csv_text(unsubs),
            "Bounces.csv": csv_text(bounces),
            "StatusChange.csv": csv_text(status),
            "Opens.csv": csv_text(opens),
            "Clicks.csv": csv_text(clicks),
        },
    )


def acoustic() -> None:
    rows = [["Email", "Opt Out Date", "RECIPIENT_ID"], ["bob@example.com", "01/05/2026 10:00 AM", "2"]]
    path = HERE / "acoustic" / "Newsletter_OPT_OUT_sample.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(csv_text(rows), encoding="utf-8")


def flexmail() -> None:
    rows = [["email", "date"], ["bob@example.com", "2026-01-05 11:00:00"]]
    path = HERE / "flexmail" / "unsubscribes_sample.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(csv_text(rows, ";"), encoding="utf-8")


def generic() -> None:
    rows = [
        ["email", "list", "when", "event", "new_email", "first_name", "last_name"],
        ["bob@example.com", "NL", "2026-01-05T10:00:00", "unsubscribe", "", "", ""],
        ["alice@example.com", "", "2026-01-05T10:05:00", "email_change", "alice.new@example.com", "", ""],
        ["carol@example.com", "", "2026-01-05T10:10:00", "email_change", "dave@example.com", "", ""],
        ["judy@example.com", "NL", "2026-01-05T10:15:00", "click", "", "", ""],
        ["ivan@example.com", "", "", "profile", "", "Ivan", "Petrov"],
    ]
    path = HERE / "generic" / "events_sample.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(csv_text(rows), encoding="utf-8")


if __name__ == "__main__":
    mailchimp()
    sfmc()
    acoustic()
    flexmail()
    generic()
