"""One scenario suite for every API transport (Mailchimp, Acoustic, Flexmail), each against its provider's fake
server over real HTTP (and Acoustic's files through OpenSSH's sshd): a full export and a diff reach the provider;
an opt-out and a clean at the provider come back and are not echoed; a row the provider refuses lands in the
errors file with its reason and goes out again; a crash between the provider's verdict and the ledger sends
again to the same state; 429s slow the run down and the calls are counted. The peers are in tests/api_peers.py."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest

import batchsync.export
from batchsync.clock import ManualClock
from batchsync.errors import DatabaseError

from .api_peers import KINDS, AcousticPeer, ApiPeer, FlexmailPeer, MailchimpPeer, address
from .crmdata import status_of


@pytest.fixture(params=KINDS)
def peer(
    request: pytest.FixtureRequest, tmp_path: Path, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiPeer]:
    with ExitStack() as stack:
        if request.param == "mailchimp":
            mailchimp = MailchimpPeer(tmp_path, clock, stack)
            mailchimp.start()
            yield mailchimp
        elif request.param == "acoustic":
            acoustic = AcousticPeer(tmp_path, clock, stack)
            acoustic.start(request.getfixturevalue("sshd"), monkeypatch)
            yield acoustic
        else:
            flexmail = FlexmailPeer(tmp_path, clock, stack)
            flexmail.start(monkeypatch)
            yield flexmail


def test_full_export_reaches_the_provider(peer: ApiPeer) -> None:
    result = peer.sync.export("full")

    assert peer.subscribed() == {address(name) for name in peer.subscribed_names}
    assert result.rejected == 0 and result.api_calls > 0
    assert peer.sync.export("diff").rows == 0  # the ledger moved with the provider's verdict


def test_diff_sends_the_contact_taken_off_the_list(peer: ApiPeer, clock: ManualClock) -> None:
    peer.sync.export("full")
    clock.advance(3600)
    peer.take_off(2)  # bob

    result = peer.sync.export("diff")

    assert result.rows == 1
    assert peer.held()[address("bob")] == "unsubscribed"
    assert peer.subscribed() == {address(name) for name in peer.subscribed_names - {"bob"}}


def test_opt_out_and_clean_at_the_provider_reach_the_crm_and_are_not_echoed(peer: ApiPeer, clock: ManualClock) -> None:
    peer.sync.export("full")
    clock.advance(3600)
    peer.opt_out("bob", clock.now() - timedelta(minutes=5))
    peer.clean("alice", clock.now() - timedelta(minutes=5))
    peer.reports_in()
    clock.advance(60)

    report = peer.sync.run("diff")

    assert status_of(peer.sync.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(peer.sync.engine, 1, "newsletter") == "cleaned"
    assert report is not None and report.exported is not None and report.exported.rows == 0
    assert peer.held()[address("bob")] == "unsubscribed"  # nothing sent back over the provider's own verdict


def test_a_refused_row_lands_in_the_errors_file_and_goes_out_again(peer: ApiPeer, clock: ManualClock) -> None:
    peer.refuse("bob")

    [exported] = peer.sync.export("full").files

    assert exported.rejected == 1
    [report] = [path for path in exported.reports if path.name.endswith(".rejected.csv")]
    delimiter = peer.sync.profile.export.delimiter
    with report.open(encoding="utf-8", newline="") as handle:
        [row] = list(csv.DictReader(handle, delimiter=delimiter))
    assert row["email"].strip().lower() == address("bob") and row["reason"] and row["list"] == "newsletter"
    assert peer.held().get(address("bob")) != "subscribed"
    clock.advance(3600)
    again = peer.sync.export("diff")  # nothing changed in the CRM: its ledger row kept its old state
    assert again.rows == 1 and again.rejected == 1
    peer.accept("bob")
    clock.advance(3600)
    assert peer.sync.export("diff").rejected == 0
    assert peer.held()[address("bob")] == "subscribed"


def test_a_crash_between_the_providers_verdict_and_the_ledger_sends_again_to_the_same_state(
    peer: ApiPeer, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise DatabaseError("the database went away after the provider took the rows")

    original = batchsync.export.commit_pending
    monkeypatch.setattr(batchsync.export, "commit_pending", crash)
    with pytest.raises(DatabaseError):
        peer.sync.export("full")
    crashed = peer.held()
    monkeypatch.setattr(batchsync.export, "commit_pending", original)
    clock.advance(60)

    again = peer.sync.export("diff")  # the ledger never moved: every row again, at least once

    assert again.rows >= len(peer.subscribed_names) and again.rejected == 0
    assert peer.held() == crashed  # upserts by address: the provider ends where it was, no row twice
    assert peer.sync.export("diff").rows == 0


def test_429s_slow_the_run_down_and_the_calls_are_counted(peer: ApiPeer, clock: ManualClock) -> None:
    peer.fail_next(3, 429)
    started = clock.monotonic()

    result = peer.sync.export("full")

    assert peer.subscribed() == {address(name) for name in peer.subscribed_names}
    assert clock.monotonic() - started >= 1 + 2 + 4  # waited before each new try
    assert result.api_calls == peer.api_requests()
