"""An address's history and the revert of an applied file, through the command line on SQLite, PostgreSQL and the
mapped example CRM of samples/mapped_crm (views over the CRM's own tables, on PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, func, select, text, update

from batchsync.db import crm
from batchsync.db.mapping import crm_tables
from batchsync.db.schema import activities, bs_changes, bs_files, bs_runs, contacts, subscriptions
from batchsync.dbconfig import CRM_TABLES

from .conftest import WITH_MAPPED_CRM, backend_url
from .crmdata import T0, read_csv, set_status, status_of, suppressed, unsub_row, write_csv
from .usercli import CHANGES_KIND, User, hours_ago, mailup_time, opt_out


@pytest.fixture(params=WITH_MAPPED_CRM)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, PostgreSQL, and the CRM of one's own of samples/mapped_crm (views over other tables) on PostgreSQL."""
    return backend_url(request, tmp_path)


@pytest.fixture
def user(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[User]:
    person = User(tmp_path, db_url, capsys, extra=CHANGES_KIND)
    yield person.start()
    person.close()


def relation(connection: Connection, name: str) -> str:
    """A table's name as SQL: a CRM table where the profile has it (a view of the mapped CRM), a bs_ table as is."""
    return crm_tables(connection).sql_name(name, connection) if name in CRM_TABLES else name


def subscription_rows(user: User) -> dict[tuple[int, int], tuple[Any, ...]]:
    """Every subscription: (contact, list) -> status, status time, source, reason, consent."""
    s = subscriptions.c
    query = select(s.contact_id, s.list_id, s.status, s.status_at, s.source, s.reason, s.consent_by, s.consent_at)
    with user.engine.connect() as connection:
        return {(row[0], row[1]): tuple(row[2:]) for row in connection.execute(query)}


def file_outcomes(user: User) -> dict[str, str]:
    with user.engine.connect() as connection:
        return {row[0]: row[1] for row in connection.execute(select(bs_files.c.name, bs_files.c.outcome))}


def reverts(user: User) -> list[tuple[Any, ...]]:
    c = bs_changes.c
    query = select(c.contact_id, c.list_code, c.old_status, c.new_status, c.source_file, c.origin, c.run_id)
    with user.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query.where(c.rule == "revert").order_by(c.contact_id))]


def test_history_shows_changes_activities_exported_rows_and_the_provider_s_opt_outs(user: User) -> None:
    user.export("--full")
    user.admin_file([opt_out("dave@example.com", list_id="2")])  # unsubscribers_1.csv, line 2
    assert user.batchsync("import").code == 0
    user.export("--diff")
    user.provider_file([opt_out("dave@example.com", hours=1)])  # unsubscribers_2.csv, line 2
    user.provider_file([["dave@example.com", "david@example.com"]], kind="changes", header=["old_email", "new_email"])
    assert user.batchsync("import").code == 0
    done = user.batchsync("history", " DAVE@example.com ", "--json")
    assert done.code == 0, done.err
    found = json.loads(done.out)
    assert found["key"] == "dave@example.com" and found["contacts"] == [4]  # the contact that moved away
    entries = found["entries"]
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    [admin] = [e for e in entries if e["what"] == "change" and e["file"] == "unsubscribers_1.csv"]
    assert (admin["contact"], admin["list"], admin["detail"], admin["origin"]) == (
        4,
        "offers",
        "subscribed -> unsubscribed",
        "admin",
    )
    assert (admin["rule"], admin["line"], admin["profile"]) == ("opt-out newer than CRM state", 2, "mailup")
    with user.engine.connect() as connection:
        run = connection.scalar(select(bs_files.c.run_id).where(bs_files.c.name == "unsubscribers_1.csv"))
    assert admin["run"] == run
    [moved] = [e for e in entries if e["what"] == "change" and e["file"].startswith("changes_")]
    assert moved["detail"] == "address dave@example.com -> david@example.com" and moved["origin"] == "provider"
    activity = [e for e in entries if e["what"] == "activity" and e["file"] == "unsubscribers_2.csv"]
    assert activity and activity[0]["line"] == 2 and activity[0]["origin"] == "provider"
    assert activity[0]["run"] is not None
    sent = [e for e in entries if e["what"] == "exported" and e["list"] == "offers"]
    assert sent and sent[0]["detail"].startswith("unsubscribed (sent)") and sent[0]["file"].startswith("import/2/")
    remembered = [e for e in entries if e["what"] == "provider opt-out"]
    assert [e["detail"].split(" remembered")[0] for e in remembered] == [
        "unsubscribe of dave@example.com",
        "unsubscribe of david@example.com",  # carried to the address the provider changed it to
    ]
    assert {(e["list"], e["file"], e["line"]) for e in remembered} == {("newsletter", "unsubscribers_2.csv", 2)}
    table = user.batchsync("history", "dave@example.com")
    assert table.code == 0 and "unsubscribers_1.csv:2" in table.out and "provider opt-out" in table.out
    assert "address dave@example.com -> david@example.com" in table.out
    # The new address's history finds the same contact.
    assert json.loads(user.batchsync("history", "david@example.com", "--json").out)["contacts"] == [4]


def test_history_of_an_address_nothing_is_known_of(user: User) -> None:
    done = user.batchsync("history", "nobody@example.com")
    assert done.code == 0 and "nothing is known of nobody@example.com" in done.out
    assert json.loads(user.batchsync("history", "nobody@example.com", "--json").out)["entries"] == []


def test_revert_of_an_admin_file_applied_by_mistake_restores_and_the_next_diff_sends_subscribed(user: User) -> None:
    user.export("--full")
    before = subscription_rows(user)
    mistake = user.admin_file([opt_out(email) for email in ("alice@example.com", "bob@example.com")])
    mistake_rows = [opt_out("dave@example.com", code="4", list_id="2"), opt_out("alice@example.com", list_id="3")]
    write_csv(mistake, [*_rows(mistake), *mistake_rows])  # alice had no row on events: the file made one
    assert user.batchsync("import").code == 0
    sent = user.export("--diff")
    assert sent["1"] == {"alice@example.com": "0", "bob@example.com": "0"} and sent["2"] == {"dave@example.com": "0"}
    done = user.batchsync("revert", mistake.name)
    assert done.code == 0, done.err
    assert "4 changes undone, 0 left" in done.out
    assert subscription_rows(user) == before  # status, time, source, reason and consent as they were; alice's
    # events row (made by the file) removed again
    assert len(reverts(user)) == 4 and {row[5] for row in reverts(user)} == {"admin"}
    assert {row[4] for row in reverts(user)} == {mistake.name}
    with user.engine.connect() as connection:
        run = connection.execute(
            select(bs_runs.c.id, bs_runs.c.kind, bs_runs.c.outcome).order_by(bs_runs.c.id.desc())
        ).first()
        assert run is not None and tuple(run[1:]) == ("revert", "ok") and reverts(user)[0][6] == run[0]
        kinds = connection.scalars(select(activities.c.kind).where(activities.c.contact_id == 1))
        assert "revert" in list(kinds)
    assert file_outcomes(user)[mistake.name] == "reverted"
    sent = user.export("--diff")
    assert sent["1"] == {"alice@example.com": "1", "bob@example.com": "1"} and sent["2"] == {"dave@example.com": "1"}
    assert "1" not in sent.get("3", {}).values()
    history = json.loads(user.batchsync("history", "alice@example.com", "--json").out)["entries"]
    assert any(e["rule"] == "revert" and e["file"] == mistake.name for e in history)


def _rows(path: Path) -> list[list[str]]:
    return read_csv(path)


def test_revert_leaves_and_lists_what_something_newer_changed(user: User) -> None:
    first = user.admin_file(
        [opt_out(email, hours=5) for email in ("alice@example.com", "bob@example.com", "dave@example.com")]
    )
    assert user.batchsync("import").code == 0
    set_status(user.engine, 2, "newsletter", "subscribed", hours_ago(4), consent_by="phone")  # the CRM, by hand
    set_status(user.engine, 4, "newsletter", "subscribed", hours_ago(4), consent_by="phone")
    user.admin_file([opt_out("dave@example.com", hours=3)])  # a later file opts dave out again
    assert user.batchsync("import").code == 0
    after = subscription_rows(user)
    done = user.batchsync("revert", first.name)
    assert done.code == 0, done.err
    assert "1 changes undone, 2 left" in done.out
    assert "line 3 contact 2 bob@example.com newsletter: unsubscribed stays: changed since in the CRM" in done.out
    assert (
        "line 4 contact 4 dave@example.com newsletter: unsubscribed stays: changed since by opt-out newer than CRM "
        "state (unsubscribers_2.csv:2, admin, run"
    ) in done.out
    assert "line 2 contact 1 alice@example.com newsletter: unsubscribed -> subscribed" in done.out
    assert status_of(user.engine, 1, "newsletter") == "subscribed"
    now = subscription_rows(user)
    assert now[(2, 1)] == after[(2, 1)] and now[(4, 1)] == after[(4, 1)]  # left as they were


def test_revert_dry_run_changes_nothing(user: User) -> None:
    mistake = user.admin_file([opt_out("alice@example.com"), opt_out("bob@example.com")])
    assert user.batchsync("import").code == 0
    tables = ("subscriptions", "bs_changes", "bs_runs", "activities", "bs_files", "contacts")

    def snapshot() -> dict[str, Any]:
        with user.engine.connect() as connection:
            found = {
                name: connection.scalar(text(f"SELECT COUNT(*) FROM {relation(connection, name)}")) for name in tables
            }
        return {**found, "rows": subscription_rows(user), "files": file_outcomes(user)}

    before = snapshot()
    done = user.batchsync("revert", mistake.name, "--dry-run")
    assert done.code == 0 and "would revert" in done.out and "2 changes would be undone, 0 left" in done.out
    assert snapshot() == before
    assert user.batchsync("revert", mistake.name).code == 0  # the dry run left it revertible


def test_revert_of_a_provider_file_never_sends_its_opt_outs_as_subscribed(user: User) -> None:
    user.export("--full")
    report = user.provider_file([opt_out("alice@example.com"), opt_out("bob@example.com")])
    assert user.batchsync("import").code == 0
    assert user.export("--diff") == {}  # the provider's own: not echoed
    done = user.batchsync("revert", report.name)
    assert done.code == 0, done.err
    assert "2 changes undone" in done.out and "stay remembered" in done.out
    assert status_of(user.engine, 1, "newsletter") == "subscribed" == status_of(user.engine, 2, "newsletter")
    assert {("newsletter", "alice@example.com"), ("newsletter", "bob@example.com")} <= set(user.provider_optouts())
    assert user.export("--diff").get("1", {}).get("alice@example.com") != "1"
    full = user.export("--full")["1"]
    assert full.get("alice@example.com") != "1" and full.get("bob@example.com") != "1"
    assert full["dave@example.com"] == "1"  # the rest goes out as ever


def test_revert_does_not_opt_in_an_address_the_provider_reported_opted_out_since(user: User) -> None:
    """An admin's file opts bob out by mistake; then MailUp reports bob's own opt-out (the CRM changes nothing: he
    is out already). Reverting the admin's file must not make him subscribed in the CRM again."""
    user.export("--full")
    mistake = user.admin_file([opt_out("alice@example.com", hours=5), opt_out("bob@example.com", hours=5)])
    assert user.batchsync("import").code == 0
    user.provider_file([opt_out("bob@example.com", hours=1)])
    assert user.batchsync("import").code == 0
    done = user.batchsync("revert", mistake.name)
    assert done.code == 0, done.err
    assert "1 changes undone, 1 left" in done.out
    assert "the provider reported bob@example.com opted out of newsletter (unsubscribers_2.csv:2)" in done.out
    assert status_of(user.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(user.engine, 1, "newsletter") == "subscribed"


def test_revert_twice_is_refused_and_the_same_file_is_not_applied_again(user: User) -> None:
    mistake = user.admin_file([opt_out("alice@example.com")])
    assert user.batchsync("import").code == 0
    archived = next((user.tmp_path / "work" / "archive").glob(mistake.name))
    assert user.batchsync("revert", str(archived)).code == 0  # by the path it was archived at
    changes = len(reverts(user))
    again = user.batchsync("revert", mistake.name)
    assert again.code == 1 and "was reverted already" in again.err
    assert len(reverts(user)) == changes and status_of(user.engine, 1, "newsletter") == "subscribed"
    write_csv(user.inbox / "unsubscribers_again.csv", _rows(archived))  # the same content dropped again
    done = user.batchsync("import")
    assert "duplicate" in done.out and "reverted since" in done.out
    assert status_of(user.engine, 1, "newsletter") == "subscribed"


def test_revert_names_a_file_by_its_sha256_and_refuses_an_ambiguous_name(user: User) -> None:
    user.admin_file([opt_out("alice@example.com")])
    assert user.batchsync("import").code == 0
    (user.tmp_path / "work" / "inbox" / "unsubscribers_1.csv").parent.mkdir(exist_ok=True)
    write_csv(
        user.inbox / "unsubscribers_1.csv",
        [_rows(next((user.tmp_path / "work" / "archive").glob("unsubscribers_1.csv")))[0], opt_out("bob@example.com")],
    )
    assert user.batchsync("import").code == 0
    ambiguous = user.batchsync("revert", "unsubscribers_1.csv")
    assert ambiguous.code == 2 and "names 2 applied files" in ambiguous.err
    with user.engine.connect() as connection:
        shas = list(connection.scalars(select(bs_files.c.sha256).order_by(bs_files.c.id)))
    assert user.batchsync("revert", shas[1][:12]).code == 0
    assert (
        status_of(user.engine, 2, "newsletter") == "subscribed"
        and status_of(user.engine, 1, "newsletter") == "unsubscribed"
    )
    missing = user.batchsync("revert", "nothing_like_it.csv")
    assert missing.code == 2 and "no applied file" in missing.err


def test_revert_puts_an_address_back_and_never_lifts_a_suppression(user: User) -> None:
    user.export("--full")
    changes = write_csv(
        user.inbox / "changes_1.csv", [["old_email", "new_email"], ["bob@example.com", "robert@example.com"]]
    )
    assert user.batchsync("import").code == 0
    bounce = user.admin_file([opt_out("ivan@example.com", code="8"), opt_out("alice@example.com")])
    assert user.batchsync("import").code == 0
    done = user.batchsync("revert", changes.name)
    assert done.code == 0 and "address robert@example.com -> bob@example.com" in done.out
    with user.engine.connect() as connection:
        assert connection.scalar(select(contacts.c.email).where(contacts.c.id == 2)) == "bob@example.com"
    done = user.batchsync("revert", bounce.name)
    assert done.code == 0, done.err
    assert "on the suppression list" in done.out and "1 changes undone, 3 left" in done.out
    assert "ivan@example.com" in suppressed(user.engine)
    assert [status_of(user.engine, 11, code) for code in ("newsletter", "offers", "events")] == ["cleaned"] * 3
    assert status_of(user.engine, 1, "newsletter") == "subscribed"
    sent = user.export("--diff")
    assert sent.get("1", {}).get("ivan@example.com") != "1" and sent.get("2", {}).get("ivan@example.com") != "1"


def test_init_adds_the_audit_columns_and_older_changes_are_reverted_as_far_as_they_allow(user: User) -> None:
    mistake = user.admin_file([opt_out("alice@example.com")])
    assert user.batchsync("import").code == 0
    older = ("file_id", "event", "old_status_at", "old_source", "old_reason", "new_status_at", "new_reason")
    with user.engine.begin() as connection:  # a change as an older batchsync recorded it
        connection.execute(update(bs_changes).values(**dict.fromkeys(older)))
        connection.execute(text("DROP INDEX ix_bs_changes_file"))
        for name in ("reverts", "new_email", "old_email"):
            connection.execute(text(f"ALTER TABLE bs_changes DROP COLUMN {name}"))
    refused = user.batchsync("revert", mistake.name)
    assert refused.code == 1 and "bs_changes.old_email" in refused.err and "batchsync init" in refused.err
    listed = user.batchsync("init", "--dry-run")
    assert "bs_changes.reverts" in listed.out
    assert user.batchsync("init").code == 0 and user.batchsync("init").code == 0
    done = user.batchsync("revert", mistake.name)
    assert done.code == 0, done.err
    assert "recorded before batchsync kept the state before them" in done.out
    with user.engine.connect() as connection:
        s = subscriptions.c
        row = connection.execute(select(s.status, s.source, s.status_at).where(s.contact_id == 1, s.list_id == 1)).one()
    assert (row[0], row[1]) == ("subscribed", "admin") and row[2] > T0  # the revert's time: the old one was not kept


def test_changes_recorded_count(user: User) -> None:
    """Email changes are audited too (a row each, no list, no status), beside the status changes."""
    write_csv(user.inbox / "changes_1.csv", [["old_email", "new_email"], ["bob@example.com", "robert@example.com"]])
    assert user.batchsync("import").code == 0
    with user.engine.connect() as connection:
        c = bs_changes.c
        rows = connection.execute(select(c.list_code, c.new_status, c.old_email, c.new_email, c.event)).all()
        assert connection.scalar(select(func.count()).select_from(bs_changes)) == 1
    assert [tuple(row) for row in rows] == [("", "", "bob@example.com", "robert@example.com", "email_change")]


# --- the property: apply a random file to a random small CRM, revert it, and the CRM is as it was ----------------

CODES = ("2", "4", "0", "8", "16")  # MailUp: unsubscribes (link, imported, admin), a hard bounce, a complaint
STATUSES = ("subscribed", "unsubscribed", "pending", "cleaned")
PERSONS = 4  # contacts p1..p4; p5 is an address the CRM does not have
SUBSCRIPTION = st.one_of(
    st.none(),
    st.tuples(
        st.sampled_from(STATUSES),
        st.integers(1, 400),  # status time, hours ago
        st.sampled_from(("crm", "admin", "provider")),
        st.sampled_from((None, "web form", "imported")),  # reason
        st.one_of(st.none(), st.integers(1, 400)),  # consent given, hours ago
    ),
)
FILE_ROW = st.tuples(
    st.integers(1, PERSONS + 1), st.sampled_from(("1", "2", "3", "")), st.integers(0, 400), st.sampled_from(CODES)
)
TABLES = (
    "activities",
    "group_members",
    "subscriptions",
    "suppressions",
    "contacts",
    "bs_changes",
    "bs_files",
    "bs_runs",
    "bs_snapshots",
    "bs_snapshot_chunks",
    "bs_ledger_notes",
    "bs_provider_optouts",
)


@pytest.fixture
def bare_user(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[User]:
    person = User(tmp_path, db_url, capsys)
    assert person.batchsync("init").code == 0
    yield person
    person.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    states=st.lists(SUBSCRIPTION, min_size=PERSONS * 3, max_size=PERSONS * 3),
    rows=st.lists(FILE_ROW, min_size=1, max_size=8),
    origin=st.sampled_from(("admin", "provider")),
)
def test_reverting_a_random_file_gives_the_crm_back(
    bare_user: User, states: list[Any], rows: list[Any], origin: str
) -> None:
    """On a small CRM in random states, a random file of unsubscribes, hard bounces and complaints, of the admin or
    the provider, applied and reverted: every subscription of an address the file did not suppress is as it was
    (status, time, source, reason, consent; a row the file made is gone); suppressions and the provider's
    remembered opt-outs stay as the file left them, and no suppressed address is opted in again."""
    user, now = bare_user, hours_ago(0)
    _fresh_crm(user, states, now)
    before = subscription_rows(user)
    lines = [
        unsub_row(f"p{who}@example.com", list_id, mailup_time(now - timedelta(hours=h)), code)
        for who, list_id, h, code in rows
    ]
    path = user.provider_file(lines) if origin == "provider" else user.admin_file(lines)
    assert user.batchsync("import").code == 0
    after, suppressed_after, remembered = subscription_rows(user), suppressed(user.engine), user.provider_optouts()
    done = user.batchsync("revert", path.name)
    assert done.code == 0, done.err
    reverted = subscription_rows(user)
    assert suppressed(user.engine) == suppressed_after and user.provider_optouts() == remembered
    for key in set(before) | set(after) | set(reverted):
        if f"p{key[0]}@example.com" not in suppressed_after:
            assert reverted.get(key) == before.get(key), (key, done.out)
        elif after.get(key) is not None and after[key][0] not in ("subscribed", "pending"):
            # left as the file made it, or (a row the file made with an unsubscribe) removed: never opted in
            assert (reverted.get(key) or ("no row",))[0] not in ("subscribed", "pending"), (key, done.out)
    assert user.batchsync("revert", path.name).code == 1  # once only


def _fresh_crm(user: User, states: list[Any], now: datetime) -> None:
    """Every table emptied; contacts p1..p4, and their subscriptions on the three lists as ``states`` say."""
    with user.engine.begin() as connection:
        for name in TABLES:
            connection.execute(text(f"DELETE FROM {relation(connection, name)}"))
        crm.ensure_lists(connection, {"newsletter": (None, []), "offers": (None, []), "events": (None, [])})
        ids = crm.list_ids(connection, ["newsletter", "offers", "events"])
        people = [
            {"id": n, "email": f"p{n}@example.com", "email_key": f"p{n}@example.com", "created_at": T0}
            | {"updated_at": T0, "deleted": False}
            for n in range(1, PERSONS + 1)
        ]
        crm.insert_rows(connection, "contacts", people)
        cells = zip(((n, code) for n in range(1, PERSONS + 1) for code in ids), states, strict=True)
        crm.insert_rows(
            connection, "subscriptions", [_subscription(n, ids[code], s, now) for (n, code), s in cells if s]
        )


def _subscription(contact: int, list_id: int, state: Any, now: datetime) -> dict[str, Any]:
    status, hours, source, reason, consent = state
    return {
        "contact_id": contact,
        "list_id": list_id,
        "status": status,
        "status_at": now - timedelta(hours=hours),
        "source": source,
        "reason": reason,
        "consent_by": None if consent is None else "web form",
        "consent_at": None if consent is None else now - timedelta(hours=consent),
    }
