"""Every provider profile: its export read back by its own reader, and its sample return files ingested."""

from __future__ import annotations

import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from sqlalchemy import Engine, func, select

from batchsync.clock import ManualClock
from batchsync.config import Profile, load_profile
from batchsync.db.schema import activities, contacts, lists, subscriptions, suppressions
from batchsync.rules import email_key, email_problem, export_status, merge_statuses
from batchsync.sync import Sync

from .conftest import ROOT, with_remote_inboxes
from .crmdata import build_tiny_crm, status_of, suppressed
from .exportfile import read_export

PROVIDERS = ["mailup", "mailchimp", "sfmc", "acoustic", "flexmail", "generic"]


def profile_for(tmp_path: Path, source: Path, **overrides: Any) -> Profile:
    values: dict[str, Any] = {
        "database": {"url": f"sqlite:///{tmp_path / 'crm.sqlite'}"},
        "work.dir": str(tmp_path / "work"),
        "transport": {"kind": "local", "path": str(tmp_path / "provider")},
        **overrides,
    }
    return with_remote_inboxes(load_profile(source, overrides=values), tmp_path / "provider")


def ready(profile: Profile, clock: ManualClock) -> Sync:
    sync = Sync(profile, clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


def expected_rows(engine: Engine, profile: Profile, code: str) -> dict[str, dict[str, str]]:
    """What the provider should hold for a list, worked out from the CRM tables directly."""
    segment = profile.lists[code].segment
    with engine.connect() as connection:
        query = (
            select(
                contacts.c.email,
                contacts.c.first_name,
                contacts.c.custom,
                subscriptions.c.status,
                suppressions.c.email_key.is_not(None),
            )
            .outerjoin(subscriptions, subscriptions.c.contact_id == contacts.c.id)
            .outerjoin(lists, lists.c.id == subscriptions.c.list_id)
            .outerjoin(suppressions, suppressions.c.email_key == contacts.c.email_key)
            .where(contacts.c.deleted.is_(False))
            .order_by(contacts.c.id)
        )
        if segment is None:
            query = query.where(lists.c.code == code)
        rows = connection.execute(query).all()
    grouped: dict[str, list[Any]] = defaultdict(list)
    for email, first, custom, status, is_suppressed in rows:
        if segment is not None:
            if (custom or {}).get(segment.field.removeprefix("custom.")) != segment.equals:
                continue
            status = "subscribed"  # the segment's members; none of the tiny CRM's has a row on a segment list
        if email_problem(email) is None:
            grouped[email_key(email)].append((email.strip(), first, export_status(status, bool(is_suppressed))))
    expected = {}
    for key, group in grouped.items():
        status = merge_statuses(item[2] for item in group)
        if profile.export.has_status and status not in profile.export.status_values:
            continue
        if not profile.export.has_status and status != "subscribed":
            continue
        expected[key] = {"first_name": group[0][1], "status": status}  # names from the first contact
    return expected


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_export_read_back_by_its_own_profile_gives_the_same_rows(
    tmp_path: Path, clock: ManualClock, provider: str
) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / f"{provider}.toml")
    round_trip(ready(profile, clock), profile, tmp_path)


def round_trip(sync: Sync, profile: Profile, tmp_path: Path) -> None:
    result = sync.export("full")
    assert result.files
    for item in result.files:
        data = [path for path in item.uploads if not path.name.endswith(".xml")]
        rows = [row for path in data for row in read_export(profile, path)]
        got = {email_key(row["email"]): row for row in rows}
        assert len(got) == len(rows)  # each address once per list
        wanted = expected_rows(sync.engine, profile, item.list_code)
        assert set(got) == set(wanted), item.list_code
        for key, row in got.items():
            assert row["status"] == wanted[key]["status"] or {row["status"], wanted[key]["status"]} <= {
                "unsubscribed",
                "cleaned",
            }  # one provider value for both
            if "first_name" in row:  # a name the encoding cannot hold is sent with "?" (cp1252 and Cyrillic)
                encoding = profile.export.encoding
                assert row["first_name"] == wanted[key]["first_name"].encode(encoding, "replace").decode(encoding)
            if "list_id" in row:
                assert row["list_id"] == profile.lists[item.list_code].id
        for path in item.uploads:
            assert (tmp_path / "provider" / (item.remote_path or "").rsplit("/", 1)[0] / path.name).exists()


def _ingest(tmp_path: Path, clock: ManualClock, provider: str, *files: str) -> Sync:
    profile = profile_for(tmp_path, ROOT / "profiles" / f"{provider}.toml")
    sync = ready(profile, clock)
    report = sync.import_files([ROOT / "samples" / provider / name for name in files], origin="provider")
    assert report.files and all(item.outcome == "applied" for item in report.files), report
    return sync


def contact(engine: Engine, contact_id: int) -> Any:
    with engine.connect() as connection:
        return connection.execute(select(contacts).where(contacts.c.id == contact_id)).one()


def activity_kinds(engine: Engine, contact_id: int) -> list[str]:
    with engine.connect() as connection:
        return sorted(connection.scalars(select(activities.c.kind).where(activities.c.contact_id == contact_id)))


def test_mailchimp_audience_export_zip(tmp_path: Path, clock: ManualClock) -> None:
    sync = _ingest(tmp_path, clock, "mailchimp", "members_export_sample.zip")
    engine = sync.engine
    alice = contact(engine, 1)
    assert (alice.first_name, alice.custom["city"]) == ("Alicia", "Torino")  # merge fields came back
    assert status_of(engine, 1, "newsletter") == "subscribed"
    assert status_of(engine, 2, "newsletter") == "unsubscribed"
    assert status_of(engine, 4, "newsletter") == "cleaned"
    assert suppressed(engine)["dave@example.com"] == "clean"
    with engine.connect() as connection:
        reason = connection.scalar(select(subscriptions.c.reason).where(subscriptions.c.contact_id == 2))
    assert reason == "unsubscribe: No longer interested"  # UNSUB_REASON kept with the opt-out


def test_mailchimp_audience_export_under_today_s_names(tmp_path: Path, clock: ManualClock) -> None:
    sync = _ingest(tmp_path, clock, "mailchimp", "audience_export_sample.zip")
    engine = sync.engine
    assert contact(engine, 1).first_name == "Alicia"  # subscribed_email_audience_export_*, in a folder in the zip
    assert status_of(engine, 2, "newsletter") == "unsubscribed"
    assert status_of(engine, 4, "newsletter") == "cleaned"
    assert status_of(engine, 10, "newsletter") == "subscribed"  # nonsubscribed at Mailchimp: nothing changes
    names = sorted(path.name for path in (tmp_path / "work" / "archive").glob("*.csv"))
    assert "audience_export_sample__nonsubscribed_email_audience_export_sample.csv" in names


def test_sfmc_tracking_extract(tmp_path: Path, clock: ManualClock) -> None:
    sync = _ingest(tmp_path, clock, "sfmc", "TrackingExtract_sample.zip")
    engine = sync.engine
    assert status_of(engine, 2, "newsletter") == "unsubscribed"  # Unsubs, ListID 1001
    assert [status_of(engine, 4, code) for code in ("newsletter", "offers")] == ["cleaned", "cleaned"]  # hard
    assert [status_of(engine, 11, code) for code in ("newsletter", "offers")] == ["cleaned", "cleaned"]  # 3 soft
    assert [status_of(engine, 1, code) for code in ("newsletter", "offers")] == ["unsubscribed"] * 2
    assert status_of(engine, 12, "newsletter") == "subscribed"  # "Active" at SFMC re-subscribes nobody
    assert activity_kinds(engine, 12) == ["click", "open", "subscribe"]
    assert activity_kinds(engine, 11).count("soft_bounce") == 3
    assert status_of(engine, 9, "newsletter") == "unsubscribed"  # "Deleted" is an opt-out, not an error
    assert status_of(engine, 10, "newsletter") == "unsubscribed"  # a status no one listed: an opt-out still
    results = (tmp_path / "work" / "archive" / "TrackingExtract_sample__StatusChange.csv.result.csv").read_text()
    assert "warning: unknown code 'Archived' in column NewStatus: taken as an unsubscribe" in results


def test_sfmc_times_are_central_standard_time_all_year(tmp_path: Path, clock: ManualClock) -> None:
    """SFMC does not observe daylight saving: 7/1/2026 4:00:00 AM is 10:00 UTC, not 09:00 (America/Chicago)."""
    sync = ready(profile_for(tmp_path, ROOT / "profiles" / "sfmc.toml"), clock)
    dropped = tmp_path / "Unsubs_july.csv"
    dropped.write_text(
        "ClientID,SendID,SubscriberKey,EmailAddress,SubscriberID,ListID,EventDate,EventType\r\n"
        "100,5,bob@example.com,bob@example.com,2,1001,7/1/2026 4:00:00 AM,Unsubscribe\r\n"
    )
    clock.advance(400 * 86400)  # the event is in the past
    sync.import_files([dropped], origin="provider")
    with sync.engine.connect() as connection:
        at = connection.scalar(select(subscriptions.c.status_at).where(subscriptions.c.contact_id == 2))
    assert at.isoformat() == "2026-07-01T10:00:00+00:00"


def test_an_sfmc_extract_in_utf16_is_read(tmp_path: Path, clock: ManualClock) -> None:
    sync = ready(profile_for(tmp_path, ROOT / "profiles" / "sfmc.toml", **{"inbound.1.encoding": "utf-16"}), clock)
    dropped = tmp_path / "Unsubs_unicode.csv"
    text = (
        "ClientID,SendID,SubscriberKey,EmailAddress,SubscriberID,ListID,EventDate,EventType\r\n"
        "100,5,Иван,ivan@example.com,11,1001,1/5/2026 4:00:00 AM,Unsubscribe\r\n"
    )
    dropped.write_bytes(text.encode("utf-16"))  # with its byte order mark, as Windows tools write it
    [outcome] = sync.import_files([dropped], origin="provider").files
    assert (outcome.outcome, outcome.changed) == ("applied", 1)
    assert status_of(sync.engine, 11, "newsletter") == "unsubscribed"
    broken = tmp_path / "Unsubs_broken.csv"
    broken.write_bytes(text.encode("utf-16")[:-1])  # half a character at the end
    [outcome] = sync.import_files([broken], origin="provider").files
    assert outcome.outcome == "quarantined" and "not valid utf-16 text at line 2" in (outcome.reason or "")


def test_acoustic_opt_out_export(tmp_path: Path, clock: ManualClock) -> None:
    sync = _ingest(tmp_path, clock, "acoustic", "Newsletter_OPT_OUT_sample.csv")
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"  # "01/05/26 10:00 AM": older exports
    assert status_of(sync.engine, 4, "newsletter") == "unsubscribed"  # "01/05/2026 10:00 AM", quoted: 2024's


def test_acoustic_export_has_map_files_and_a_separate_opt_out_file(tmp_path: Path, clock: ManualClock) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / "acoustic.toml")
    result = ready(profile, clock).export("full")
    [item] = result.files
    names = [path.name for path in item.uploads]
    assert [
        name.endswith(suffix)
        for name, suffix in zip(names, (".csv", ".xml", "_optout.csv", "_optout.xml"), strict=True)
    ] == [True] * 4
    actions = [ElementTree.parse(path).findtext("LIST_INFO/ACTION") for path in item.uploads if path.suffix == ".xml"]
    assert actions == ["ADD_AND_UPDATE", "OPT_OUT"]
    mapping = ElementTree.parse(item.uploads[1])
    assert mapping.findtext("SYNC_FIELDS/SYNC_FIELD/NAME") == "EMAIL"
    assert mapping.findtext("LIST_INFO/HASHEADERS") == "true"
    assert [column.findtext("NAME") for column in mapping.iter("COLUMN")] == [
        "EMAIL",
        "FIRST_NAME",
        "LAST_NAME",
        "OPT_IN_STATUS",
    ]
    opted_out = read_export(profile, item.uploads[2])
    assert {row["status"] for row in opted_out} == {"unsubscribed"}


def test_flexmail_sends_flagged_contacts_once_with_three_columns(tmp_path: Path, clock: ManualClock) -> None:
    sync = _ingest(tmp_path, clock, "flexmail", "unsubscribes_sample.csv")
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    result = sync.export("full")
    [item] = result.files
    header = item.uploads[0].read_text(encoding="utf-8").splitlines()[0]
    assert header == "name;first name;email"
    emails = {row["email"].lower() for row in read_export(sync.profile, item.uploads[0])}
    # flagged 1, 2, 4, 5, 7, 8, 11; bob unsubscribed, 7 invalid, frank suppressed: gone
    assert emails == {"alice@example.com", "dave@example.com", "eve@example.com", "ivan@example.com"}


def test_generic_events_email_change_conflict_and_field_updates(tmp_path: Path, clock: ManualClock) -> None:
    sync = _ingest(tmp_path, clock, "generic", "events_sample.csv")
    engine = sync.engine
    [outcome] = sync.import_files([ROOT / "samples" / "generic" / "events_sample.csv"]).files
    assert outcome.outcome == "duplicate"
    assert status_of(engine, 2, "newsletter") == "unsubscribed"
    assert contact(engine, 1).email == "alice.new@example.com"
    assert contact(engine, 3).email == "carol@example.com"  # the new address belongs to dave: refused
    assert (contact(engine, 11).first_name, contact(engine, 11).last_name) == ("Ivan", "Petrov")
    assert activity_kinds(engine, 12) == ["click"]
    with engine.connect() as connection:
        from batchsync.db.schema import bs_files

        detail = connection.scalar(select(bs_files.c.detail).where(bs_files.c.outcome == "applied"))
    assert "rejected=1" in (detail or "")
    errors = (tmp_path / "work" / "archive" / "events_sample.csv.errors.csv").read_text()
    assert "belongs to another contact (4)" in errors


def test_a_soft_bounce_cleans_at_the_threshold(tmp_path: Path, clock: ManualClock) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / "generic.toml", **{"policy.soft_bounce_threshold": 2})
    sync = ready(profile, clock)
    inbox = tmp_path / "work" / "inbox"
    header = "email,list,when,event,new_email\r\n"
    for number in (1, 2):
        (inbox / f"events_{number}.csv").write_text(
            header + f"bob@example.com,NL,2026-01-0{number}T10:00:00,softbounce,\r\n"
        )
        sync.import_files()
        assert status_of(sync.engine, 2, "newsletter") == ("subscribed" if number == 1 else "cleaned")


def test_the_safety_stop_quarantines_a_mass_unsubscribe_unless_forced(tmp_path: Path, clock: ManualClock) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / "generic.toml", **{"policy.safety_min_unsubscribes": 2})
    sync = ready(profile, clock)
    rows = "".join(
        f"{email},NL,2026-01-05T10:00:00,unsubscribe,\r\n"
        for email in ("alice@example.com", "bob@example.com", "dave@example.com")
    )
    (tmp_path / "work" / "inbox" / "events_mass.csv").write_text("email,list,when,event,new_email\r\n" + rows)
    [outcome] = sync.import_files().files
    assert outcome.outcome == "quarantined" and "safety stop" in (outcome.reason or "")
    assert "--force" in (outcome.reason or "")
    assert status_of(sync.engine, 1, "newsletter") == "subscribed"
    [forced] = sync.import_files([tmp_path / "work" / "quarantine" / "events_mass.csv"], force=True).files
    assert forced.outcome == "applied" and forced.changed == 3
    assert status_of(sync.engine, 1, "newsletter") == "unsubscribed"


def test_a_segment_list_follows_its_filter(tmp_path: Path, clock: ManualClock) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / "flexmail.toml")
    sync = ready(profile, clock)
    first = {row["email"] for row in read_export(profile, sync.export("full").files[0].uploads[0])}
    with sync.engine.begin() as connection:
        from sqlalchemy import update

        connection.execute(update(contacts).where(contacts.c.id == 12).values(custom={"newsletter": "1"}))
        connection.execute(update(contacts).where(contacts.c.id == 1).values(custom={"newsletter": "0"}))
    clock.advance(60)
    second = {row["email"] for row in read_export(profile, sync.export("full").files[0].uploads[0])}
    assert second == (first - {"alice@example.com"}) | {"judy@example.com"}


def test_a_resubscription_after_the_provider_s_opt_out_goes_out_as_pending(tmp_path: Path, clock: ManualClock) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / "generic.toml")
    sync = ready(profile, clock)
    sync.export("full")
    fetched = tmp_path / "events_1.csv"  # the provider's file, fetched by hand
    fetched.write_text("email,list,when,event,new_email\r\nbob@example.com,NL,2026-01-05T10:00:00,unsubscribe,\r\n")
    sync.import_files([fetched], origin="provider")
    clock.advance(60)
    from .crmdata import set_status

    set_status(sync.engine, 2, "newsletter", "subscribed", clock.now(), consent_by="web form")
    [item] = sync.export("diff").files
    [row] = read_export(profile, item.uploads[0])
    assert (row["email"], row["status"]) == ("bob@example.com", "pending")
    clock.advance(60)
    assert sync.export("diff").rows == 0  # and it stays pending until the provider confirms


def test_a_provider_added_as_a_toml_file_alone(tmp_path: Path, clock: ManualClock) -> None:
    """A made-up provider, 'Postbox': pipes, cp1252, zipped uploads, its own status words, no code."""
    text = (ROOT / "profiles" / "generic.toml").read_text(encoding="utf-8")
    text = text.replace('name = "generic"', 'name = "postbox"').replace('delimiter = ","', 'delimiter = "|"')
    text = text.replace('encoding = "utf-8"', 'encoding = "cp1252"', 1)
    text = text.replace("# zip = false", "zip = true")
    text = text.replace('subscribed = "active"', 'subscribed = "IN"').replace(
        'unsubscribed = "unsubscribed"', 'unsubscribed = "OUT"'
    )
    path = tmp_path / "postbox.toml"
    path.write_text(text, encoding="utf-8")
    assert tomllib.loads(text)["export"]["zip"] is True
    profile = profile_for(tmp_path, path)
    sync = ready(profile, clock)
    round_trip(sync, profile, tmp_path)
    (tmp_path / "work" / "inbox" / "events_1.csv").write_text(
        "email|list|when|event|new_email\r\nbob@example.com|NL|2026-01-05T10:00:00|unsubscribe|\r\n", encoding="cp1252"
    )
    [outcome] = sync.import_files().files
    assert outcome.changed == 1 and status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    with sync.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(subscriptions)) > 0


@pytest.mark.parametrize(("delimiter", "encoding"), [("\t", "latin-1"), ("|", "utf-8-sig"), (";", "cp1252")])
def test_dialects_quoted_newlines_and_crlf(tmp_path: Path, clock: ManualClock, delimiter: str, encoding: str) -> None:
    profile = profile_for(
        tmp_path,
        ROOT / "profiles" / "generic.toml",
        **{"inbound.0.delimiter": delimiter, "inbound.0.encoding": encoding},
    )
    sync = ready(profile, clock)
    rows = [
        ["email", "list", "when", "event", "new_email", "note"],
        ["bob@example.com", "NL", "2026-01-05T10:00:00", "unsubscribe", "", 'two\r\nlines, "quoted" and ü'],
        ["not an email", "NL", "2026-01-05T10:00:00", "unsubscribe", "", ""],
        ["alice@example.com", "NL", "2026-01-05T10:00:00", "unsubscribe", "", "é"],
    ]
    import csv

    path = tmp_path / "work" / "inbox" / "events_dialect.csv"
    with path.open("w", encoding=encoding, newline="") as handle:
        csv.writer(handle, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed, outcome.rejected) == ("applied", 2, 1)
    errors = (tmp_path / "work" / "archive" / "events_dialect.csv.errors.csv").read_text(encoding=encoding)
    assert f"{delimiter}4{delimiter}invalid email" in errors  # line 4: the quoted newline took a line of its own
    assert status_of(sync.engine, 1, "newsletter") == "unsubscribed"


def test_the_mailup_sample_file_suppresses_its_bounces_and_complaints(tmp_path: Path, clock: ManualClock) -> None:
    import csv

    sample = ROOT / "samples" / "mailup" / "unsubscribers_sample.csv"
    with sample.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter=";"))
    profile = profile_for(tmp_path, ROOT / "profiles" / "mailup.toml")
    sync = ready(profile, clock)
    [outcome] = sync.import_files([sample]).files
    assert (outcome.outcome, outcome.rejected) == ("applied", 0)
    codes = profile.inbound[0].codes
    kinds = {row["email"].lower(): codes[row["optout_type"]].event for row in rows}
    expected = {email for email, kind in kinds.items() if kind in ("hard_bounce", "complaint", "clean")}
    got = suppressed(sync.engine)
    assert expected and all(got.get(email) in ("hard_bounce", "complaint", "clean") for email in expected)
