"""What is Flexmail's own in the flexmail transport, against the fake Flexmail REST API (tests/flexmail_server.py)
over real HTTP: contacts created once with their names, language and source; the per-minute pace and 429s; the
monthly budget that stops sending and leaves the rest for later; check. The scenarios every API transport shares
(its webhooks through the real ``batchsync serve`` among them) are in tests/test_api_scenarios.py."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchsync.check import run_checks
from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.sync import Sync
from batchsync.transport import open_transport

from .conftest import ROOT
from .crmdata import build_tiny_crm
from .flexmail_server import FlexmailServer

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
