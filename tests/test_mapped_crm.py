"""A CRM of one's own: batchsync mapped onto other tables and views (database.schema, database.tables).

tests/test_export.py and tests/test_import.py run their scenarios on the views of samples/mapped_crm too; this
module checks what they cannot see from the canonical side: that the rows land in the CRM's own tables, what
init makes and refuses, quoting, a partial mapping on both backends, two mappings in one process, and history and
revert in the CRM's own tables (tests/test_audit.py runs its scenarios on the views too).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, inspect, select, text

from batchsync.audit import address_history
from batchsync.check import run_checks
from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.db import schema
from batchsync.db.mapping import crm_tables, mapped_problems, missing_tables
from batchsync.errors import ConfigError, DatabaseError
from batchsync.samples import write_sample_crm
from batchsync.sync import Sync

from .conftest import BACKENDS, ROOT, backend_url, mailup_profile, make_mapped_database
from .crmdata import UNSUB_HEADER, build_tiny_crm, read_csv, set_status, status_of, unsub_row, write_csv
from .usercli import CHANGES_KIND, User, opt_out

# MailUp's Rome time: 09:00 UTC.
EARLY = "20260105T100000"
AT_EARLY = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
OWN_TABLES = {name for name in schema.metadata.tables if name.startswith("bs_")}


@pytest.fixture
def mapped_url(pg_server: str) -> str:
    """A database holding the CRM of samples/mapped_crm, and nothing of batchsync's yet."""
    return make_mapped_database(pg_server)


@pytest.fixture(params=BACKENDS)
def plain_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


def rows(engine: Engine, statement: str) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(statement))]


def optins(engine: Engine, where: str) -> list[tuple[Any, ...]]:
    """Rows of the CRM's own opt-in table: person, newsletter, state, since, changed by."""
    return rows(
        engine, f"SELECT person_id, newsletter_id, state, state_since, changed_by FROM crm.optins WHERE {where}"
    )


def uploaded(tmp_path: Path, list_id: str) -> dict[str, str]:
    """The last file uploaded for a MailUp list: address -> optout."""
    path = sorted((tmp_path / "provider" / "import" / list_id).glob("*.csv"))[-1]
    return {row[0]: row[5] for row in read_csv(path, delimiter="|")[1:]}


def test_init_makes_only_batchsyncs_own_tables_beside_the_crms(
    tmp_path: Path, mapped_url: str, clock: ManualClock
) -> None:
    sync = Sync(mailup_profile(tmp_path, mapped_url), clock=clock)
    crm_before = set(inspect(sync.engine).get_table_names(schema="crm"))
    assert sync.init().lists_added == 3 + 5  # the profile's lists and groups, written through the views
    found = inspect(sync.engine)
    assert set(found.get_table_names()) == OWN_TABLES  # no canonical CRM table in the default schema
    assert set(found.get_table_names(schema="crm")) == crm_before
    assert set(found.get_table_names(schema="newsletter_api")) == set()  # views only, none replaced
    assert rows(sync.engine, "SELECT slug, title FROM crm.newsletters ORDER BY newsletter_id") == [
        ("newsletter", "Newsletter"),
        ("offers", "Offers"),
        ("events", "Events"),
    ]
    assert missing_tables(sync.engine) == []
    assert sync.init().lists_added == 0  # safe to repeat


def test_an_import_and_an_export_write_into_the_crms_own_tables(
    tmp_path: Path, mapped_url: str, clock: ManualClock
) -> None:
    sync = Sync(mailup_profile(tmp_path, mapped_url), clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    write_csv(
        tmp_path / "provider" / "export" / "unsubscribers_1.csv",  # MailUp's own inbox: the provider's report
        [
            UNSUB_HEADER,
            unsub_row("alice@example.com", "1", EARLY, "2"),  # her own link: newsletter only
            unsub_row("dave@example.com", "1", EARLY, "8"),  # hard bounce: every list, suppressed
        ],
    )
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed) == ("applied", 2)
    engine = sync.engine
    changed = {row[:2]: row[2:] for row in optins(engine, "changed_by = 'ESP'")}
    newsletter, offers, events = (
        row[0] for row in rows(engine, "SELECT newsletter_id FROM crm.newsletters ORDER BY 1")
    )
    assert changed == {
        (1, newsletter): ("N", AT_EARLY, "ESP"),  # the CRM's own vocabulary and a timestamptz
        (4, newsletter): ("B", AT_EARLY, "ESP"),
        (4, offers): ("B", AT_EARLY, "ESP"),
        (4, events): ("B", AT_EARLY, "ESP"),  # a bounce leaves every list, one he was not on included
    }
    assert optins(engine, f"person_id = 1 AND newsletter_id = {offers}")[0][2] == "Y"
    assert rows(engine, "SELECT address, why, added_by FROM crm.do_not_mail ORDER BY address") == [
        ("dave@example.com", "hard_bounce", "provider:mailup"),
        ("frank@example.com", "hard_bounce", "crm"),
    ]
    logged = rows(engine, "SELECT person_id, what, happened FROM crm.contact_log ORDER BY entry_id")
    assert logged == [(1, "unsubscribe", AT_EARLY), (4, "bounce", AT_EARLY)]
    set_status(engine, 2, "newsletter", "unsubscribed", clock.now())  # a CRM user, through the view
    assert [row[2::2] for row in optins(engine, f"person_id = 2 AND newsletter_id = {newsletter}")] == [("N", "CRM")]
    assert sync.export("full").rows == 10 + 3 + 1  # and dave, cleaned, on events
    sent = uploaded(tmp_path, "1")
    assert (sent["alice@example.com"], sent["bob@example.com"], sent["dave@example.com"]) == ("0", "0", "0")
    assert sent["ivan@example.com"] == "1"


def test_a_mapped_view_that_is_missing_or_lacks_a_column_stops_init_and_is_reported(
    tmp_path: Path, mapped_url: str, clock: ManualClock
) -> None:
    profile = mailup_profile(tmp_path, mapped_url)
    sync = Sync(profile, clock=clock)
    with sync.engine.begin() as connection:
        connection.exec_driver_sql("DROP VIEW newsletter_api.activity_feed")
        connection.exec_driver_sql(
            "CREATE VIEW newsletter_api.activity_feed AS SELECT entry_id AS id, person_id AS contact_id, "
            "what AS kind, happened AS at FROM crm.contact_log"  # no detail
        )
        connection.exec_driver_sql("DROP VIEW newsletter_api.do_not_mail")
    lacks = "newsletter_api.activity_feed (the profile's activities table) lacks the column detail"
    gone = "newsletter_api.do_not_mail (the profile's suppressions table) does not exist"
    with pytest.raises(DatabaseError) as caught:
        sync.init()
    assert lacks in str(caught.value) and gone in str(caught.value)
    assert "batchsync never creates or alters" in str(caught.value)
    assert inspect(sync.engine).get_table_names() == []  # nothing was created
    assert [str(problem) for problem in mapped_problems(sync.engine)] == [gone, lacks]
    assert missing_tables(sync.engine)[-2:] == [gone, lacks]
    database = next(result for result in run_checks(profile) if result.name == "database")
    assert not database.ok and gone in database.detail and "run batchsync init" not in database.detail
    with pytest.raises(DatabaseError, match="does not exist"):
        sync.export("full")  # the other commands refuse too, with the same reason
    with pytest.raises(DatabaseError, match="does not exist"):
        sync.revert("unsubscribers_1.csv")
    with pytest.raises(DatabaseError, match="batchsync never creates or alters"):
        address_history([profile], "alice@example.com")


def test_a_partial_mapping_onto_names_that_need_quoting(tmp_path: Path, plain_url: str, clock: ManualClock) -> None:
    """The CRM's contacts are its table "People" (mixed case: a quoted name), its suppressions "order" (a
    reserved word); batchsync makes the other CRM tables itself, without foreign keys to those two."""
    mapping = {"database.tables": {"contacts": "People", "suppressions": "order"}}
    profile = mailup_profile(tmp_path, plain_url, **mapping)
    sync = Sync(profile, clock=clock)
    theirs = MetaData()
    for name, relation in (("contacts", "People"), ("suppressions", "order")):
        schema.metadata.tables[name].to_metadata(theirs, name=relation)
    theirs.create_all(sync.engine)
    sync.init()
    found = inspect(sync.engine)
    assert set(found.get_table_names()) == {*schema.metadata.tables, "People", "order"} - {"contacts", "suppressions"}
    assert all(key["referred_table"] == "lists" for key in found.get_foreign_keys("subscriptions"))
    build_tiny_crm(sync.engine)
    write_csv(
        tmp_path / "work" / "inbox" / "unsubscribers_1.csv",
        [UNSUB_HEADER, unsub_row("BOB@example.com", "1", EARLY, "2"), unsub_row("grace@example.com", "1", EARLY, "16")],
    )
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed) == ("applied", 2)
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    with sync.engine.connect() as connection:
        order = crm_tables(connection).suppressions
        assert set(connection.scalars(select(order.c.email_key))) == {"frank@example.com", "grace@example.com"}
    assert sync.export("full").rows == 10 + 3 + 2  # and grace, opted out, on offers and events
    assert uploaded(tmp_path, "1")["grace@example.com"] == "0"
    assert sync.export("diff").rows == 0


def test_two_profiles_with_different_mappings_run_in_one_process(
    tmp_path: Path, mapped_url: str, clock: ManualClock
) -> None:
    """As the daemon runs them: one process, one engine each; neither mapping leaks into the other, nor into
    db.schema's Tables."""
    mine = Sync(mailup_profile(tmp_path / "mapped", mapped_url), clock=clock)
    plain = Sync(mailup_profile(tmp_path / "plain", f"sqlite:///{tmp_path / 'crm.sqlite'}"), clock=clock)
    for sync in (mine, plain):
        sync.init()
        build_tiny_crm(sync.engine)
    for folder, email in (("mapped", "bob@example.com"), ("plain", "carol@example.com")):
        inbox = tmp_path / folder / "work" / "inbox"
        write_csv(inbox / "unsubscribers_1.csv", [UNSUB_HEADER, unsub_row(email, "1", EARLY, "2")])
    assert [sync.import_files().files[0].changed for sync in (mine, plain)] == [1, 0]  # carol was unsubscribed
    assert [row[2::2] for row in optins(mine.engine, "person_id = 2 AND newsletter_id = 1")] == [("N", "ADMIN")]
    assert status_of(plain.engine, 2, "newsletter") == "subscribed"
    assert (mine.export("full").rows, plain.export("full").rows) == (13, 13)
    assert (schema.contacts.name, schema.contacts.schema, schema.suppressions.name) == (
        "contacts",
        None,
        "suppressions",
    )
    with plain.engine.connect() as connection:
        assert crm_tables(connection).contacts is schema.contacts  # unmapped: the canonical Tables themselves


def test_the_example_profile_snippet_loads_and_names_are_checked(tmp_path: Path) -> None:
    snippet = (ROOT / "samples" / "mapped_crm" / "profile.toml").read_text(encoding="utf-8")
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    start, end = text.index("[database]"), text.index("[work]")
    path = tmp_path / "mapped.toml"
    path.write_text(text[:start] + snippet + "\n" + text[end:], encoding="utf-8")
    places = load_profile(path).database.locations()
    assert places["contacts"] == ("newsletter_api", "contacts")
    assert places["activities"] == ("newsletter_api", "activity_feed")
    assert places["suppressions"] == ("newsletter_api", "do_not_mail")
    for key, value, expected in (
        ("database.tables", {"contact": "people"}, "database.tables.contact: unknown key (did you mean 'contacts'?)"),
        ("database.tables", {"contacts": "crm.people; drop"}, "database.tables.contacts: expected 'name' or"),
        ("database.tables", {"lists": "a.b.c"}, "database.tables.lists: expected 'name' or 'schema.name'"),
        ("database.schema", "crm people", "database.schema: expected a schema name"),
        ("database.tables", {"contacts": "x", "lists": "x"}, "table lists would be newsletter_api.x, as the CRM table"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_profile(path, overrides={key: value})
        assert expected in str(caught.value)
    plain = ROOT / "profiles" / "mailup.toml"  # no schema: bare names are in the default schema, beside batchsync's
    for tables, expected in (
        ({"contacts": "lists"}, "the CRM table contacts would be lists, as batchsync's own lists"),
        ({"activities": "bs_runs"}, "the CRM table activities would be bs_runs, as batchsync's own tables"),
    ):
        with pytest.raises(ConfigError, match=expected):
            load_profile(plain, overrides={"database.tables": tables})


def test_a_schema_on_sqlite_is_a_configuration_error(tmp_path: Path, clock: ManualClock) -> None:
    profile = mailup_profile(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", **{"database.schema": "crm"})
    with pytest.raises(ConfigError, match="need PostgreSQL"):
        Sync(profile, clock=clock)


def test_the_sample_generator_fills_a_mapped_crm(tmp_path: Path, mapped_url: str, clock: ManualClock) -> None:
    sync = Sync(mailup_profile(tmp_path, mapped_url), clock=clock)
    sync.init()
    summary = write_sample_crm(sync.engine, sync.profile, contacts=300, seed=3)
    counted = rows(sync.engine, "SELECT (SELECT count(*) FROM crm.people), (SELECT count(*) FROM crm.optins)")
    assert counted == [(300, summary.subscriptions)]
    assert rows(sync.engine, "SELECT count(*) FROM crm.do_not_mail") == [(summary.suppressed,)]
    assert sync.export("full").rows > 0 and sync.export("diff").rows == 0


def test_history_and_revert_read_and_write_the_crms_own_tables(
    tmp_path: Path, mapped_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin's file (an opt-out that makes a row, one that changes a row) and an email change, reverted: the
    CRM's own crm.optins and crm.people are as before, crm.contact_log has the revert; history reads them."""
    user = User(tmp_path, mapped_url, capsys, extra=CHANGES_KIND).start()
    engine = user.engine
    try:
        optin_rows = (
            "SELECT person_id, newsletter_id, state, state_since, changed_by, why FROM crm.optins ORDER BY 1, 2"
        )
        before = rows(engine, optin_rows)
        [(events,)] = rows(engine, "SELECT newsletter_id FROM crm.newsletters WHERE slug = 'events'")
        mistake = user.admin_file([opt_out("alice@example.com", list_id="3"), opt_out("bob@example.com")])
        moved = write_csv(
            user.inbox / "changes_1.csv", [["old_email", "new_email"], ["carol@example.com", "caro@x.org"]]
        )
        assert user.batchsync("import").code == 0
        assert optins(engine, f"person_id = 1 AND newsletter_id = {events}")[0][2::2] == ("N", "ADMIN")  # a new row
        assert rows(engine, "SELECT mail FROM crm.people WHERE person_id = 3") == [("caro@x.org",)]

        done = user.batchsync("revert", mistake.name)
        assert done.code == 0 and "2 changes undone, 0 left" in done.out, done.out + done.err
        assert user.batchsync("revert", moved.name).code == 0
        assert rows(engine, optin_rows) == before  # alice's row on events deleted through the view, bob's put back
        assert rows(engine, "SELECT mail FROM crm.people WHERE person_id = 3") == [("carol@example.com",)]
        logged = rows(engine, "SELECT person_id FROM crm.contact_log WHERE what = 'revert' ORDER BY 1")
        assert logged == [(1,), (2,), (3,)]

        found = json.loads(user.batchsync("history", "alice@example.com", "--json").out)
        assert found["contacts"] == [1]
        changes = [(e["list"], e["rule"], e["file"]) for e in found["entries"] if e["what"] == "change"]
        made = "opt-out for a list without CRM row: recorded"
        assert changes == [("events", made, mistake.name), ("events", "revert", mistake.name)]
        assert any(e["what"] == "activity" and e["detail"].startswith("revert") for e in found["entries"])
        assert json.loads(user.batchsync("history", "caro@x.org", "--json").out)["contacts"] == [3]
    finally:
        user.close()
