"""Consent, both ways, through the command line: the provider's opt-outs remembered for good, origins deciding
who must be told, the export's safety stop, and dates from the future."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from batchsync.db import snapshots
from batchsync.db.schema import contacts, subscriptions

from .crmdata import join_list, leave_list, read_csv, set_status, status_of, unsub_row, write_csv
from .usercli import CHANGES_KIND, User, hours_ago, mailup_time, opt_out


@pytest.fixture
def user(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[User]:
    person = User(tmp_path, db_url, capsys, extra=CHANGES_KIND)
    yield person.start()
    person.close()


def test_an_opt_out_the_crm_had_already_made_is_still_the_provider_s_and_remembered(user: User) -> None:
    user.export("--full")
    set_status(user.engine, 2, "newsletter", "unsubscribed", hours_ago(3))
    assert user.export("--diff") == {"1": {"bob@example.com": "0"}}
    user.provider_file([opt_out("bob@example.com")])  # MailUp reports its own opt-out of bob after ours
    assert user.batchsync("import").code == 0
    assert ("newsletter", "bob@example.com") in user.provider_optouts()
    set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(1))  # re-subscribed in the CRM, no consent
    assert "bob@example.com" not in user.export("--diff").get("1", {})
    set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(0.5), consent_by="phone call")
    assert "bob@example.com" not in user.export("--full").get("1", {})  # MailUp has no pending: nothing at all


@pytest.mark.parametrize("how", ["left the list", "went pending"])
def test_an_address_that_left_the_list_after_the_provider_s_opt_out_is_not_sent_back(user: User, how: str) -> None:
    user.export("--full")
    user.provider_file([opt_out("bob@example.com")])
    assert user.batchsync("import").code == 0
    if how == "left the list":
        leave_list(user.engine, 2, "newsletter")
    else:
        set_status(user.engine, 2, "newsletter", "pending", hours_ago(1.5))
    user.export("--diff")  # the ledger forgets the address's row
    if how == "left the list":
        join_list(user.engine, 2, "newsletter", "subscribed", hours_ago(1))
    else:
        set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(1))
    assert "bob@example.com" not in user.export("--diff").get("1", {})
    assert "bob@example.com" not in user.export("--full").get("1", {})


def test_an_opt_out_reported_before_the_first_export_is_remembered(user: User) -> None:
    user.provider_file([opt_out("bob@example.com")])
    assert user.batchsync("run", "--full").code == 0  # a first run imports, then exports
    assert user.uploaded()["1"]["bob@example.com"] == "0"  # a full export says every address's status
    set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(1))
    assert "bob@example.com" not in user.export("--diff").get("1", {})


@pytest.mark.parametrize("new", ["Bob@Example.COM", "robert@example.com"])
def test_an_email_change_carries_the_provider_s_opt_out_to_the_address_it_leads_to(user: User, new: str) -> None:
    user.export("--full")
    user.provider_file([opt_out("bob@example.com")])
    user.provider_file([["bob@example.com", new]], kind="changes", header=["old_email", "new_email"])
    assert user.batchsync("import").code == 0
    with user.engine.connect() as connection:
        assert connection.scalar(select(contacts.c.email).where(contacts.c.id == 2)) == new
        held = snapshots.rows_for_keys(connection, "mailup", [new.lower()])
        assert "newsletter" in held["list_code"].to_list()  # the ledger's row followed the address
    assert {("newsletter", "bob@example.com"), ("newsletter", new.lower())} <= set(user.provider_optouts())
    set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(1))
    sent = user.export("--diff").get("1", {})
    assert sent.get(new.lower()) != "1" and sent.get("bob@example.com") != "1"


def test_a_re_subscription_with_consent_after_the_opt_out_never_goes_out_as_subscribed(user: User) -> None:
    user.export("--full")
    user.provider_file([opt_out("bob@example.com")])
    user.batchsync("import")
    set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(1), consent_by="web form")
    assert "bob@example.com" not in user.export("--diff").get("1", {})
    assert "bob@example.com" not in user.export("--full").get("1", {})


def test_two_email_changes_to_one_address_in_one_file_the_second_is_refused(user: User) -> None:
    rows = [["bob@example.com", "new@example.com"], ["carol@example.com", "NEW@example.com"]]
    user.provider_file(rows, kind="changes", header=["old_email", "new_email"])
    done = user.batchsync("import")
    assert done.code == 3 and "1 rejected" in done.out
    with user.engine.connect() as connection:
        query = select(contacts.c.id, contacts.c.email).where(contacts.c.id.in_((2, 3)))
        emails = {row[0]: row[1] for row in connection.execute(query)}
    assert emails == {2: "new@example.com", 3: "carol@example.com"}
    [errors] = list((user.tmp_path / "work" / "archive").glob("changes_*.errors.csv"))
    line, reason = read_csv(errors)[1][-3:-1]
    assert line == "3" and "belongs to another contact (2)" in reason


def test_an_admin_s_opt_outs_go_out_and_the_provider_s_are_not_echoed(user: User) -> None:
    user.export("--full")
    user.admin_file([opt_out("alice@example.com")])  # an admin's file in the local inbox: a CRM-side change
    user.provider_file([opt_out("bob@example.com")])  # MailUp's own
    assert user.batchsync("import").code == 0
    assert user.export("--diff") == {"1": {"alice@example.com": "0"}}
    fetched = write_csv(user.tmp_path / "unsubscribers_fetched.csv", [read_csv(user.admin_file([]))[0]])
    write_csv(fetched, [read_csv(fetched)[0], opt_out("dave@example.com", list_id="2")])
    assert user.batchsync("import", "--file", str(fetched), "--origin", "provider").code == 0
    assert user.export("--diff") == {}  # a MailUp file an admin fetched by hand: MailUp knows already
    by_hand = write_csv(user.tmp_path / "unsubscribers_ivan.csv", [read_csv(fetched)[0], opt_out("ivan@example.com")])
    assert user.batchsync("import", "--file", str(by_hand)).code == 0
    assert user.export("--diff") == {"1": {"ivan@example.com": "0"}}
    origins = {(contact, code): origin for contact, code, _status, origin in user.origins()}
    assert origins == {
        (1, "newsletter"): "admin",
        (2, "newsletter"): "provider",
        (4, "offers"): "provider",
        (11, "newsletter"): "admin",
    }
    with user.engine.connect() as connection:
        source = connection.scalar(select(subscriptions.c.source).where(subscriptions.c.contact_id == 1))
    assert source == "admin"


def test_origin_is_only_for_named_files(user: User) -> None:
    done = user.batchsync("import", "--origin", "provider")
    assert done.code == 2 and "--origin applies to files named with --file" in done.err


@pytest.mark.parametrize("mistake", ["list cleared", "contacts deleted"])
def test_an_export_that_would_mass_unsubscribe_stops_before_uploading(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str], mistake: str
) -> None:
    user = User(tmp_path, db_url, capsys, policy="safety_min_export_unsubscribes = 3").start()
    try:
        user.export("--full")
        with user.engine.begin() as connection:
            if mistake == "list cleared":
                connection.execute(delete(subscriptions).where(subscriptions.c.list_id == 1))
            else:
                connection.execute(update(contacts).values(deleted=True))
        stopped = user.batchsync("export", "--diff")
        assert stopped.code == 1
        assert "safety stop: the export would take" in stopped.err and "export with --force" in stopped.err
        assert user.uploaded() == {}  # nothing reached the provider
        held = sorted((tmp_path / "work" / "held").glob("*.csv"))
        assert held and "safety stop" in held[0].with_name(held[0].name + ".reason.txt").read_text()
        assert user.batchsync("export", "--diff").code == 1  # the ledger did not move: it stops again
        forced = user.export("--diff", "--force")
        assert set(forced["1"].values()) == {"0"} and "alice@example.com" in forced["1"]
        assert user.export("--diff") == {}
    finally:
        user.close()


def test_a_few_opt_outs_pass_the_export_safety_stop(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    user = User(tmp_path, db_url, capsys, policy="safety_min_export_unsubscribes = 3").start()
    try:
        user.export("--full")
        for contact in (1, 2):  # two of eight: under the minimum count
            set_status(user.engine, contact, "newsletter", "unsubscribed", hours_ago(1))
        assert user.export("--diff") == {"1": {"alice@example.com": "0", "bob@example.com": "0"}}
    finally:
        user.close()


def test_an_opt_out_from_the_future_is_a_rejected_row(user: User) -> None:
    in_years = unsub_row("judy@example.com", "1", mailup_time(hours_ago(-3 * 365 * 24)), "2")
    soon = unsub_row("bob@example.com", "1", mailup_time(hours_ago(-2)), "2")  # within the day's tolerance
    user.provider_file([in_years, soon])
    done = user.batchsync("import")
    assert done.code == 3 and "1 rejected" in done.out
    assert status_of(user.engine, 12, "newsletter") == "subscribed"  # judy's consented re-subscription stands
    assert status_of(user.engine, 2, "newsletter") == "unsubscribed"
    [errors] = list((user.tmp_path / "work" / "archive").glob("unsubscribers_*.errors.csv"))
    line, reason = read_csv(errors)[1][-3:-1]
    assert line == "2" and "is in the future, beyond the tolerance of 1d (inbound.future_tolerance)" in reason
    assert ("newsletter", "judy@example.com") not in user.provider_optouts()


def test_a_latest_opt_out_in_one_file_is_the_one_kept(user: User) -> None:
    later, earlier = hours_ago(2), hours_ago(30)
    rows = [
        unsub_row("bob@example.com", "1", mailup_time(later), "2"),
        unsub_row("bob@example.com", "1", mailup_time(earlier), "4"),  # an older row after a newer one
        unsub_row("alice@example.com", "1", mailup_time(earlier), "2"),
        unsub_row("alice@example.com", "1", mailup_time(later), "8"),  # then a later hard bounce
    ]
    rows.append(unsub_row("dave@example.com", "1", mailup_time(earlier), "8"))  # a hard bounce, then...
    rows.append(unsub_row("dave@example.com", "1", mailup_time(later), "2"))  # ...a later unsubscribe
    user.provider_file(rows)
    assert user.batchsync("import").code == 0
    assert status_of(user.engine, 4, "newsletter") == "cleaned"  # an unsubscribe does not undo a bounce
    with user.engine.connect() as connection:
        s = subscriptions.c
        query = select(s.contact_id, s.status_at).where(s.list_id == 1, s.contact_id.in_((1, 2)))
        got = {row[0]: row[1] for row in connection.execute(query)}
    assert got == {1: later, 2: later}
    assert status_of(user.engine, 1, "newsletter") == "cleaned"
    assert user.provider_optouts()[("newsletter", "bob@example.com")] == later
    # A consent given between the two opt-outs does not beat the later one.
    set_status(user.engine, 2, "newsletter", "subscribed", later - timedelta(hours=1), consent_by="phone")
    assert "bob@example.com" not in user.export("--full").get("1", {})


def test_a_remote_inbox_folder_that_does_not_exist_is_an_error_not_an_empty_inbox(user: User) -> None:
    (user.provider / "export").rmdir()  # a mistyped inbound.remote_dir would look the same
    user.admin_file([opt_out("bob@example.com")])
    done = user.batchsync("import")
    assert done.code == 2
    assert "inbound unsubscribers: the remote folder 'export' does not exist on the server" in done.err
    assert "import: no new files" not in done.out
    (user.provider / "export").mkdir()
    assert user.batchsync("import").code == 0  # the admin's file waited in staging: nothing lost
    assert status_of(user.engine, 2, "newsletter") == "unsubscribed"


def test_a_provider_s_file_imported_again_by_hand_is_still_the_provider_s(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider's file the safety stop quarantined, imported again with --file --force, and the errors file of
    a provider's file, fixed and dropped into the local inbox: both are the provider's reports, remembered."""
    user = User(tmp_path, db_url, capsys, policy="safety_min_unsubscribes = 2").start()
    try:
        user.export("--full")
        user.provider_file([opt_out(email) for email in ("alice@example.com", "bob@example.com", "dave@example.com")])
        assert user.batchsync("import").code == 3  # 3 of 8: the safety stop
        [held] = [p for p in (tmp_path / "work" / "quarantine").glob("*.csv")]
        assert user.batchsync("import", "--file", str(held), "--force").code == 0
        assert ("newsletter", "alice@example.com") in user.provider_optouts()
        assert user.export("--diff") == {}  # the provider's own: not echoed
        user.provider_file([opt_out("ivan@example.com"), unsub_row("judy@example.com", "1", "not a date", "2")])
        assert user.batchsync("import").code == 3
        [errors] = [p for p in (tmp_path / "work" / "archive").glob("*.errors.csv") if len(read_csv(p)) > 1]
        header, row = read_csv(errors)
        assert header[-3:] == ["bs_line", "bs_reason", "bs_origin"] and row[-1] == "provider"
        row[3] = mailup_time(hours_ago(1))
        write_csv(user.inbox / "unsubscribers_fixed.csv", [header, row])
        assert user.batchsync("import").code == 0
        assert ("newsletter", "judy@example.com") in user.provider_optouts()
        assert user.export("--diff") == {}
    finally:
        user.close()
