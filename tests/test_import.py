"""Import: MailUp's unsubscribers file under the sync rules, duplicates, and every kind of bad input."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.db import crm
from batchsync.db.schema import activities, bs_files, subscriptions
from batchsync.sync import Sync

from .conftest import ROOT, WITH_MAPPED_CRM, backend_url, ftp_transport, mailup_profile
from .crmdata import (
    T0,
    UNSUB_HEADER,
    build_tiny_crm,
    change_count,
    read_csv,
    status_of,
    suppressed,
    unsub_row,
    write_csv,
)
from .usercli import User, hours_ago, mailup_time

# MailUp writes local (Europe/Rome) time: 20260105T100000 is 09:00 UTC, before judy's re-subscription on the 10th.
EARLY = "20260105T100000"


@pytest.fixture(params=WITH_MAPPED_CRM)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite, PostgreSQL, and the CRM of one's own of samples/mapped_crm (views over other tables) on PostgreSQL."""
    return backend_url(request, tmp_path)


def make_sync(tmp_path: Path, db_url: str, clock: ManualClock, **overrides: object) -> Sync:
    sync = Sync(mailup_profile(tmp_path, db_url, **overrides), clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


def drop(tmp_path: Path, name: str, rows: list[list[str]], **options: str) -> Path:
    return write_csv(tmp_path / "work" / "inbox" / name, rows, **options)


EVERY_TYPE = [
    UNSUB_HEADER,
    unsub_row("alice@example.com", "1", EARLY, "0"),  # admin
    unsub_row("IVAN@example.com ", "2", EARLY, "1"),  # admin, other list, other case
    unsub_row("bob@example.com", "1", EARLY, "2"),  # the recipient's own link
    unsub_row("carol@example.com", "1", EARLY, "4"),  # imported as unsubscribed: carol already is
    unsub_row("dave@example.com", "1", EARLY, "8"),  # hard bounce: every list, suppressed
    unsub_row("grace@example.com", "1", EARLY, "16"),  # complaint: every list, suppressed
    unsub_row("judy@example.com", "1", EARLY, "2"),  # older than judy's consented re-subscription
    unsub_row("stranger@example.com", "1", EARLY, "2"),  # not in the CRM
]


def test_mailup_unsubscribers_apply_every_optout_type_by_the_rules(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    drop(tmp_path, "unsubscribers_20260105.csv", EVERY_TYPE)
    report = sync.import_files()
    [outcome] = report.files
    assert (outcome.outcome, outcome.rows, outcome.rejected) == ("applied", 8, 0)
    engine = sync.engine
    assert status_of(engine, 1, "newsletter") == "unsubscribed"
    assert status_of(engine, 1, "offers") == "subscribed"  # status is per list
    assert status_of(engine, 11, "offers") == "unsubscribed"
    assert status_of(engine, 11, "newsletter") == "subscribed"
    assert status_of(engine, 2, "newsletter") == "unsubscribed"
    assert status_of(engine, 3, "newsletter") == "unsubscribed"
    assert [status_of(engine, 4, code) for code in ("newsletter", "offers", "events")] == ["cleaned"] * 3
    assert [status_of(engine, 9, code) for code in ("newsletter", "events")] == ["unsubscribed"] * 2
    assert status_of(engine, 12, "newsletter") == "subscribed"  # newer re-subscription with consent stands
    assert suppressed(engine) == {
        "frank@example.com": "hard_bounce",
        "dave@example.com": "hard_bounce",
        "grace@example.com": "complaint",
    }
    with engine.connect() as connection:
        dave_rows = connection.scalar(
            select(func.count()).select_from(subscriptions).where(subscriptions.c.contact_id == 4)
        )
        assert connection.scalar(select(func.count()).select_from(activities)) == 7
    assert dave_rows == 3  # an opt-out for a list without a CRM row is recorded, not dropped
    assert change_count(engine) == 1 + 1 + 1 + 3 + 3  # alice, ivan, bob, dave x3, grace x3
    results = {row[1].strip().lower(): row[4] for row in read_csv(outcome.result_path)[1:]}  # type: ignore[arg-type]
    assert results["carol@example.com"] == "unchanged"
    assert results["judy@example.com"] == "unchanged"
    assert results["stranger@example.com"] == "no_contact"
    assert results["dave@example.com"] == "applied"
    assert read_csv(outcome.errors_path) == [[*UNSUB_HEADER, "bs_line", "bs_reason", "bs_origin"]]  # type: ignore[arg-type]
    assert outcome.kept_at is not None and outcome.kept_at.parent.name == "archive" and outcome.kept_at.exists()
    assert not any((tmp_path / "work" / "inbox").iterdir())


def test_a_newer_crm_resubscription_without_consent_loses(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    from .crmdata import set_status

    set_status(sync.engine, 12, "newsletter", "subscribed", datetime(2026, 1, 10, tzinfo=UTC), consent_by=None)
    drop(tmp_path, "unsubscribers_1.csv", [UNSUB_HEADER, unsub_row("judy@example.com", "1", EARLY, "2")])
    sync.import_files()
    assert status_of(sync.engine, 12, "newsletter") == "unsubscribed"


def test_the_same_file_again_is_a_recorded_duplicate(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    drop(tmp_path, "unsubscribers_a.csv", EVERY_TYPE)
    sync.import_files()
    changes = change_count(sync.engine)
    drop(tmp_path, "unsubscribers_b.csv", EVERY_TYPE)
    [outcome] = sync.import_files().files
    assert outcome.outcome == "duplicate"
    assert change_count(sync.engine) == changes
    with sync.engine.connect() as connection:
        outcomes = sorted(connection.scalars(select(bs_files.c.outcome)))
    assert outcomes == ["applied", "duplicate"]


def test_utf8_bom_is_read(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    drop(
        tmp_path,
        "unsubscribers_bom.csv",
        [UNSUB_HEADER, unsub_row("bob@example.com", "1", EARLY, "2")],
        encoding="utf-8-sig",
    )
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed, outcome.rejected) == ("applied", 1, 0)
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"


def test_cp1252_text_where_the_profile_says_cp1252(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock, **{"inbound": [_inbound_cp1252()]})
    header = [*UNSUB_HEADER, "Name"]
    drop(
        tmp_path,
        "unsubscribers_win.csv",
        [header, [*unsub_row("bob@example.com", "1", EARLY, "2"), "Bjørn Müller"]],
        encoding="cp1252",
    )
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed) == ("applied", 1)
    errors = outcome.errors_path.read_bytes()  # type: ignore[union-attr]
    assert errors.startswith(b"email;")
    result = read_csv(outcome.result_path, encoding="cp1252")  # type: ignore[arg-type]
    assert result[1][4] == "applied"


def _inbound_cp1252() -> dict[str, object]:
    import tomllib

    from .conftest import ROOT

    entry = tomllib.loads((ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8"))["inbound"][0]
    entry["encoding"] = "cp1252"
    return dict(entry)


def test_a_wrong_header_quarantines_the_file_and_applies_nothing(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    drop(
        tmp_path,
        "unsubscribers_bad.csv",
        [["mail", "idList", "OptOut_Date", "optout_type"], ["bob@example.com", "1", EARLY, "2"]],
    )
    report = sync.import_files()
    [outcome] = report.files
    assert outcome.outcome == "quarantined"
    assert "wrong header" in (outcome.reason or "") and "email" in (outcome.reason or "")
    assert status_of(sync.engine, 2, "newsletter") == "subscribed"
    quarantine = tmp_path / "work" / "quarantine"
    assert (quarantine / "unsubscribers_bad.csv").exists()
    assert "wrong header" in (quarantine / "unsubscribers_bad.csv.reason.txt").read_text()
    assert change_count(sync.engine) == 0


def test_bad_rows_go_to_the_errors_file_and_the_rest_applies(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    drop(
        tmp_path,
        "unsubscribers_rows.csv",
        [
            UNSUB_HEADER,
            unsub_row("bob@example.com", "1", EARLY, "2"),
            unsub_row("not an email", "1", EARLY, "2"),
            unsub_row("alice@example.com", "99", EARLY, "2"),
            unsub_row("ivan@example.com", "1", "yesterday", "2"),
            unsub_row("dave@example.com", "1", EARLY, "2"),
        ],
    )
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed, outcome.rejected) == ("applied", 2, 3)
    errors = read_csv(outcome.errors_path)  # type: ignore[arg-type]
    assert [row[-3] for row in errors[1:]] == ["3", "4", "5"]
    assert {row[-1] for row in errors[1:]} == {"admin"}  # dropped into the inbox: an admin's file
    reasons = [row[-2] for row in errors[1:]]
    assert "invalid email" in reasons[0]
    assert "unknown list id '99'" in reasons[1]
    assert "unparsable date 'yesterday'" in reasons[2]
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(sync.engine, 4, "newsletter") == "unsubscribed"
    assert status_of(sync.engine, 1, "newsletter") == "subscribed"
    # Fix the rejected rows and drop the errors file back in: it is read like the original.
    fixed = [errors[0], *([*row[:2], "1", EARLY, *row[4:]] for row in errors[2:3])]
    drop(tmp_path, "unsubscribers_fixed.csv", fixed)
    [again] = sync.import_files().files
    assert (again.changed, again.rejected) == (1, 0)
    assert status_of(sync.engine, 1, "newsletter") == "unsubscribed"


def test_an_empty_file_is_quarantined(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    (tmp_path / "work" / "inbox" / "unsubscribers_empty.csv").write_bytes(b"")
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.reason) == ("quarantined", "empty file")


def test_a_truncated_last_line_quarantines_the_file(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    path = drop(
        tmp_path,
        "unsubscribers_cut.csv",
        [UNSUB_HEADER, unsub_row("bob@example.com", "1", EARLY, "2"), unsub_row("alice@example.com", "1", EARLY, "2")],
    )
    path.write_bytes(path.read_bytes()[:-12])  # the transfer stopped mid-row
    [outcome] = sync.import_files().files
    assert outcome.outcome == "quarantined"
    assert "truncated last line 3" in (outcome.reason or "")
    assert status_of(sync.engine, 2, "newsletter") == "subscribed"


def test_unsubscribe_from_all_lists_policy(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock, **{"policy.unsubscribe_all_lists": True})
    drop(tmp_path, "unsubscribers_1.csv", [UNSUB_HEADER, unsub_row("alice@example.com", "1", EARLY, "2")])
    sync.import_files()
    assert [status_of(sync.engine, 1, code) for code in ("newsletter", "offers")] == ["unsubscribed"] * 2


def test_import_over_ftp_takes_the_remote_file_once_and_moves_it(
    tmp_path: Path, db_url: str, clock: ManualClock, ftp_server: object
) -> None:
    sync = make_sync(tmp_path, db_url, clock, transport=ftp_transport(ftp_server))  # type: ignore[arg-type]
    remote = write_csv(tmp_path / "provider" / "export" / "unsubscribers_20260105.csv", EVERY_TYPE)
    write_csv(tmp_path / "provider" / "export" / "other.csv", EVERY_TYPE)
    [outcome] = sync.import_files().files
    assert outcome.changed == 5
    assert not remote.exists()
    assert len(list((tmp_path / "provider" / "export" / "processed").iterdir())) == 1
    assert (tmp_path / "provider" / "export" / "other.csv").exists()
    assert sync.import_files().files == []


def test_dry_run_import_changes_nothing(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    path = drop(tmp_path, "unsubscribers_1.csv", EVERY_TYPE)
    [outcome] = sync.import_files(dry_run=True).files
    assert outcome.changed == 5
    assert path.exists()
    assert status_of(sync.engine, 2, "newsletter") == "subscribed"
    assert change_count(sync.engine) == 0
    assert outcome.result_path is not None and outcome.result_path.parent.name == "dry-run"


def test_a_file_younger_than_the_minimum_age_waits_for_the_next_run(tmp_path: Path, db_url: str) -> None:
    path = drop(tmp_path / "x", "unused.csv", [["x"]])  # makes the folder; the clock starts at this file's time
    clock = ManualClock(datetime.fromtimestamp(path.stat().st_mtime, UTC))
    sync = make_sync(tmp_path, db_url, clock)
    drop(tmp_path, "unsubscribers_new.csv", [UNSUB_HEADER, unsub_row("bob@example.com", "1", EARLY, "2")])
    report = sync.import_files()
    assert report.files == [] and report.waiting == ["inbox/unsubscribers_new.csv"]
    clock.advance(121)
    [outcome] = sync.import_files().files
    assert outcome.changed == 1


def test_a_dropped_file_matching_no_pattern_is_quarantined_with_its_reason(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    drop(tmp_path, "notes.txt", [["hello"]])
    report = sync.import_files()
    assert report.has_rejections and report.refused == ["inbox/notes.txt: matches no inbound pattern"]
    assert (tmp_path / "work" / "quarantine" / "notes.txt.reason.txt").exists()


def test_the_shipped_sample_file_imports_without_rejections(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    from .conftest import ROOT

    sync = make_sync(tmp_path, db_url, clock)
    [outcome] = sync.import_files([ROOT / "samples" / "mailup" / "unsubscribers_sample.csv"]).files
    assert (outcome.outcome, outcome.rows, outcome.rejected) == ("applied", 30, 0)
    assert (ROOT / "samples" / "mailup" / "unsubscribers_sample.csv").exists()  # --file leaves the original


def test_undecodable_text_quarantines_the_file_naming_the_line(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock)
    path = drop(
        tmp_path,
        "unsubscribers_latin.csv",
        [
            UNSUB_HEADER,
            unsub_row("bob@example.com", "1", EARLY, "2"),
            [*unsub_row("alice@example.com", "1", EARLY, "2")[:6], "Müller"],
        ],
        encoding="latin-1",
    )
    assert b"\xfc" in path.read_bytes()
    [outcome] = sync.import_files().files
    assert outcome.outcome == "quarantined"
    assert "not valid utf-8 text at line 3" in (outcome.reason or "")
    assert status_of(sync.engine, 2, "newsletter") == "subscribed"


def test_the_inbox_can_live_outside_the_work_folder(tmp_path: Path, db_url: str, clock: ManualClock) -> None:
    sync = make_sync(tmp_path, db_url, clock, **{"work.inbox_dir": str(tmp_path / "drop")})
    write_csv(tmp_path / "drop" / "unsubscribers_1.csv", [UNSUB_HEADER, unsub_row("bob@example.com", "1", EARLY, "2")])
    [outcome] = sync.import_files().files
    assert outcome.changed == 1 and not (tmp_path / "drop" / "unsubscribers_1.csv").exists()


def test_an_inbox_on_another_file_system_is_taken_whole(tmp_path: Path, clock: ManualClock) -> None:
    import os
    import tempfile

    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
    sync = make_sync(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", clock, **{"work.inbox_dir": str(other)})
    write_csv(other / "unsubscribers_1.csv", [UNSUB_HEADER, unsub_row("bob@example.com", "1", EARLY, "2")])
    [outcome] = sync.import_files().files
    assert outcome.changed == 1 and list(other.iterdir()) == []
    other.rmdir()


UNDOCUMENTED = ["3", "99", "2564", "5122", "x", ""]


def test_every_mailup_optout_type_documented_or_not_applies_an_opt_out(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """MailUp's table of unsubscribe types, and codes no one documented: every row with a valid address and
    list is an opt-out. Hard bounces and complaints leave every list and suppress; an unknown code is an
    unsubscribe, reported as a warning, never a rejected row."""
    user = User(tmp_path, db_url, capsys).start()
    codes = load_profile(ROOT / "profiles" / "mailup.toml").inbound[0].codes
    every = [*codes, *UNDOCUMENTED]
    people = {code: f"code{index}@example.com" for index, code in enumerate(every)}
    with user.engine.begin() as connection:
        ids = crm.list_ids(connection, ["newsletter", "offers"])
        for index, email in enumerate(people.values(), start=100):
            crm.insert_rows(connection, "contacts", [_contact(index, email)])
            for list_id in ids.values():
                crm.insert_rows(connection, "subscriptions", [_subscribed(index, list_id)])
    stamp = mailup_time(hours_ago(2))
    user.provider_file([unsub_row(email, "1", stamp, code) for code, email in people.items()])
    done = user.batchsync("import")
    assert done.code == 0 and f"{len(UNDOCUMENTED)} warnings" in done.out, done.out + done.err
    for index, code in enumerate(every, start=100):
        kind = codes[code].event if code in codes else "unsubscribe"
        expected = {"hard_bounce": "cleaned", "clean": "cleaned"}.get(kind, "unsubscribed")
        assert status_of(user.engine, index, "newsletter") == expected, code
        everywhere = kind in ("hard_bounce", "complaint", "clean")
        assert status_of(user.engine, index, "offers") == (expected if everywhere else "subscribed"), code
        assert (people[code] in suppressed(user.engine)) == everywhere, code
    assert (
        len(user.provider_optouts())
        == len(every) + sum(codes[code].event in ("hard_bounce", "complaint", "clean") for code in codes) * 2
    )  # bounces and complaints: every list of the profile
    [results] = list((tmp_path / "work" / "archive").glob("unsubscribers_*.result.csv"))
    warned = [row for row in read_csv(results)[1:] if row[5].startswith("warning: unknown code")]
    assert len(warned) == len(UNDOCUMENTED) and all(row[4] == "applied" for row in warned)
    user.close()


def _contact(contact_id: int, email: str) -> dict[str, object]:
    return {
        "id": contact_id,
        "email": email,
        "email_key": email,
        "first_name": "Code",
        "last_name": str(contact_id),
        "custom": {},
        "created_at": T0,
        "updated_at": T0,
        "deleted": False,
    }


def _subscribed(contact_id: int, list_id: int) -> dict[str, object]:
    return {"contact_id": contact_id, "list_id": list_id, "status": "subscribed", "status_at": T0, "source": "crm"}
