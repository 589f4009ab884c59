"""The daemon's jobs on a clock the test moves: nights cut short, nights that meet a held lock, bounded catch-up,
one start per night, profiles that share a name, failures said once, alerts once a day, and the problems
`status` finds in the work folders."""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.daemon import Daemon
from batchsync.db import ledger
from batchsync.db.schema import bs_runs, make_engine
from batchsync.errors import DatabaseUnavailable
from batchsync.locks import profile_lock
from batchsync.status import profile_status
from batchsync.sync import Sync
from batchsync.trouble import Trouble
from batchsync.web import Snapshot, status_page

from .conftest import Inbox, notify_section
from .test_daemon import prepared

NIGHT = "nightly 2026-01-05 02:30"


def nights(db_url: str) -> list[tuple[str | None, str]]:
    engine = make_engine(db_url)
    with engine.connect() as connection:
        query = select(bs_runs.c.slot, bs_runs.c.outcome).where(bs_runs.c.slot.is_not(None)).order_by(bs_runs.c.id)
        found = [(slot, outcome) for slot, outcome in connection.execute(query)]
    engine.dispose()
    return found


def ran_a_night_before(path: Path) -> None:
    sync = Sync(load_profile(path))
    with sync.engine.begin() as connection:
        at = datetime(2026, 1, 1, 1, 30, tzinfo=UTC)
        run = ledger.start_run(connection, "mailup", "run", at, "nightly 2026-01-01 02:30")
        ledger.finish_run(connection, run, "ok", {}, [], None, at)
    sync.engine.dispose()


def test_a_night_cut_short_by_a_stop_is_interrupted_and_runs_again_at_the_next_start(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    ran_a_night_before(profile)
    clock = ManualClock(datetime(2026, 1, 5, 1, 31, tzinfo=UTC))  # 02:31 in Rome, just after the slot
    sync = Sync(load_profile(profile), clock=clock)
    sync.stop.set()  # the stop signal came while the night ran
    sync.run(slot=NIGHT)
    assert nights(db_url)[-1] == (NIGHT, "interrupted")
    [problem] = profile_status(load_profile(profile), clock).problems
    assert "interrupted" in problem
    daemon = Daemon([profile], clock=clock)
    daemon.start()  # the next start runs the night again, whole
    daemon.close()
    assert nights(db_url)[-2:] == [(NIGHT, "interrupted"), (NIGHT, "ok")]
    assert profile_status(load_profile(profile), clock).problems == []


def test_a_night_that_meets_a_held_lock_is_tried_again_a_minute_later(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    clock = ManualClock(datetime(2026, 1, 5, 1, 29, tzinfo=UTC))
    daemon = Daemon([profile], clock=clock)
    daemon.start()
    loaded = load_profile(profile)
    try:
        with profile_lock(loaded, make_engine(db_url)):  # an admin's import by hand holds the profile
            clock.advance(120)
            daemon.run_once()
        assert nights(db_url) == []
        clock.advance(61)
        daemon.run_once()
    finally:
        daemon.close()
    assert nights(db_url) == [(NIGHT, "ok")]


def test_a_night_that_keeps_failing_is_not_run_again_at_every_start(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url, extra="retry_minutes = [5]\n")
    ran_a_night_before(profile)
    engine = make_engine(db_url)
    with engine.begin() as connection:  # the night and its one retry failed, before a crash and a restart
        for minute in (30, 35):
            at = datetime(2026, 1, 5, 1, minute, tzinfo=UTC)
            run = ledger.start_run(connection, "mailup", "run", at, NIGHT)
            ledger.finish_run(connection, run, "failed", {}, [], "the server refused", at)
    engine.dispose()
    daemon = Daemon([profile], clock=ManualClock(datetime(2026, 1, 5, 3, 0, tzinfo=UTC)))
    daemon.start()
    daemon.close()
    assert [outcome for slot, outcome in nights(db_url) if slot == NIGHT] == ["failed", "failed"]


def test_the_schedule_firing_twice_for_one_night_starts_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    daemon = Daemon([profile], clock=ManualClock(datetime(2026, 1, 5, 1, 31, tzinfo=UTC)))
    daemon.start()
    try:
        [runtime] = daemon.runtimes.values()
        with caplog.at_level(logging.DEBUG):
            runtime.scheduled_night()
            runtime.scheduled_night()  # as `schedule` may across a change of daylight saving time
    finally:
        daemon.close()
    assert nights(db_url) == [(NIGHT, "ok")]
    messages = [record.getMessage() for record in caplog.records]
    assert not any("already ran" in message for message in messages)  # the second never reached the database
    assert any("fired again for a night already started" in message for message in messages)


def test_a_second_profile_file_with_a_name_already_taken_is_skipped(tmp_path: Path) -> None:
    first = prepared(tmp_path / "a", f"sqlite:///{tmp_path / 'a.sqlite'}")
    second = prepared(tmp_path / "b", f"sqlite:///{tmp_path / 'b.sqlite'}")
    daemon = Daemon([first, second], clock=ManualClock(datetime(2026, 1, 2, 23, 0, tzinfo=UTC)))
    daemon.start()
    daemon.close()
    assert list(daemon.runtimes) == [first]
    assert "profile name 'mailup' is taken by" in daemon.broken[second]


def test_one_database_down_is_said_once_whichever_jobs_find_it(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(datetime(2026, 1, 5, tzinfo=UTC))
    trouble = Trouble("mailup", clock)
    down = DatabaseUnavailable("the database cannot be used: connection refused")
    with caplog.at_level(logging.INFO, logger="batchsync.trouble"):
        for _ in range(40):
            for job in ("inbox", "poll"):
                if not trouble.blocked(job):
                    trouble.failed(job, down, str(down))
            clock.advance(5)
        assert trouble.blocked("nightly")  # a database down holds back every job
        trouble.cleared("inbox")
    said = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert len(said) == 2, said
    assert "database unavailable" in said[0] and "working again" in said[1]
    assert trouble.describe() == [] and not trouble.blocked("poll")


def test_a_failure_is_mailed_once_a_day_even_by_a_restarted_daemon(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    from batchsync.alerts import Alerts

    mailbox, port = smtp
    profile = load_profile(prepared(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", extra=notify_section(port)))
    clock = ManualClock(datetime(2026, 1, 5, 1, 30, tzinfo=UTC))
    error = DatabaseUnavailable("connection refused")
    assert Alerts(profile, clock).failed("nightly", "the nightly run", error, str(error))
    clock.advance(3600)
    assert not Alerts(profile, clock).failed("nightly", "the nightly run", error, str(error))  # a restart
    clock.advance(86400)
    assert Alerts(profile, clock).failed("nightly", "the nightly run", error, str(error))
    assert len(mailbox.messages) == 2


def test_status_finds_files_stuck_in_staging_and_quarantine_left_for_a_day(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = load_profile(prepared(tmp_path, db_url))
    work = tmp_path / "work"
    staged = work / "staging" / "provider" / "unsubscribers" / "unsubscribers_1.csv"
    staged.parent.mkdir(parents=True)
    staged.write_text("x")
    (work / "quarantine" / "bad.csv").write_text("x")
    (work / "quarantine" / "bad.csv.reason.txt").write_text("empty file\n")
    clock = ManualClock(datetime.now(UTC))
    assert profile_status(profile, clock).problems == []
    old = time.time() - 2 * 86400
    for path in (staged, work / "quarantine" / "bad.csv.reason.txt"):
        os.utime(path, (old, old))
    problems = profile_status(profile, clock).problems
    assert problems == [
        "1 files stuck in staging for over an hour: unsubscribers_1.csv",
        "1 files in quarantine or held/ for over a day: bad.csv",
    ]


def test_the_status_page_escapes_what_it_shows(tmp_path: Path) -> None:
    from batchsync.status import ProfileStatus

    status = ProfileStatus("<script>alert(1)</script>", problems=["file <img src=x onerror=alert(1)>.csv"])
    status.last_runs = [
        {
            "id": 1,
            "kind": "run",
            "slot": None,
            "started_at": datetime(2026, 1, 5, tzinfo=UTC),
            "outcome": "failed",
            "counts": {},
            "message": "<b>bold</b> & more",
        }
    ]
    page = status_page(Snapshot(True, None, [status], 0.0))
    assert "<script>" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page


def test_a_failed_night_mended_by_an_admin_s_run_needs_no_more_attention(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    clock = ManualClock(datetime(2026, 1, 5, 1, 40, tzinfo=UTC))
    engine = make_engine(db_url)
    with engine.begin() as connection:
        run = ledger.start_run(connection, "mailup", "run", clock.now() - timedelta(minutes=10), NIGHT)
        ledger.finish_run(connection, run, "failed", {}, [], "the server refused", clock.now())
    engine.dispose()
    [problem] = profile_status(load_profile(profile), clock).problems
    assert "failed: the server refused" in problem
    Sync(load_profile(profile), clock=clock).run()  # the admin fixed it and ran it by hand
    assert profile_status(load_profile(profile), clock).problems == []
