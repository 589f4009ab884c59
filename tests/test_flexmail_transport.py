"""The flexmail transport against the fake Flexmail REST API (tests/flexmail_server.py) over real HTTP: a full
export and a diff become contact creates, updates and unsubscribes; Flexmail's refusals go to the errors file and
out again; a crash between the sending and the ledger sends again to the same state; 429s and the per-minute
pace slow the run without failing it; a monthly budget stops sending and leaves the rest for later; and
unsubscribes and bounces at Flexmail come back through its webhooks into the real ``batchsync serve``."""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import batchsync.export
from batchsync.check import run_checks
from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.errors import DatabaseError
from batchsync.sync import Sync
from batchsync.transport import open_transport

from .conftest import ROOT
from .crmdata import build_tiny_crm, status_of
from .flexmail_server import FlexmailServer
from .peers import free_port
from .test_unattended import wait_until

ACTIVE = {"alice@example.com", "bob@example.com", "dave@example.com", "eve@example.com", "ivan@example.com"}
HOOK_KEY = "flexmail-hook-secret-42"


@pytest.fixture
def flexmail(clock: ManualClock) -> Iterator[FlexmailServer]:
    with FlexmailServer() as server:
        server.clock = clock.now  # the per-minute window and ours on one clock
        server.add_source("CRM", 1)
        server.add_custom_field("city", "City")
        yield server


def profile_text(tmp_path: Path, server: FlexmailServer, **transport: object) -> str:
    """The shipped profile, pointed at the fake, a work folder and a database (the token and URL by variable)."""
    text = (ROOT / "profiles" / "flexmail-api.toml").read_text(encoding="utf-8")
    text = text.replace('dir = "../var/flexmail-api"', f'dir = "{tmp_path / "work"}"')
    text = text.replace('url = "https://api.flexmail.eu"', f'url = "{server.url}"')
    text = text.replace('user = "123456"', f'user = "{server.account_id}"')
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in transport.items())
    return text.replace("max_per_minute = 60\n", "max_per_minute = 60\n" + extra)


@pytest.fixture
def environment(tmp_path: Path, flexmail: FlexmailServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "BATCHSYNC_CRM_URL": f"sqlite:///{tmp_path / 'crm.sqlite'}",
        "BATCHSYNC_FLEXMAIL_TOKEN": flexmail.token,
        "BATCHSYNC_FLEXMAIL_HOOK_KEY": HOOK_KEY,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def ready(tmp_path: Path, server: FlexmailServer, clock: ManualClock, **transport: object) -> Sync:
    path = tmp_path / "flexmail-api.toml"
    path.write_text(profile_text(tmp_path, server, **transport), encoding="utf-8")
    sync = Sync(load_profile(path), clock=clock, transport_factory=lambda p: open_transport(p, clock))
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


@pytest.fixture
def sync(tmp_path: Path, flexmail: FlexmailServer, clock: ManualClock, environment: dict[str, str]) -> Sync:
    return ready(tmp_path, flexmail, clock)


def active(server: FlexmailServer) -> set[str]:
    with server.api.lock:
        return {contact.email for contact in server.api.contacts.values() if contact.status == "active"}


def leave_segment(sync: Sync, contact_id: int) -> None:
    from sqlalchemy import update

    from batchsync.db.schema import contacts

    with sync.engine.begin() as connection:
        connection.execute(update(contacts).where(contacts.c.id == contact_id).values(custom={"newsletter": "0"}))


def test_full_export_creates_each_contact_once_with_its_fields(sync: Sync, flexmail: FlexmailServer) -> None:
    result = sync.export("full")

    assert active(flexmail) == ACTIVE  # lower-cased (" Eve@Example.com "), the invalid and suppressed not there
    alice = flexmail.contact("alice@example.com")
    assert alice is not None and (alice.first_name, alice.name, alice.language) == ("Alice", "Ädler", "nl")
    assert alice.sources == [1]
    assert result.rejected == 0 and result.api_calls >= 2 * len(ACTIVE)
    assert sync.export("diff").rows == 0


def test_an_address_that_leaves_the_list_is_unsubscribed_at_flexmail(
    sync: Sync, flexmail: FlexmailServer, clock: ManualClock
) -> None:
    sync.export("full")
    clock.advance(3600)
    leave_segment(sync, 2)

    result = sync.export("diff")

    assert result.rows == 1 and result.files[0].tombstones == 1
    bob = flexmail.contact("bob@example.com")
    assert bob is not None and bob.status == "unsubscribed"
    assert active(flexmail) == ACTIVE - {"bob@example.com"}


def test_refused_row_goes_to_the_errors_file_and_out_again(
    sync: Sync, flexmail: FlexmailServer, clock: ManualClock
) -> None:
    flexmail.add_contact("dave@example.com")
    flexmail.unsubscribe_at_flexmail("dave@example.com", reason="left by the link")  # blacklisted at Flexmail

    [exported] = sync.export("full").files

    assert exported.rejected == 1
    [report] = [path for path in exported.reports if path.name.endswith(".rejected.csv")]
    with report.open(encoding="utf-8", newline="") as handle:
        [row] = list(csv.DictReader(handle, delimiter=";"))
    assert row["email"] == "dave@example.com" and "blacklisted" in row["reason"]
    clock.advance(3600)
    again = sync.export("diff")  # its ledger row kept its old state: it goes again, and is refused again
    assert again.rows == 1 and again.rejected == 1


def test_crash_between_the_calls_and_the_ledger_sends_again_to_the_same_state(
    sync: Sync, flexmail: FlexmailServer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise DatabaseError("the database went away after Flexmail took the rows")

    original = batchsync.export.commit_pending
    monkeypatch.setattr(batchsync.export, "commit_pending", crash)
    with pytest.raises(DatabaseError):
        sync.export("full")
    before = {c.email: (c.first_name, c.status) for c in flexmail.api.contacts.values()}
    monkeypatch.setattr(batchsync.export, "commit_pending", original)
    clock.advance(60)

    # every row again (at least once; the five and the suppressed frank): updates, no second contact
    assert sync.export("diff").rows == len(ACTIVE) + 1
    assert {c.email: (c.first_name, c.status) for c in flexmail.api.contacts.values()} == before
    assert sync.export("diff").rows == 0


def test_429_and_the_per_minute_limit_slow_the_run_and_the_calls_are_counted(
    sync: Sync, flexmail: FlexmailServer, clock: ManualClock
) -> None:
    flexmail.fail_next(2, status=429)
    flexmail.per_minute_limit = 4  # a stricter account: the transport's pace of 60 a minute meets 429s
    started = clock.monotonic()

    result = sync.export("full")

    assert active(flexmail) == ACTIVE and result.rejected == 0
    assert clock.monotonic() - started >= 60  # it waited for new minutes
    assert result.api_calls == flexmail.request_count


def test_monthly_budget_stops_sending_and_leaves_the_rest_for_later(
    tmp_path: Path, flexmail: FlexmailServer, clock: ManualClock, environment: dict[str, str]
) -> None:
    sync = ready(tmp_path, flexmail, clock, monthly_calls=5)

    result = sync.export("full")

    [exported] = result.files
    assert result.api_calls == 5 and exported.api_calls == 4  # the connection's call, then find + create twice
    assert len(active(flexmail)) == 2 and flexmail.request_count == 5
    assert exported.rejected == len(ACTIVE) + 1 - 2  # the rows left: refused as "not sent", kept for later
    clock.advance(31 * 86400)  # next month: five calls more, two rows more
    assert sync.export("diff").rejected == 2 and len(active(flexmail)) == 4
    clock.advance(31 * 86400)
    assert sync.export("diff").rejected == 0 and active(flexmail) == ACTIVE


def test_check_reports_the_account_source_language_custom_fields_and_webhooks(
    tmp_path: Path, flexmail: FlexmailServer, clock: ManualClock, environment: dict[str, str]
) -> None:
    sync = ready(tmp_path, flexmail, clock)
    del flexmail.api.custom_fields["city"]

    found = {result.name: result for result in run_checks(sync.profile, clock=clock)}

    assert found[f"Flexmail API {flexmail.url}"].ok
    assert found["Flexmail source"].ok and found["Flexmail language"].ok
    assert not found["Flexmail custom fields"].ok and "missing: city" in found["Flexmail custom fields"].detail
    assert not found["Flexmail webhooks"].ok
    os.environ["BATCHSYNC_FLEXMAIL_TOKEN"] = "wrong"
    [*_, api] = run_checks(sync.profile, clock=clock)
    assert not api.ok and "credentials refused" in api.detail


def test_unsubscribe_and_bounce_at_flexmail_come_back_through_its_webhooks(
    tmp_path: Path, flexmail: FlexmailServer, clock: ManualClock, environment: dict[str, str]
) -> None:
    sync = ready(tmp_path, flexmail, clock)
    sync.export("full")
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "batchsync.cli", "serve", "-p", str(tmp_path / "flexmail-api.toml")]
    with log.open("wb") as handle:
        serve = subprocess.Popen(
            [*command, "--listen", f"127.0.0.1:{port}"], stdout=handle, stderr=handle, env={**os.environ, **environment}
        )
    try:
        target = f"http://127.0.0.1:{port}/hooks/flexmail-api/flexmail?key={HOOK_KEY}"
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), log)
        for event in ("contact.unsubscribed", "contact.bounced_out"):
            _register(flexmail, event, target)
        flexmail.unsubscribe_at_flexmail("bob@example.com", reason="too many mails")
        flexmail.bounce("alice@example.com")
        assert [d.status for d in flexmail.deliveries] == [200, 200], flexmail.deliveries
        inbox = tmp_path / "work" / "inbox"
        wait_until(lambda: any(inbox.glob("callback_flexmail.*.csv")), log)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, log.read_text()

    clock.advance(3600)
    report = sync.run("diff")

    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(sync.engine, 1, "newsletter") == "cleaned"
    assert report is not None and report.exported is not None
    assert report.exported.rows == 0  # Flexmail's own opt-outs are not sent back to it
    assert {outcome.name.split(".")[0] for outcome in report.imported.files} == {"callback_flexmail"}  # type: ignore[union-attr]
    assert sum(outcome.changed for outcome in report.imported.files) >= 1  # type: ignore[union-attr]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _register(server: FlexmailServer, event: str, target: str) -> None:
    """An admin registers batchsync's callback at Flexmail (POST /webhooks)."""
    body = json.dumps({"event_name": event, "target_url": target}).encode()
    credentials = base64.b64encode(f"{server.account_id}:{server.token}".encode()).decode()
    request = urllib.request.Request(
        server.url + "/webhooks",
        data=body,
        headers={"Authorization": f"Basic {credentials}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 201
