"""The daemon: schedules on a fake clock, a watched inbox, one run at a time, clean stops, crash recovery."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from batchsync.clock import Clock, ManualClock
from batchsync.daemon import Daemon
from batchsync.db.schema import bs_changes, bs_files, bs_runs, make_engine

from .conftest import ROOT
from .crmdata import UNSUB_HEADER, build_tiny_crm, status_of, unsub_row, write_csv


def write_profile(folder: Path, db_url: str, *, extra: str = "", name: str = "mailup") -> Path:
    """The MailUp profile on a local provider folder, scheduled at 02:30 Rome time, full on Sundays."""
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    text = text.replace('name = "mailup"', f'name = "{name}"')
    text = text.replace('url_env = "BATCHSYNC_CRM_URL"', f'url = "{db_url}"')
    text = text.replace('dir = "../var/mailup"', f'dir = "{folder}/work"')
    text = text.replace('kind = "ftp"', f'kind = "local"\npath = "{folder}/provider"')
    text += f'\n[schedule]\nnightly = "02:30"\ntimezone = "Europe/Rome"\n{extra}'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "provider" / "export").mkdir(parents=True, exist_ok=True)  # MailUp's inbox folder, as it has it
    path = folder / "profile.toml"
    path.write_text(text, encoding="utf-8")
    return path


def prepared(folder: Path, db_url: str, **options: str) -> Path:
    path = write_profile(folder, db_url, **options)
    from batchsync.config import load_profile
    from batchsync.sync import Sync

    sync = Sync(load_profile(path))
    sync.init()
    build_tiny_crm(sync.engine)
    sync.engine.dispose()
    return path


def runs(db_url: str) -> list[tuple[str, str | None, datetime, str, dict[str, int]]]:
    engine = make_engine(db_url)
    with engine.connect() as connection:
        rows = connection.execute(
            select(bs_runs.c.kind, bs_runs.c.slot, bs_runs.c.started_at, bs_runs.c.outcome, bs_runs.c.counts).order_by(
                bs_runs.c.id
            )
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def test_a_nightly_run_happens_once_a_night_full_on_its_weekday(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    clock = ManualClock(datetime(2026, 1, 2, 23, 0, tzinfo=UTC))  # a Friday
    daemon = Daemon([profile], clock=clock)
    daemon.start()
    try:
        while clock.now() < datetime(2026, 1, 5, 4, 0, tzinfo=UTC):
            clock.advance(300)
            daemon.run_once()
    finally:
        daemon.close()
    nightly = [row for row in runs(db_url) if row[0] == "run"]
    assert [row[1] for row in nightly] == [
        "nightly 2026-01-03 02:30",
        "nightly 2026-01-04 02:30",
        "nightly 2026-01-05 02:30",
    ]
    for (_kind, _slot, started, outcome, _counts), day in zip(nightly, (3, 4, 5), strict=True):
        assert started == datetime(2026, 1, day, 1, 30, tzinfo=UTC)  # 02:30 in Rome, to the tick
        assert outcome == "ok"
    assert [row[4]["full_export"] for row in nightly] == [0, 1, 0]  # Saturday diff, Sunday full, Monday diff


def test_a_slow_writer_s_file_is_imported_once_when_complete_and_a_copy_is_a_duplicate(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    daemon = Daemon([profile], clock=Clock())
    daemon.start()
    inbox = tmp_path / "work" / "inbox"
    rows = [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")]
    rows += [unsub_row(f"nobody{i}@example.com", "1", "20260105T100000", "2") for i in range(3000)]
    content = "".join(";".join(row) + "\r\n" for row in rows).encode()
    chunks = [
        content[: len(content) // 3],
        content[len(content) // 3 : 2 * len(content) // 3],
        content[2 * len(content) // 3 :],
    ]

    def slow_writer() -> None:
        with (inbox / "unsubscribers_slow.csv").open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                handle.flush()
                time.sleep(1.0)

    writer = threading.Thread(target=slow_writer)
    try:
        writer.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (writer.is_alive() or any(inbox.iterdir())):
            daemon.run_once()
            time.sleep(0.1)
        writer.join()
        (inbox / "unsubscribers_copy.csv").write_bytes(content)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(inbox.iterdir()):
            daemon.run_once()
            time.sleep(0.1)
    finally:
        daemon.close()
    engine = make_engine(db_url)
    with engine.connect() as connection:
        files = connection.execute(select(bs_files.c.name, bs_files.c.outcome, bs_files.c.detail)).all()
        changes = connection.scalar(select(func.count()).select_from(bs_changes))
    assert [(name, outcome) for name, outcome, _ in files] == [
        ("unsubscribers_slow.csv", "applied"),
        ("unsubscribers_copy.csv", "duplicate"),
    ]
    assert "rows=3001" in files[0][2]
    assert changes == 1 and status_of(engine, 2, "newsletter") == "unsubscribed"
    engine.dispose()


def test_two_daemons_on_one_postgresql_crm_run_a_night_once(tmp_path: Path, pg_server: str) -> None:
    from sqlalchemy import text

    admin = make_engine(f"{pg_server}/postgres").execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text('CREATE DATABASE "two_daemons"'))
    admin.dispose()
    db_url = f"{pg_server}/two_daemons"
    first = prepared(tmp_path / "host-a", db_url)
    second = write_profile(tmp_path / "host-b", db_url)  # another host: its own folders, the same CRM
    start = datetime(2026, 1, 3, 1, 25, tzinfo=UTC)
    daemons = [Daemon([path], clock=ManualClock(start)) for path in (first, second)]
    for daemon in daemons:
        daemon.start()
    barrier = threading.Barrier(2)

    def night(daemon: Daemon) -> None:
        assert isinstance(daemon.clock, ManualClock)
        daemon.clock.advance(600)
        barrier.wait()
        daemon.run_once()

    threads = [threading.Thread(target=night, args=(daemon,)) for daemon in daemons]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for daemon in daemons:  # both look again: the slot is taken
            daemon.run_once()
    finally:
        for daemon in daemons:
            daemon.close()
    nightly = [row for row in runs(db_url) if row[0] == "run"]
    assert [row[1] for row in nightly] == ["nightly 2026-01-03 02:30"]


def _daemon_process(profile: Path, log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "batchsync.cli", "daemon", str(profile), "--tick", "0.2"], stdout=handle, stderr=handle
    )


def _big_file(inbox: Path, rows: int) -> Path:
    lines = [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")]
    lines += [unsub_row(f"nobody{i}@example.com", "1", "20260105T100000", "2") for i in range(rows)]
    return write_csv(inbox / "unsubscribers_big.csv", lines)


def _wait_until_importing(tmp_path: Path, log: Path) -> None:
    """Until the file's transaction holds the CRM's write lock (the import takes under a second: a fixed wait
    could miss it)."""
    deadline = time.monotonic() + 30
    staged = tmp_path / "work" / "staging" / "admin" / "unsubscribers" / "unsubscribers_big.csv"
    while not staged.exists():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    while not _write_locked(tmp_path / "crm.sqlite"):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.005)


def _write_locked(database: Path) -> bool:
    probe = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        probe.close()


def _applied(db_url: str) -> tuple[int, int]:
    engine = make_engine(db_url)
    with engine.connect() as connection:
        applied = connection.scalar(select(func.count()).select_from(bs_files).where(bs_files.c.outcome == "applied"))
        changes = connection.scalar(select(func.count()).select_from(bs_changes))
    engine.dispose()
    return int(applied or 0), int(changes or 0)


@contextmanager
def _daemon_mid_import(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """A daemon process busy importing a 60k-row file: (CRM URL, profile, process)."""
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    process = _daemon_process(profile, tmp_path / "daemon.log")
    try:
        time.sleep(1.5)
        _big_file(tmp_path / "work" / "inbox", 300_000)
        _wait_until_importing(tmp_path, tmp_path / "daemon.log")
        yield db_url, profile, process
    finally:
        process.kill()


def test_sigterm_during_an_import_finishes_the_file_and_exits_0(tmp_path: Path) -> None:
    with _daemon_mid_import(tmp_path) as (db_url, _profile, process):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "daemon.log").read_text()
    applied, changes = _applied(db_url)
    assert (applied, changes) in ((1, 1), (0, 0))  # wholly applied, or not at all
    assert "finishing the file in hand" in (tmp_path / "daemon.log").read_text()


def test_kill_9_during_an_import_then_a_restart_applies_the_file_exactly_once(tmp_path: Path) -> None:
    with _daemon_mid_import(tmp_path) as (db_url, profile, process):
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    assert _applied(db_url) == (0, 0)  # killed mid-transaction: nothing of it committed
    restarted = _daemon_process(profile, tmp_path / "daemon2.log")
    try:
        deadline = time.monotonic() + 60
        while _applied(db_url)[0] == 0:
            assert time.monotonic() < deadline, (tmp_path / "daemon2.log").read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=60) == 0
    finally:
        restarted.kill()
    assert _applied(db_url) == (1, 1)
    failed = [row for row in runs(db_url) if row[3] == "failed"]
    assert len(failed) == 1  # the killed run, closed as failed by the restart


@pytest.mark.parametrize("broken", [True, False])
def test_sighup_reloads_profiles_and_keeps_the_old_one_when_broken(tmp_path: Path, broken: bool) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    daemon = Daemon([profile], clock=ManualClock(datetime(2026, 1, 2, 23, 0, tzinfo=UTC)))
    daemon.start()
    try:
        text = profile.read_text()
        profile.write_text(text.replace('nightly = "02:30"', 'nightly = "03:45"' if not broken else "nightly = 5"))
        daemon.reload_requested = True
        daemon.reload()
        [runtime] = daemon.runtimes.values()
        assert runtime.profile.schedule.nightly == ("02:30" if broken else "03:45")
    finally:
        daemon.close()


def test_the_remote_inbox_is_polled_during_the_day(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url, extra="poll_minutes = 30\n")
    clock = ManualClock(datetime(2030, 1, 3, 9, 0, tzinfo=UTC))  # long after the file below was written
    daemon = Daemon([profile], clock=clock)
    daemon.start()
    try:
        write_csv(
            tmp_path / "provider" / "export" / "unsubscribers_noon.csv",
            [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")],
        )
        clock.advance(29 * 60)
        daemon.run_once()
        assert (tmp_path / "provider" / "export" / "unsubscribers_noon.csv").exists()
        clock.advance(60)
        daemon.run_once()
    finally:
        daemon.close()
    assert not (tmp_path / "provider" / "export" / "unsubscribers_noon.csv").exists()
    assert [row[0] for row in runs(db_url)] == ["import", "import"]  # the start-up catch-up, then the poll


def test_the_daemon_reports_a_remote_inbox_folder_that_does_not_exist(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    (tmp_path / "provider" / "export").rmdir()
    daemon = Daemon([profile], clock=ManualClock(datetime(2026, 1, 2, 23, 0, tzinfo=UTC)))
    with caplog.at_level("ERROR"):
        daemon.start()
    daemon.close()
    assert "the remote folder 'export' does not exist on the server" in caplog.text
