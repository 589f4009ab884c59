"""Export: MailUp's exact format, full and diff, tombstones, no echo, and at-least-once delivery."""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, inspect, select, update

import batchsync.export
from batchsync.clock import ManualClock
from batchsync.db import crm, ledger, snapshots
from batchsync.db.schema import (
    contacts,
    group_members,
    groups,
    make_engine,
    missing_tables,
    subscriptions,
    suppressions,
)
from batchsync.errors import DatabaseError
from batchsync.samples import write_sample_crm
from batchsync.sync import Sync

from .conftest import WITH_MAPPED_CRM, backend_url, ftp_transport, mailup_profile
from .crmdata import UNSUB_HEADER, build_tiny_crm, delete_contact, read_csv, set_status, unsub_row, write_csv

HEADER = b"111|1|2|idList|ExternalGroupName|optout\r\n"


@pytest.fixture(params=WITH_MAPPED_CRM)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, PostgreSQL, and the CRM of one's own of samples/mapped_crm (views over other tables) on PostgreSQL."""
    return backend_url(request, tmp_path)


def make_sync(tmp_path: Path, db_url: str, clock: ManualClock, **overrides: object) -> Sync:
    sync = Sync(mailup_profile(tmp_path, db_url, **overrides), clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


def uploaded(tmp_path: Path) -> dict[str, list[Path]]:
    """Files on the provider side, by MailUp list id."""
    root = tmp_path / "provider" / "import"
    return {folder.name: sorted(folder.glob("*.csv")) for folder in sorted(root.iterdir())} if root.exists() else {}


def data_rows(path: Path) -> list[list[str]]:
    return read_csv(path, delimiter="|")[1:]


def test_full_export_writes_mailup_header_dialect_and_rows(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    result = sync.export("full")
    files = uploaded(tmp_path)
    assert sorted(files) == ["1", "2"]  # events holds only a pending row: MailUp has no value for it
    newsletter = files["1"][0]
    raw = newsletter.read_bytes()
    assert raw.startswith(HEADER)  # UTF-8 without BOM, MailUp's "|" and CRLF
    assert re.fullmatch(r"1_\d{18}\.csv", newsletter.name)  # <list number>_<yyyyMMddhhmmssffff>.csv
    rows = {row[0]: row for row in data_rows(newsletter)}
    assert rows["alice@example.com"] == ["alice@example.com", "Alice", "Ädler", "1", "", "1"]
    assert rows["dave@example.com"][4] == "VIP"
    assert rows["Eve@Example.com"][5] == "0"  # duplicates once; unsubscribed wins
    assert rows["frank@example.com"][5] == "0"  # suppressed: never exported as subscribed
    assert "not-an-email" not in rows
    assert len(rows) == 10
    assert "Иван" in raw.decode("utf-8")
    item = next(f for f in result.files if f.list_code == "newsletter")
    assert (item.duplicates, item.invalid) == (1, 1)
    reports = {p.name.rsplit(".", 2)[-2]: read_csv(p, delimiter="|") for p in item.reports}
    assert reports["duplicates"][1][2] == "5,6"
    assert reports["skipped"][1][1] == "not-an-email"
    assert all(p.exists() for p in item.reports) and item.local_path and item.local_path.exists()


def test_diff_holds_exactly_the_changes_and_a_tombstone_then_nothing(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    clock.advance(3600)
    later = clock.now()
    set_status(sync.engine, 1, "newsletter", "unsubscribed", later)
    set_status(sync.engine, 2, "newsletter", "unsubscribed", later)
    set_status(sync.engine, 3, "newsletter", "subscribed", later, consent_by="phone call")
    delete_contact(sync.engine, 10)
    result = sync.export("diff")
    assert [f.list_code for f in result.files if f.rows] == ["newsletter"]
    newest = max(uploaded(tmp_path)["1"])
    rows = sorted(data_rows(newest))
    assert rows == [
        ["alice@example.com", "Alice", "Ädler", "1", "", "0"],
        ["bob@example.com", "Bob", "Brown", "1", "", "0"],
        ["carol@example.com", "Carol", "Çelik", "1", "", "1"],
        ["heidi@example.com", "", "", "1", "", "0"],  # the tombstone
    ]
    clock.advance(3600)
    again = sync.export("diff")
    assert again.rows == 0
    assert all(f.local_path is None for f in again.files)
    newsletter = next(f for f in again.files if f.list_code == "newsletter")
    # reported in every export; with nothing sent, the list's latest reports replace the earlier ones in reports/
    assert [p.name for p in newsletter.reports] == ["newsletter.duplicates.csv", "newsletter.skipped.csv"]
    assert all(p.parent.name == "reports" and p.exists() for p in newsletter.reports)
    clock.advance(3600)
    sync.export("diff")
    assert len(list((tmp_path / "work" / "reports").iterdir())) == 2
    assert [p.name for p in (tmp_path / "work" / "sent").glob("*.csv.*.csv")] != []  # those sent with a file
    assert not [p for p in (tmp_path / "work" / "sent").glob("*.csv.*.csv") if "_diff-" in p.name]
    assert len(uploaded(tmp_path)["1"]) == 2


def test_diff_finds_changes_outside_the_contact_row_a_group_and_a_suppression(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    with sync.engine.begin() as connection:
        vip = connection.scalar(select(groups.c.id).where(groups.c.code == "vip"))
        connection.execute(insert(group_members).values(contact_id=2, group_id=vip))
        connection.execute(
            insert(suppressions).values(
                email_key="ivan@example.com", email="ivan@example.com", reason="complaint", at=clock.now(), source="crm"
            )
        )
    clock.advance(3600)
    sync.export("diff")
    assert sorted(data_rows(max(uploaded(tmp_path)["1"]))) == [
        ["bob@example.com", "Bob", "Brown", "1", "VIP", "1"],
        ["ivan@example.com", "Иван", "Петров", "1", "", "0"],
    ]
    assert data_rows(max(uploaded(tmp_path)["2"])) == [["ivan@example.com", "Иван", "Петров", "2", "", "0"]]


def test_diff_after_a_full_export_sends_only_the_rows_that_changed(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    with sync.engine.begin() as connection:
        crm.ensure_lists(connection, {"newsletter": (None, ["vip", "customers"])})
        customers = connection.scalar(select(groups.c.id).where(groups.c.code == "customers"))
        connection.execute(insert(group_members).values(contact_id=4, group_id=customers))  # dave: vip first
    sync.export("full")
    clock.advance(3600)
    # Not grace's pending row on events: MailUp has no value for it, so it stays unsent until it changes.
    unchanged = sync.export("diff")
    assert unchanged.rows == 0
    # eve: two contacts, reported in every export; not-an-email: invalid, reported again.
    assert (unchanged.files[0].duplicates, unchanged.files[0].invalid) == (1, 1)
    with sync.engine.begin() as connection:
        connection.execute(update(contacts).where(contacts.c.id == 4).values(first_name="David"))
    clock.advance(3600)
    assert sync.export("diff").rows == 2  # dave on both lists
    clock.advance(3600)
    assert sync.export("diff").rows == 0


def temporary_tables(sync: Sync) -> set[str]:
    """The bs_ temporary tables a pooled connection holds (on PostgreSQL: any session's, in this database)."""
    with sync.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            found = connection.exec_driver_sql("SELECT relname FROM pg_class WHERE relpersistence = 't'")
        else:
            found = connection.exec_driver_sql("SELECT name FROM sqlite_temp_master WHERE type = 'table'")
        return {name for name in found.scalars() if name.startswith("bs_")}


def test_diff_leaves_no_temporary_tables_in_the_pooled_connection(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    clock.advance(3600)
    sync.export("diff")
    assert temporary_tables(sync) == set()


def test_diff_sends_the_members_of_a_renamed_group(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    with sync.engine.begin() as connection:  # the group's name is in its members' rows: they have changed
        connection.execute(update(groups).where(groups.c.code == "vip").values(code="gold", name="Gold"))
    clock.advance(3600)
    sync.export("diff")
    assert [row[0] for row in data_rows(max(uploaded(tmp_path)["1"]))] == ["dave@example.com"]


@pytest.mark.parametrize(("change", "optout"), [("subscribed", "1"), ("suppressed", "0")])
def test_diff_sends_a_pending_row_once_it_can_go_out(
    tmp_path: Path, db_url: str, clock: ManualClock, change: str, optout: str
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    assert "3" not in uploaded(tmp_path)
    clock.advance(3600)
    if change == "subscribed":
        set_status(sync.engine, 9, "events", "subscribed", clock.now(), consent_by="web-form")
    else:  # a suppressed address goes out as unsubscribed, whatever its CRM status
        with sync.engine.begin() as connection:
            connection.execute(
                insert(suppressions).values(
                    email_key="grace@example.com",
                    email="grace@example.com",
                    reason="complaint",
                    at=clock.now(),
                    source="crm",
                )
            )
    sync.export("diff")
    assert data_rows(max(uploaded(tmp_path)["3"])) == [["grace@example.com", "Grace", "Pending", "3", "", optout]]


def test_diff_after_a_profile_change_compares_every_row_again(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    clock.advance(3600)
    changed = Sync(mailup_profile(tmp_path, db_url, **{"export.columns.1.transform": "upper"}), clock=clock)
    result = changed.export("diff")
    assert result.rows == 10 + 3  # every first name is written differently now
    assert ["alice@example.com", "ALICE"] in [row[:2] for row in data_rows(max(uploaded(tmp_path)["1"]))]


def test_diff_does_not_send_new_inputs_that_give_the_same_row(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    with sync.engine.begin() as connection:
        connection.execute(update(subscriptions).where(subscriptions.c.contact_id == 2).values(source="admin"))
    clock.advance(3600)
    assert sync.export("diff").rows == 0
    assert ledger_row(sync, "newsletter", "bob@example.com")["status"] == "subscribed"


def ledger_row(sync: Sync, code: str, key: str) -> dict[str, object]:
    with sync.engine.connect() as connection:
        [row] = snapshots.rows_for_keys(connection, sync.profile.name, [key]).filter(list_code=code).to_dicts()
    return row


def test_provider_statuses_noted_twice_for_one_address_keep_the_last(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    key = {"list_code": "newsletter", "email_key": "bob@example.com"}
    with sync.engine.begin() as connection:
        ledger.note_provider_status(
            connection, "mailup", [{**key, "status": "unsubscribed"}, {**key, "status": "cleaned"}]
        )
    row = ledger_row(sync, "newsletter", key["email_key"])
    assert (row["status"], row["origin"]) == ("cleaned", "provider")


@pytest.mark.canonical_crm("it drops and expects back an index batchsync makes on its own subscriptions table")
def test_init_adds_the_columns_and_indexes_an_older_database_lacks(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    with sync.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE bs_changes DROP COLUMN reverts")
        connection.exec_driver_sql("DROP INDEX ix_subscriptions_status")
    assert missing_tables(sync.engine) == ["bs_changes.reverts"]
    with pytest.raises(DatabaseError, match=r"lacks bs_changes.reverts: run `batchsync init -p mailup`"):
        sync.export("full")
    sync.init()
    assert missing_tables(sync.engine) == []
    assert "ix_subscriptions_status" in {index["name"] for index in inspect(sync.engine).get_indexes("subscriptions")}
    assert sync.export("full").rows == 10 + 3


def test_a_change_reported_by_the_provider_is_not_echoed_back(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    stamp = (clock.now() - timedelta(hours=1)).strftime("%Y%m%dT%H%M%S")
    write_csv(
        tmp_path / "provider" / "export" / "unsubscribers_1.csv",  # MailUp's own inbox: its reports
        [
            UNSUB_HEADER,
            unsub_row("bob@example.com", "1", stamp, "2"),
            unsub_row("dave@example.com", "1", stamp, "8"),  # hard bounce: events too, which MailUp never had
            unsub_row("grace@example.com", "1", stamp, "16"),  # complaint: events was pending, never sent
        ],
    )
    report = sync.import_files()
    assert report.files[0].changed == 3
    assert sync.export("diff").rows == 0
    clock.advance(60)
    set_status(sync.engine, 2, "newsletter", "subscribed", clock.now(), consent_by="phone")
    assert sync.export("diff").rows == 0  # a re-subscription after MailUp's own opt-out is never sent as 1
    set_status(sync.engine, 1, "newsletter", "unsubscribed", clock.now())
    assert sync.export("diff").rows == 1  # other CRM changes go out as usual


def test_failure_between_upload_and_ledger_commit_sends_the_same_rows_again(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    set_status(sync.engine, 4, "newsletter", "unsubscribed", clock.now())
    delete_contact(sync.engine, 10)

    def crash(*args: object) -> None:
        raise RuntimeError("power cut after the upload")

    monkeypatch.setattr(batchsync.export, "commit_pending", crash)
    clock.advance(60)
    with pytest.raises(RuntimeError):
        sync.export("diff")
    first = max(uploaded(tmp_path)["1"])
    assert (tmp_path / "work" / "sent" / first.name).read_bytes() == first.read_bytes()  # the copy of what was sent
    monkeypatch.undo()
    clock.advance(60)
    sync.export("diff")
    second = max(uploaded(tmp_path)["1"])
    assert first != second
    assert sorted(data_rows(first)) == sorted(data_rows(second))
    assert len(data_rows(second)) == 2
    clock.advance(60)
    assert sync.export("diff").rows == 0  # the ledger advanced once, on the confirmed upload


def test_dry_run_writes_the_files_and_changes_nothing(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    result = sync.export("full", dry_run=True)
    assert result.rows == 10 + 3
    assert uploaded(tmp_path) == {}
    assert all(f.local_path and f.local_path.parent.name == "dry-run" for f in result.files if f.rows)
    with sync.engine.connect() as connection:
        assert snapshots.exported_count(connection, "mailup") == 0
        assert ledger.last_runs(connection, "mailup") == []
    assert sync.export("diff").rows == 13


def test_export_over_ftp_uploads_whole_files_into_list_folders(
    tmp_path: Path, db_url: str, clock: ManualClock, ftp_server: object
) -> None:
    sync = make_sync(tmp_path, db_url, clock, transport=ftp_transport(ftp_server))  # type: ignore[arg-type]
    result = sync.export("full")
    assert [f.uploaded for f in result.files if f.rows] == [True, True]
    files = uploaded(tmp_path)
    assert files["1"][0].read_bytes().startswith(HEADER)
    assert not list((tmp_path / "provider").rglob("*.part"))
    with sync.engine.connect() as connection:
        assert snapshots.exported_count(connection, "mailup", "newsletter") == 10


def test_two_exports_in_one_second_never_reuse_a_remote_name(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    sync.export("full")
    names = [p.name for p in uploaded(tmp_path)["1"]]
    assert len(names) == 2 and all(re.fullmatch(r"1_\d{18}\.csv", name) for name in names)  # MailUp's names still


def test_an_address_several_contacts_share_is_sent_with_its_lowest_id_contact_s_fields(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    """eve's two contacts (5: " Eve@Example.com ", Eve One; 6: eve@example.com, Eve Two): the row is made from
    the contact with the lowest id, whatever their statuses or which one changed; an opt-out of either wins."""
    sync = make_sync(tmp_path, db_url, clock)
    sync.export("full")
    [row] = [r for r in data_rows(max(uploaded(tmp_path)["1"])) if r[0].lower() == "eve@example.com"]
    assert row == ["Eve@Example.com", "Eve", "One", "1", "", "0"]
    with sync.engine.begin() as connection:
        connection.execute(update(contacts).where(contacts.c.id == 6).values(first_name="Evelyn"))
    set_status(sync.engine, 5, "newsletter", "unsubscribed", clock.now())
    set_status(sync.engine, 6, "newsletter", "subscribed", clock.now(), consent_by="form")
    clock.advance(60)
    assert sync.export("diff").rows == 0  # the other contact's change and a swap of statuses change no cell
    delete_contact(sync.engine, 5)
    clock.advance(60)
    sync.export("diff")
    [row] = data_rows(max(uploaded(tmp_path)["1"]))
    assert row == ["eve@example.com", "Evelyn", "Two", "1", "", "1"]  # the one left


OLD_LEDGER = """CREATE TABLE bs_exported (profile VARCHAR(100) NOT NULL, list_code VARCHAR(100) NOT NULL,
email_key VARCHAR(320) NOT NULL, email VARCHAR(320) NOT NULL, contact_id INTEGER, fingerprint BIGINT NOT NULL,
status VARCHAR(16) NOT NULL, origin VARCHAR(10) NOT NULL, source_digest BIGINT, at {time} NOT NULL,
PRIMARY KEY (profile, list_code, email_key))"""


@pytest.mark.canonical_crm("it drops batchsync's own tables to make a database of an earlier version")
def test_init_carries_the_ledger_of_an_earlier_version_into_snapshots(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    time = "TIMESTAMP" if sync.engine.dialect.name == "postgresql" else "DATETIME"
    at = "2026-01-01 00:00:00" + ("" if sync.engine.dialect.name == "postgresql" else ".000000")
    with sync.engine.begin() as connection:  # what an earlier version left: its ledger, no snapshots
        for name in ("bs_ledger_notes", "bs_snapshot_chunks", "bs_snapshots"):
            connection.exec_driver_sql(f"DROP TABLE {name}")
        connection.exec_driver_sql(OLD_LEDGER.format(time=time))
        connection.exec_driver_sql("CREATE TABLE bs_pending AS SELECT * FROM bs_exported")
        rows = [
            ("alice@example.com", "subscribed", "export"),
            ("bob@example.com", "unsubscribed", "provider"),
            ("zed@example.com", "subscribed", "export"),  # no contact: gone from the CRM
        ]
        for key, status, origin in rows:
            connection.exec_driver_sql(
                "INSERT INTO bs_exported VALUES ('mailup', 'newsletter', "
                f"'{key}', '{key}', NULL, 7, '{status}', '{origin}', NULL, '{at}')"
            )
    with pytest.raises(DatabaseError, match=r"lacks bs_snapshots.*run `batchsync init -p mailup`"):
        sync.export("diff")
    sync.init()
    assert "bs_exported" not in inspect(sync.engine).get_table_names()
    assert (ledger_row(sync, "newsletter", "bob@example.com")["status"], "provider") == (
        "unsubscribed",
        ledger_row(sync, "newsletter", "bob@example.com")["origin"],
    )
    clock.advance(3600)
    sync.export("diff")
    sent = {row[0]: row[5] for row in data_rows(max(uploaded(tmp_path)["1"]))}
    assert sent["alice@example.com"] == "1"  # every row once: the old fingerprints compare with nothing
    assert sent["zed@example.com"] == "0"  # the address the provider has from us, gone: a tombstone
    clock.advance(3600)
    assert sync.export("diff").rows == 0


@pytest.mark.canonical_crm("it fills the canonical CRM with the sample generator")
def test_buckets_of_a_thousand_contacts_export_what_one_bucket_does(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    """An address's contacts never split across buckets, and each bucket meets the ledger's rows of its key
    range: the files and the ledger are those of an export that builds the whole list at once. The spilled
    buckets are gone when the export ends, and so is a folder a killed export left a day ago."""
    outcomes = []
    for rows in (1000, 100_000):
        folder = tmp_path / str(rows)
        url = db_url if rows == 1000 else backend_url_like(db_url, folder)
        sync = Sync(mailup_profile(folder, url, **{"export.chunk_rows": rows}), clock=ManualClock(clock.now()))
        sync.init()
        write_sample_crm(sync.engine, sync.profile, contacts=6000, seed=5)
        stale = folder / "work" / ".scan-killed"
        (stale / "0.contacts.arrow").parent.mkdir(parents=True)
        os.utime(stale, (time.time() - 2 * 86_400,) * 2)
        sync.export("full")
        assert not list((folder / "work").glob(".scan-*"))
        with sync.engine.begin() as connection:  # a tenth of the contacts renamed, some leave, a diff after
            connection.execute(update(contacts).where(contacts.c.id % 10 == 0).values(first_name="Renamed"))
            connection.execute(delete(subscriptions).where(subscriptions.c.contact_id % 37 == 0))
        sync.clock.advance(3600)  # type: ignore[attr-defined]
        sync.export("diff")
        sent = sorted(path.name for path in (folder / "work" / "sent").iterdir())
        files = {name: (folder / "work" / "sent" / name).read_bytes() for name in sent}
        with sync.engine.connect() as connection:
            keys = [f"{row}" for row in connection.scalars(select(contacts.c.email_key))]
            held = snapshots.rows_for_keys(connection, "mailup", keys).drop("at").sort("list_code", "email_key")
        outcomes.append((files, held.to_dicts()))
    assert outcomes[0][0] == outcomes[1][0]
    assert outcomes[0][1] == outcomes[1][1]


def backend_url_like(db_url: str, folder: Path) -> str:
    """A second database on the same backend: a SQLite file in ``folder``, or another PostgreSQL database."""
    if db_url.startswith("sqlite"):
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'crm.sqlite'}"
    engine = make_engine(db_url).execution_options(isolation_level="AUTOCOMMIT")
    name = f"partitions_{folder.name}_{abs(hash(str(folder))) % 10**8}"
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return db_url.rsplit("/", 1)[0] + "/" + name


def test_a_database_file_replaced_under_the_same_name_is_read_anew(tmp_path: Path, clock: ManualClock) -> None:
    """SQLite's reader process keeps no connection between queries: a file deleted and made again (a restore) is
    the new file's rows, never the old one's."""
    url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    first = make_sync(tmp_path, url, clock)
    assert first.export("full", dry_run=True).rows == 10 + 3
    first.engine.dispose()
    (tmp_path / "crm.sqlite").unlink()
    again = Sync(mailup_profile(tmp_path, url), clock=clock)
    again.init()
    assert again.export("full", dry_run=True).rows == 0  # an empty CRM now
