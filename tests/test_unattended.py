"""Unattended operation as an admin meets it: the real daemon process and its listener, a real SMTP server
(aiosmtpd), a real FTP server (pyftpdlib), PostgreSQL stopped under it, a broken profile beside a good one, and
the status page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text

from batchsync.clock import Clock
from batchsync.config import Profile, load_profile
from batchsync.db import ledger
from batchsync.db.schema import bs_files, bs_runs, bs_snapshots, make_engine
from batchsync.errors import LockLost
from batchsync.ftpserver import LoopbackFtpServer
from batchsync.sync import Sync
from batchsync.transport import Transport, open_transport

from .conftest import ROOT, Inbox, PostgresServer, make_database, notify_section
from .crmdata import UNSUB_HEADER, build_tiny_crm, unsub_row, write_csv
from .peers import free_port

FTP_USER, FTP_PASSWORD = "provider", "the-right-password"


def profile_text(folder: Path, db_url: str, *, transport: str, name: str = "mailup", extra: str = "") -> str:
    """profiles/mailup.toml on a test CRM, with this transport section, files taken at once."""
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    text = text.replace('name = "mailup"', f'name = "{name}"')
    text = text.replace('url_env = "BATCHSYNC_CRM_URL"', f'url = "{db_url}"')
    text = text.replace('dir = "../var/mailup"', f'dir = "{folder}/work"')
    text = re.sub(r"(?ms)^\[transport\]\n.*?\n\n", f"[transport]\n{transport}\n\n", text)
    text = text.replace("min_age_seconds = 120", "min_age_seconds = 0").replace(
        "settle_seconds = 5", "settle_seconds = 0"
    )
    return text + extra


def local_transport(folder: Path) -> str:
    (folder / "provider" / "export").mkdir(parents=True, exist_ok=True)
    return f'kind = "local"\npath = "{folder}/provider"'


def ftp_transport(port: int, password_file: Path) -> str:
    return (
        f'kind = "ftp"\nhost = "127.0.0.1"\nport = {port}\nuser = "{FTP_USER}"\n'
        f'password_file = "{password_file}"\nretries = 1\ntimeout_seconds = 10'
    )


def local_profile(folder: Path, db_url: str) -> Path:
    """profiles/mailup.toml on a local provider folder, its CRM made and filled with the tiny sample."""
    profile = folder / "mailup.toml"
    profile.write_text(profile_text(folder, db_url, transport=local_transport(folder)))
    prepare_crm(profile)
    return profile


def prepare_crm(path: Path) -> None:
    sync = Sync(load_profile(path))
    sync.init()
    build_tiny_crm(sync.engine)
    sync.engine.dispose()


@contextmanager
def daemon_process(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`batchsync daemon ARGS` as a process of its own; stopped with SIGTERM (exit 0 checked) at the end."""
    with log.open("wb") as handle:
        command = [sys.executable, "-m", "batchsync.cli", "--log-level", "debug", "daemon", *args, "--tick", "0.2"]
        process = subprocess.Popen(command, stdout=handle, stderr=handle)
        try:
            yield process
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_until(check: Callable[[], bool], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.2)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def runs_counter(metrics: str) -> dict[tuple[str, str], float]:
    """batchsync_runs_total by (job, outcome), from the exposition text."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "batchsync_runs_total":
                found[(sample.labels["job"], sample.labels["outcome"])] = sample.value
    return found


def applied_files(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            query = select(func.count()).select_from(bs_files).where(bs_files.c.outcome == "applied")
            return int(connection.scalar(query) or 0)
    finally:
        engine.dispose()


def a_night_ran_before(path: Path) -> None:
    """The profile ran a night long ago: a slot missed since then is caught up at start."""
    sync = Sync(load_profile(path))
    with sync.engine.begin() as connection:
        run = ledger.start_run(
            connection, "mailup", "run", datetime(2026, 1, 1, tzinfo=UTC), "nightly 2026-01-01 02:30"
        )
        ledger.finish_run(connection, run, "ok", {}, [], None, datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    sync.engine.dispose()


def chromium(url: str, screenshot: Path) -> str:
    """The page as headless Chromium renders it: a screenshot, and the DOM's text."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is needed (scripts/test installs it)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={screenshot.parent / 'chromium-profile'}",
        "--window-size=1200,900",
    ]
    subprocess.run([binary, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    dumped = subprocess.run([binary, *flags, "--dump-dom", url], capture_output=True, timeout=120, check=True)
    return re.sub(r"<[^>]+>", " ", dumped.stdout.decode())


def test_a_failed_night_is_mailed_and_seen_by_status_healthz_and_metrics_and_its_retry_brings_it_back(
    tmp_path: Path, smtp: tuple[Inbox, int]
) -> None:
    mailbox, smtp_port = smtp
    password = tmp_path / "ftp.password"
    password.write_text("not-the-password\n")
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    slot_time = datetime.now(UTC) - timedelta(minutes=3)  # tonight's slot passed while the daemon was stopped
    schedule = f'\n[schedule]\nnightly = "{slot_time:%H:%M}"\ntimezone = "UTC"\nretry_minutes = [0.25, 0.25, 0.25]\n'
    with LoopbackFtpServer(tmp_path / "provider", FTP_USER, FTP_PASSWORD) as ftp:
        (tmp_path / "provider" / "export").mkdir()
        text = profile_text(tmp_path, db_url, transport=ftp_transport(ftp.port, password), extra=schedule)
        profile = tmp_path / "mailup.toml"
        profile.write_text(text + notify_section(smtp_port))
        prepare_crm(profile)
        a_night_ran_before(profile)
        port, log = free_port(), tmp_path / "daemon.log"
        base = f"http://127.0.0.1:{port}"
        with daemon_process(str(profile), "--listen", f"127.0.0.1:{port}", log=log):
            wait_until(lambda: bool(mailbox.messages), log)
            [alert] = mailbox.messages
            assert alert["Subject"] == f"batchsync mailup: the nightly {slot_time:%Y-%m-%d %H:%M} run FAILED"
            body = alert.get_payload(decode=True).decode()
            assert "authentication" in body.lower() or "refused" in body.lower()
            assert "not-the-password" not in body

            wait_until(lambda: http_get(f"{base}/healthz")[0] == 503, log)
            health = json.loads(http_get(f"{base}/healthz")[1])
            problems = health["profiles"][0]["problems"]
            assert any(f"the nightly {slot_time:%Y-%m-%d %H:%M} run failed: login as" in item for item in problems)
            status = subprocess.run(
                [sys.executable, "-m", "batchsync.cli", "status", "-p", str(profile)], capture_output=True, text=True
            )
            assert status.returncode == 4 and "NEEDS ATTENTION" in status.stdout, status.stdout
            assert runs_counter(http_get(f"{base}/metrics")[1])[("nightly", "failed")] >= 1

            password.write_text(FTP_PASSWORD + "\n")  # the admin fixes it; a retry (15 s apart) succeeds
            wait_until(lambda: http_get(f"{base}/healthz")[0] == 200, log)
            counted = runs_counter(http_get(f"{base}/metrics")[1])
            assert counted[("nightly", "ok")] == 1 and counted[("nightly", "failed")] >= 1
            text_of_page = chromium(base + "/", tmp_path / "status.png")
        assert len(mailbox.messages) == 2  # the alert, then the night's summary: no second alert
        sent = sorted(path.name for path in (tmp_path / "provider" / "import").rglob("*.csv"))
        assert len(sent) == 2  # both lists reached the FTP server
    engine = make_engine(db_url)
    with engine.connect() as connection:
        nights = connection.execute(select(bs_runs.c.slot, bs_runs.c.outcome).where(bs_runs.c.slot.is_not(None)))
        tonight = [outcome for slot, outcome in nights if slot == f"nightly {slot_time:%Y-%m-%d %H:%M}"]
    # the missed slot ran at start, then as its retries until one ended well: once well, never again
    assert tonight[-1] == "ok" and set(tonight[:-1]) == {"failed"} and len(tonight) <= 4
    assert (tmp_path / "status.png").stat().st_size > 5000
    assert "batchsync 0.2.0" in text_of_page and "healthy" in text_of_page
    assert "Profile mailup" in text_of_page and "started (UTC)" in text_of_page and " ok " in text_of_page
    log_text = log.read_text()
    assert "Traceback" not in log_text
    assert re.search(r"batchsync 0\.2\.0 started: 1 profiles \(mailup next night", log_text), log_text[:2000]
    assert f"the nightly {slot_time:%Y-%m-%d %H:%M} run has not ended well: running it now" in log_text


def test_a_broken_profile_is_skipped_and_sighup_takes_up_a_profile_added_to_the_folder(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    good_url = f"sqlite:///{tmp_path / 'good.sqlite'}"
    (profiles / "good.toml").write_text(
        profile_text(tmp_path / "good", good_url, transport=local_transport(tmp_path / "good"))
    )
    broken = profile_text(tmp_path / "broken", good_url, transport=local_transport(tmp_path / "broken"), name="broken")
    (profiles / "broken.toml").write_text(broken.replace(f'url = "{good_url}"', 'url_env = "BATCHSYNC_TEST_UNSET_URL"'))
    prepare_crm(profiles / "good.toml")
    added_url = f"sqlite:///{tmp_path / 'added.sqlite'}"
    added = profile_text(tmp_path / "added", added_url, transport=local_transport(tmp_path / "added"), name="added")
    rows = [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")]
    port, log = free_port(), tmp_path / "daemon.log"
    with daemon_process(str(profiles), "--listen", f"127.0.0.1:{port}", log=log) as process:
        wait_until(lambda: "started" in log.read_text(), log)
        write_csv(tmp_path / "good" / "work" / "inbox" / "unsubscribers_1.csv", rows)
        wait_until(lambda: applied_files(good_url) == 1, log)
        code, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert code == 503
        problems = {item["profile"]: item["problems"] for item in json.loads(body)["profiles"]}
        assert problems["mailup"] == []
        [reason] = problems[str(profiles / "broken.toml")]
        assert "BATCHSYNC_TEST_UNSET_URL" in reason

        (profiles / "added.toml").write_text(added)
        prepare_crm(profiles / "added.toml")
        (profiles / "broken.toml").unlink()
        process.send_signal(signal.SIGHUP)
        write_csv(tmp_path / "added" / "work" / "inbox" / "unsubscribers_1.csv", rows)
        wait_until(lambda: applied_files(added_url) == 1, log)
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, log)
    log_text = log.read_text()
    assert "BATCHSYNC_TEST_UNSET_URL is not set; skipped until it is fixed" in log_text
    assert "broken.toml is gone" not in log_text  # a broken file was never a profile: nothing to drop
    assert "Traceback" not in log_text


def test_postgresql_down_for_a_minute_is_said_a_few_times_and_the_file_dropped_meanwhile_is_applied(
    tmp_path: Path, own_pg_server: PostgresServer
) -> None:
    db_url = make_database(own_pg_server.url)
    profile = local_profile(tmp_path, db_url)
    log = tmp_path / "daemon.log"
    with daemon_process(str(profile), log=log):
        wait_until(lambda: "started" in log.read_text(), log)
        time.sleep(1)
        own_pg_server.stop()
        write_csv(
            tmp_path / "work" / "inbox" / "unsubscribers_1.csv",
            [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")],
        )
        time.sleep(60)
        said_while_down = [line for line in log.read_text().splitlines() if " DEBUG " not in line]
        own_pg_server.start()
        wait_until(lambda: applied_files(db_url) == 1, log, timeout=90)
    lines = [line for line in log.read_text().splitlines() if " DEBUG " not in line]
    outage = lines[next(i for i, line in enumerate(lines) if "database unavailable" in line) :]
    assert len(outage) <= 8, "\n".join(outage)  # down, back, the file applied, the stop: no storm
    assert any("working again" in line for line in outage), "\n".join(outage)
    assert sum("database unavailable" in line for line in said_while_down) == 1
    assert "Traceback" not in "\n".join(lines)


def test_a_wrong_password_fails_an_export_with_nothing_to_send(tmp_path: Path) -> None:
    password = tmp_path / "ftp.password"
    password.write_text("not-the-password\n")
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    with LoopbackFtpServer(tmp_path / "provider", FTP_USER, FTP_PASSWORD) as ftp:
        profile = tmp_path / "mailup.toml"
        profile.write_text(profile_text(tmp_path, db_url, transport=ftp_transport(ftp.port, password)))
        Sync(load_profile(profile)).init()  # the lists, and no contacts: nothing to send
        done = subprocess.run(
            [sys.executable, "-m", "batchsync.cli", "export", "-p", str(profile), "--diff"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "refused" in line and FTP_USER in line
    assert "not-the-password" not in done.stderr


def test_status_counts_a_slot_missed_while_the_daemon_was_down(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    slot_time = datetime.now(UTC) - timedelta(hours=2)
    schedule = f'\n[schedule]\nnightly = "{slot_time:%H:%M}"\ntimezone = "UTC"\n'
    profile = tmp_path / "mailup.toml"
    profile.write_text(profile_text(tmp_path, db_url, transport=local_transport(tmp_path), extra=schedule))
    prepare_crm(profile)
    from batchsync.status import profile_status

    assert profile_status(load_profile(profile), Clock()).problems == []  # never ran a night: nothing missed
    a_night_ran_before(profile)
    [problem] = profile_status(load_profile(profile), Clock()).problems
    assert f"nightly {slot_time:%Y-%m-%d %H:%M} run was missed" in problem


def test_cli_errors_are_one_json_line_under_log_format_json(tmp_path: Path) -> None:
    profile = tmp_path / "mailup.toml"
    profile.write_text(
        profile_text(tmp_path, "sqlite:///x.sqlite", transport=local_transport(tmp_path)).replace(
            'timezone = "Europe/Rome"', 'timezone = "Europe/Roma"', 1
        )
    )
    env = {**os.environ}
    done = subprocess.run(
        [sys.executable, "-m", "batchsync.cli", "--log-format", "json", "check", "-p", str(profile)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["exit_code"] == 2
    assert "Europe/Roma" in entry["message"] and "unknown time zone" in entry["message"]
    version = subprocess.run([sys.executable, "-m", "batchsync.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == "batchsync, version 0.2.0"


def test_a_run_whose_lock_session_dies_stops_before_its_next_commit_and_the_other_run_alone_writes(
    tmp_path: Path, pg_server: str
) -> None:
    db_url = make_database(pg_server)
    profile = local_profile(tmp_path, db_url)
    reached, release = threading.Event(), threading.Event()

    def held_up(loaded: Profile) -> Transport:  # the real local transport, once the test lets the run go on
        reached.set()
        release.wait(60)
        return open_transport(loaded)

    first = Sync(load_profile(profile), transport_factory=held_up)
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(failure, lambda: first.run("full")))
    thread.start()
    assert reached.wait(60)  # the first run imported, and its export is about to connect
    engine = make_engine(db_url)
    with engine.begin() as connection:  # what a server's idle_session_timeout or a restart does to its session
        killed = connection.scalar(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
    assert killed
    second = Sync(load_profile(profile)).run("full")
    assert second is not None and second.exported is not None and second.exported.rows > 0
    release.set()
    thread.join(60)
    [error] = failure
    assert isinstance(error, LockLost) and "stopped before writing more" in str(error)
    with engine.connect() as connection:
        runs = connection.execute(select(bs_runs.c.id, bs_runs.c.outcome).order_by(bs_runs.c.id)).all()
        stamps = connection.execute(
            select(func.count(), func.max(bs_snapshots.c.made_at)).where(bs_snapshots.c.state == "current")
        ).one()
    engine.dispose()
    assert [outcome for _, outcome in runs] == ["failed", "ok"]  # the first closed by the second as interrupted
    uploaded = sorted((tmp_path / "provider" / "import").rglob("*.csv"))
    assert len(uploaded) == 2  # the second run's two lists; the first uploaded nothing
    sent = [path for path in (tmp_path / "work" / "sent").iterdir() if re.fullmatch(r"\d+_\d+\.csv", path.name)]
    assert stamps[0] > 0 and len(sent) == 2
    assert not [path for path in (tmp_path / "work" / "outbox").iterdir() if path.suffix == ".csv"]


def _catch(failure: list[BaseException], action: Callable[[], object]) -> None:
    try:
        action()
    except BaseException as exc:
        failure.append(exc)


def test_json_log_lines_carry_the_profile_and_the_run(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = local_profile(tmp_path, db_url)
    write_csv(
        tmp_path / "work" / "inbox" / "unsubscribers_1.csv",
        [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")],
    )
    done = subprocess.run(
        [sys.executable, "-m", "batchsync.cli", "--log-format", "json", "import", "-p", str(profile)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    [applied] = [entry for entry in entries if "applied" in entry["message"]]
    assert applied["profile"] == "mailup" and applied["run"] == 1


def test_the_daemon_starts_with_postgresql_down_says_so_on_healthz_and_catches_up_when_it_is_back(
    tmp_path: Path, own_pg_server: PostgresServer
) -> None:
    db_url = make_database(own_pg_server.url)
    profile = local_profile(tmp_path, db_url)
    own_pg_server.stop()
    write_csv(
        tmp_path / "work" / "inbox" / "unsubscribers_1.csv",
        [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")],
    )
    port, log = free_port(), tmp_path / "daemon.log"
    with daemon_process(str(profile), "--listen", f"127.0.0.1:{port}", log=log) as process:

        def database_down() -> bool:
            code, body = http_get(f"http://127.0.0.1:{port}/healthz")
            problems = [p for item in json.loads(body or '{"profiles": []}')["profiles"] for p in item["problems"]]
            return code == 503 and any(problem.startswith("database down since") for problem in problems)

        wait_until(database_down, log)
        assert process.poll() is None
        own_pg_server.start()
        wait_until(lambda: applied_files(db_url) == 1, log, timeout=90)
    assert "Traceback" not in log.read_text()
