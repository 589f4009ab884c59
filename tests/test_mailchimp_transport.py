"""What is Mailchimp's own in the mailchimp transport, against the fake Mailchimp Marketing API
(tests/mailchimp_server.py) over real HTTP: merge fields and tags in batches, a diff sending one upsert, the report
windows, a member Mailchimp opted out never sent as subscribed (pending with new consent), a refused key, sign-ups
with and without policy.create_contacts, check, and the summary mail. The scenarios every API transport shares
are in tests/test_api_scenarios.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from batchsync.check import run_checks
from batchsync.clock import ManualClock
from batchsync.config import Profile, load_profile
from batchsync.db.schema import activities, bs_changes, contacts, subscriptions
from batchsync.notify import summary_message
from batchsync.signups import RULE
from batchsync.sync import Sync
from batchsync.transport import open_transport

from .conftest import ROOT
from .crmdata import build_tiny_crm, delete_contact, set_status, status_of
from .mailchimp_server import Audience, MailchimpServer, MergeField, subscriber_hash

LIST_ID = "a1b2c3d4e5"
SENT = ("alice@example.com", "bob@example.com", "dave@example.com", "grace@example.com", "ivan@example.com")


@pytest.fixture
def mailchimp(clock: ManualClock) -> Iterator[MailchimpServer]:
    with MailchimpServer() as server:
        server.api.clock = clock.now  # Mailchimp's clock and ours agree, as in life
        server.batch_started_polls = 2
        server.add_audience(
            LIST_ID,
            "Newsletter",
            [MergeField("FNAME", "First Name"), MergeField("LNAME", "Last Name"), MergeField("CITY", "City")],
        )
        yield server


def mailchimp_profile(tmp_path: Path, db_url: str, server: MailchimpServer, monkeypatch: pytest.MonkeyPatch) -> Profile:
    key_file = tmp_path / "mailchimp.key"
    key_file.write_text(server.api_key + "\n", encoding="utf-8")
    return load_profile(
        ROOT / "profiles" / "mailchimp-api.toml",
        overrides={
            "database": {"url": db_url},
            "work.dir": str(tmp_path / "work"),
            "transport": {
                "kind": "mailchimp",
                "url": server.url,
                "api_key_file": str(key_file),
                "poll_seconds": 1.0,
                "batch_size": 4,  # several batches for the tiny CRM
            },
        },
    )


@pytest.fixture
def sync(tmp_path: Path, mailchimp: MailchimpServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> Sync:
    profile = mailchimp_profile(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", mailchimp, monkeypatch)
    sync = Sync(profile, clock=clock, transport_factory=lambda p: open_transport(p, clock))
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


def audience(server: MailchimpServer) -> Audience:
    return server.audiences[LIST_ID]


def statuses(server: MailchimpServer) -> dict[str, str]:
    return {member.email_address.strip().lower(): member.status for member in audience(server).members.values()}


def put_bodies(server: MailchimpServer) -> list[dict[str, Any]]:
    """Every member upsert Mailchimp was sent, in order."""
    with server.api.lock:
        operations = [op for batch in server.api.batches.values() for op in batch.operations]
    return [json.loads(op["body"]) for op in operations if op["method"] == "PUT"]


def test_full_export_upserts_every_member_with_merge_fields_and_tags(sync: Sync, mailchimp: MailchimpServer) -> None:
    result = sync.export("full")

    [exported] = result.files
    held = statuses(mailchimp)
    assert {email: held[email] for email in SENT} == dict.fromkeys(SENT, "subscribed")
    assert held["carol@example.com"] == "unsubscribed" and held["frank@example.com"] == "unsubscribed"
    assert "not-an-email" not in held  # skipped by the export, never sent
    alice = mailchimp.member(LIST_ID, "alice@example.com")
    assert alice is not None and alice.merge_fields["FNAME"] == "Alice" and alice.merge_fields["LNAME"] == "Ädler"
    dave = mailchimp.member(LIST_ID, "dave@example.com")
    assert dave is not None and dave.tags == ["VIP"] and alice.tags == []
    assert exported.rejected == 0 and exported.uploaded
    batches = len(mailchimp.api.batches)
    assert exported.api_calls == 4 * batches and result.api_calls == 1 + 4 * batches  # ping; post and 3 polls each
    assert len(mailchimp.api.batches) > 1  # batch_size 4: the rows went in several batches
    assert sync.export("diff").rows == 0  # the ledger moved: nothing left to send


def test_diff_sends_only_the_changed_row(sync: Sync, mailchimp: MailchimpServer, clock: ManualClock) -> None:
    sync.export("full")
    before = len(put_bodies(mailchimp))
    clock.advance(3600)
    set_status(sync.engine, 2, "newsletter", "unsubscribed", clock.now())

    assert sync.export("diff").rows == 1

    [body] = put_bodies(mailchimp)[before:]
    assert body["email_address"] == "bob@example.com" and body["status"] == "unsubscribed"
    assert statuses(mailchimp)["bob@example.com"] == "unsubscribed"


def test_member_unsubscribed_or_cleaned_at_mailchimp_is_opted_out_in_the_crm(
    sync: Sync, mailchimp: MailchimpServer, clock: ManualClock
) -> None:
    sync.export("full")
    clock.advance(3600)
    bob = mailchimp.member(LIST_ID, "bob@example.com")
    alice = mailchimp.member(LIST_ID, "alice@example.com")
    assert bob is not None and alice is not None
    bob.status, bob.unsubscribe_reason, bob.last_changed = "unsubscribed", "Too many emails", clock.now()
    alice.status, alice.last_changed = "cleaned", clock.now()
    clock.advance(60)

    report = sync.run("diff")

    assert report is not None
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(sync.engine, 1, "newsletter") == "cleaned"
    assert report.exported is not None and report.exported.rows == 0  # Mailchimp's own verdicts are not echoed
    assert not list((sync.work.root / "api-inbox" / "members").glob("*.csv"))  # applied, then finished
    clock.advance(3600)
    again = sync.run("diff")  # windows overlap by minutes: a member seen twice changes nothing the second time
    assert again is not None and all(outcome.changed == 0 for outcome in again.imported.files)
    clock.advance(3600)
    assert not sync.run("diff").imported.files  # type: ignore[union-attr]


def test_member_unsubscribed_at_mailchimp_is_never_sent_as_subscribed(
    sync: Sync, mailchimp: MailchimpServer, clock: ManualClock
) -> None:
    sync.export("full")
    clock.advance(3600)
    bob = mailchimp.member(LIST_ID, "bob@example.com")
    judy = mailchimp.member(LIST_ID, "judy@example.com")
    assert bob is not None and judy is not None
    for member in (bob, judy):
        member.status, member.last_changed = "unsubscribed", clock.now()
    clock.advance(60)
    sync.run("diff")  # Mailchimp's opt-outs reach the CRM
    sent = len(put_bodies(mailchimp))
    clock.advance(3600)
    set_status(sync.engine, 2, "newsletter", "subscribed", clock.now())  # no new consent
    set_status(sync.engine, 12, "newsletter", "subscribed", clock.now(), consent_by="web-form")  # new consent

    sync.run("diff")

    later = put_bodies(mailchimp)[sent:]
    assert not [body for body in later if body.get("status") == "subscribed"]
    assert [(body["email_address"], body["status"]) for body in later] == [("judy@example.com", "pending")]
    assert statuses(mailchimp)["bob@example.com"] == "unsubscribed"
    assert statuses(mailchimp)["judy@example.com"] == "pending"


def test_wrong_api_key_fails_the_export_before_anything_is_sent(
    tmp_path: Path, mailchimp: MailchimpServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = mailchimp_profile(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", mailchimp, monkeypatch)
    (tmp_path / "mailchimp.key").write_text("0" * 32 + "-us19", encoding="utf-8")
    sync = Sync(profile, clock=clock, transport_factory=lambda p: open_transport(p, clock))
    sync.init()
    build_tiny_crm(sync.engine)

    with pytest.raises(Exception, match="credentials refused"):
        sync.export("full")

    assert not audience(mailchimp).members and not mailchimp.api.batches


def signed_up_sync(
    tmp_path: Path, server: MailchimpServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, create: bool
) -> Sync:
    profile = mailchimp_profile(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", server, monkeypatch)
    profile = profile.model_copy(update={"policy": profile.policy.model_copy(update={"create_contacts": create})})
    sync = Sync(profile, clock=clock, transport_factory=lambda p: open_transport(p, clock))
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


def contact_row(engine: Engine, email: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        found = connection.execute(
            select(
                contacts.c.id,
                contacts.c.first_name,
                subscriptions.c.status,
                subscriptions.c.consent_by,
                subscriptions.c.consent_at,
            )
            .join(subscriptions, subscriptions.c.contact_id == contacts.c.id)
            .where(contacts.c.email_key == email)
        ).first()
    return dict(found._mapping) if found else None


def test_sign_up_at_mailchimp_creates_the_contact_with_consent_when_asked(
    tmp_path: Path, mailchimp: MailchimpServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = signed_up_sync(tmp_path, mailchimp, clock, monkeypatch, create=True)
    opted_in = clock.now() - timedelta(hours=2)
    mailchimp.add_member(
        LIST_ID, "new@example.com", "subscribed", merge_fields={"FNAME": "Nina"}, timestamp_opt=opted_in
    )
    delete_contact(sync.engine, 10)  # the CRM let heidi go: her sign-up at Mailchimp does not bring her back
    mailchimp.add_member(LIST_ID, "heidi@example.com", "subscribed", timestamp_opt=opted_in)
    mailchimp.add_member(LIST_ID, "unsure@example.com", "subscribed")  # no opt-in time: no consent to record

    report = sync.run("diff")

    row = contact_row(sync.engine, "new@example.com")
    assert row is not None and row["first_name"] == "Nina" and row["status"] == "subscribed"
    assert row["consent_by"] == "provider:mailchimp-api"
    assert row["consent_at"].replace(tzinfo=UTC) == opted_in
    with sync.engine.connect() as connection:
        rules = connection.scalars(select(bs_changes.c.rule).where(bs_changes.c.contact_id == row["id"])).all()
    assert rules == [RULE]
    with sync.engine.connect() as connection:
        heidis = connection.scalars(select(contacts.c.deleted).where(contacts.c.email_key == "heidi@example.com"))
        assert list(heidis) == [True]
    assert contact_row(sync.engine, "unsure@example.com") is None
    # heidi's sign-up and the update rows of heidi and unsure find no contact; new@'s rows do
    assert report is not None and sum(outcome.no_contact for outcome in report.imported.files) == 3


def test_sign_up_at_mailchimp_creates_nothing_by_default(
    tmp_path: Path, mailchimp: MailchimpServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = signed_up_sync(tmp_path, mailchimp, clock, monkeypatch, create=False)
    mailchimp.add_member(LIST_ID, "new@example.com", "subscribed", timestamp_opt=clock.now())

    report = sync.run("diff")

    assert contact_row(sync.engine, "new@example.com") is None
    assert report is not None and sum(outcome.no_contact for outcome in report.imported.files) == 2  # both kinds


def test_check_reports_the_key_the_audience_and_missing_merge_fields(
    tmp_path: Path, mailchimp: MailchimpServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = mailchimp_profile(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", mailchimp, monkeypatch)
    Sync(profile, clock=clock).init()
    audience(mailchimp).merge_fields = [MergeField("FNAME", "First Name"), MergeField("LNAME", "Last Name")]

    found = {result.name: result for result in run_checks(profile, clock=clock)}

    assert found[f"Mailchimp API {mailchimp.url}"].ok
    assert found[f"audience {LIST_ID} (lists.newsletter)"].ok
    merge = found[f"merge fields of {LIST_ID}"]
    assert not merge.ok and "missing: CITY" in merge.detail

    wrong = profile.model_copy(
        update={"lists": {"newsletter": profile.lists["newsletter"].model_copy(update={"id": "0000000000"})}}
    )
    found = {result.name: result for result in run_checks(wrong, clock=clock)}
    assert not found["audience 0000000000 (lists.newsletter)"].ok

    (tmp_path / "mailchimp.key").write_text("0" * 32 + "-us19", encoding="utf-8")
    [*_, api] = run_checks(profile, clock=clock)
    assert api.name == f"Mailchimp API {mailchimp.url}" and not api.ok and "API key" in api.detail


def test_summary_mail_counts_the_calls_and_attaches_the_refused_rows(
    sync: Sync, mailchimp: MailchimpServer, clock: ManualClock
) -> None:
    audience(mailchimp).forgotten.add(subscriber_hash("bob@example.com"))

    report = sync.run("full")

    assert report is not None and report.imported is not None and report.exported is not None
    calls = report.imported.api_calls + report.exported.api_calls
    assert report.imported.api_calls >= 4  # a members query per report stream
    message = summary_message(sync.profile, report)
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"Provider API calls this run: {calls}" in text
    assert "REFUSED by the provider, list newsletter: 1 rows" in text and "1 rows refused" in message["Subject"]
    [attached] = [part for part in message.iter_attachments()]
    assert attached.get_filename().endswith(".rejected.csv") and "bob@example.com" in attached.get_content()


def test_campaign_opens_clicks_and_bounces_become_activities(
    sync: Sync, mailchimp: MailchimpServer, clock: ManualClock
) -> None:
    sync.export("full")
    sent = clock.now() - timedelta(days=2)
    mailchimp.add_campaign("c1", LIST_ID, sent)
    mailchimp.add_campaign("old", LIST_ID, clock.now() - timedelta(days=90))  # outside the 30 days: not read
    mailchimp.add_activity("c1", "alice@example.com", "open", sent + timedelta(hours=1))
    mailchimp.add_activity("c1", "alice@example.com", "click", sent + timedelta(hours=2), url="https://example.com/a")
    mailchimp.add_activity("c1", "dave@example.com", "bounce", sent + timedelta(minutes=5), type="hard")
    mailchimp.add_activity("old", "bob@example.com", "open", clock.now() - timedelta(days=1))

    sync.import_files()

    with sync.engine.connect() as connection:
        kinds = connection.execute(
            select(activities.c.contact_id, activities.c.kind)
            .where(activities.c.kind.in_(("open", "click", "bounce")))
            .order_by(activities.c.contact_id, activities.c.kind)
        ).all()
    assert [tuple(row) for row in kinds] == [(1, "click"), (1, "open"), (4, "bounce")]
    assert status_of(sync.engine, 4, "newsletter") == "cleaned"
    clock.advance(3600)
    mailchimp.add_activity("c1", "bob@example.com", "open", clock.now() - timedelta(minutes=1))
    [again] = [outcome for outcome in sync.import_files().files if outcome.name.startswith("email_activity_")]
    assert again.rows == 1  # only what happened since the last collect (and its few minutes of overlap)


def test_a_subscribed_row_never_overrides_what_mailchimp_holds(sync: Sync, mailchimp: MailchimpServer) -> None:
    mailchimp.add_member(LIST_ID, "bob@example.com", "unsubscribed")  # opted out there, not collected yet
    mailchimp.add_member(LIST_ID, "grace@example.com", "pending")  # has not confirmed yet

    [exported] = sync.export("full").files

    assert statuses(mailchimp)["bob@example.com"] == "unsubscribed"
    assert statuses(mailchimp)["grace@example.com"] == "pending"  # no upsert skips Mailchimp's double opt-in
    assert exported.rejected == 1
    [report] = [path for path in exported.reports if path.name.endswith(".rejected.csv")]
    text = report.read_text(encoding="utf-8")
    assert "bob@example.com" in text and "holds the address unsubscribed" in text
    assert not [body for body in put_bodies(mailchimp) if body.get("status") == "subscribed"]
