"""Stops at the worst moments, writers that are not done, and two processes past the locks: nothing lost,
nothing applied twice, nothing archived as applied that was not."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

import batchsync.reconcile
import batchsync.snapshot
import batchsync.sync
from batchsync.clock import Clock, ManualClock
from batchsync.daemon import Daemon
from batchsync.db.schema import activities, bs_files, make_engine
from batchsync.errors import DatabaseError
from batchsync.reconcile import Reconciler
from batchsync.setimport import FileImport
from batchsync.sync import Sync
from batchsync.workdir import WorkDir

from .conftest import mailup_profile
from .crmdata import UNSUB_HEADER, build_tiny_crm, read_csv, status_of, unsub_row, write_csv
from .test_daemon import prepared
from .usercli import User, hours_ago, mailup_time

STAMP = "20260105T100000"


@pytest.fixture
def user(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[User]:
    person = User(tmp_path, db_url, capsys).start()
    yield person
    person.close()


def _sync(tmp_path: Path, db_url: str, clock: ManualClock, work: str = "work") -> Sync:
    sync = Sync(mailup_profile(tmp_path, db_url, **{"work.dir": str(tmp_path / work)}), clock=clock)
    sync.init()
    return sync


def _files(engine: object) -> list[tuple[str, str]]:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return [
            tuple(row)
            for row in connection.execute(select(bs_files.c.name, bs_files.c.outcome).order_by(bs_files.c.id))
        ]


def _activities(engine: object) -> int:
    with engine.connect() as connection:  # type: ignore[attr-defined]
        return int(connection.scalar(select(func.count()).select_from(activities)) or 0)


def test_rows_appended_while_a_file_is_applied_are_a_file_of_their_own(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = _sync(tmp_path, db_url, clock)
    build_tiny_crm(sync.engine)
    first = [UNSUB_HEADER, unsub_row("bob@example.com", "1", STAMP, "2")]
    dropped = write_csv(tmp_path / "unsubscribers_slow.csv", first)
    applying = FileImport.apply

    def writer_still_at_it(self: FileImport, events: object, rejected: object) -> None:
        staged = next((tmp_path / "work" / "staging").rglob("unsubscribers_slow.csv"))
        with staged.open("a", newline="") as handle:  # the slow writer's next lines, after our snapshot
            handle.write(";".join(unsub_row("alice@example.com", "1", STAMP, "2")) + "\r\n")
        monkeypatch.setattr(FileImport, "apply", applying)
        applying(self, events, rejected)  # type: ignore[arg-type]

    monkeypatch.setattr(FileImport, "apply", writer_still_at_it)
    report = sync.import_files([dropped])
    assert [(item.name, item.outcome, item.rows) for item in report.files] == [
        ("unsubscribers_slow.csv", "applied", 1),
        ("unsubscribers_slow.continued.csv", "applied", 1),
    ]
    assert status_of(sync.engine, 2, "newsletter") == status_of(sync.engine, 1, "newsletter") == "unsubscribed"
    archive = tmp_path / "work" / "archive"
    assert read_csv(archive / "unsubscribers_slow.csv") == first  # what was applied, not what the file became
    assert read_csv(archive / "unsubscribers_slow.continued.csv")[0] == UNSUB_HEADER
    assert not list((tmp_path / "work" / "staging").rglob("*.csv"))


def test_a_file_rewritten_while_it_is_applied_is_quarantined_never_archived_as_applied(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = _sync(tmp_path, db_url, clock)
    build_tiny_crm(sync.engine)
    dropped = write_csv(tmp_path / "unsubscribers_x.csv", [UNSUB_HEADER, unsub_row("bob@example.com", "1", STAMP, "2")])
    applying = FileImport.apply

    def rewritten(self: FileImport, events: object, rejected: object) -> None:
        staged = next((tmp_path / "work" / "staging").rglob("unsubscribers_x.csv"))
        write_csv(staged, [UNSUB_HEADER, unsub_row("carol@example.com", "1", STAMP, "2")])
        monkeypatch.setattr(FileImport, "apply", applying)
        applying(self, events, rejected)  # type: ignore[arg-type]

    monkeypatch.setattr(FileImport, "apply", rewritten)
    [outcome] = sync.import_files([dropped]).files
    assert outcome.outcome == "applied"
    quarantine = tmp_path / "work" / "quarantine"
    reason = (quarantine / "unsubscribers_x.csv.reason.txt").read_text()
    assert "changed while it was being applied" in reason and "none of it beyond that was applied" in reason
    assert read_csv(quarantine / "unsubscribers_x.csv")[1][0] == "carol@example.com"


def test_a_writer_that_keeps_the_file_open_is_waited_for_however_long_it_pauses(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    daemon = Daemon([prepared(tmp_path, db_url)], clock=Clock())
    daemon.start()
    inbox = tmp_path / "work" / "inbox"
    head = ";".join(UNSUB_HEADER) + "\r\n" + ";".join(unsub_row("bob@example.com", "1", STAMP, "2")) + "\r\n"
    tail = ";".join(unsub_row("alice@example.com", "1", STAMP, "2")) + "\r\n"
    opened, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with (inbox / "unsubscribers_paused.csv").open("w", newline="") as handle:
            handle.write(head)
            handle.flush()
            opened.set()
            release.wait(30)  # paused longer than the settle time, the file open all along
            handle.write(tail)

    writer = threading.Thread(target=slow_writer)
    try:
        writer.start()
        opened.wait(10)
        deadline = time.monotonic() + 5  # beyond the daemon's 3 s of settle time
        while time.monotonic() < deadline:
            daemon.run_once()
            time.sleep(0.2)
        assert (inbox / "unsubscribers_paused.csv").exists()  # still open: not taken
        release.set()
        writer.join()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (inbox / "unsubscribers_paused.csv").exists():
            daemon.run_once()
            time.sleep(0.1)
    finally:
        release.set()
        daemon.close()
    engine = make_engine(db_url)
    assert _files(engine) == [("unsubscribers_paused.csv", "applied")]
    assert status_of(engine, 1, "newsletter") == status_of(engine, 2, "newsletter") == "unsubscribed"
    engine.dispose()


@pytest.mark.parametrize("grown", [False, True])
def test_a_stop_between_the_commit_and_the_archive_is_finished_by_the_next_run(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, grown: bool
) -> None:
    """Killed after the commit: before anything of the staged file was dealt with, or (``grown``) halfway
    through writing the lines a slow writer appended as a file of their own. The next run finishes the file
    from its snapshot; nothing is applied twice."""
    sync = _sync(tmp_path, db_url, clock)
    build_tiny_crm(sync.engine)
    inbox = tmp_path / "work" / "inbox"
    write_csv(inbox / "unsubscribers_1.csv", [UNSUB_HEADER, unsub_row("bob@example.com", "1", STAMP, "2")])
    applying, writing = FileImport.apply, batchsync.snapshot.write_whole

    def writer_still_at_it(self: FileImport, events: object, rejected: object) -> None:
        staged = next((tmp_path / "work" / "staging").rglob("unsubscribers_1.csv"))
        with staged.open("a", newline="") as handle:
            handle.write(";".join(unsub_row("alice@example.com", "1", STAMP, "2")) + "\r\n")
        applying(self, events, rejected)  # type: ignore[arg-type]

    def killed(target: Path, write: object) -> None:
        if grown:
            target.with_name(target.name + ".part").write_text("half of it")
        raise KeyboardInterrupt("killed after the commit")

    if grown:
        monkeypatch.setattr(FileImport, "apply", writer_still_at_it)
        monkeypatch.setattr(batchsync.snapshot, "write_whole", killed)
    else:
        monkeypatch.setattr(batchsync.reconcile, "settle", lambda *args, **kwargs: killed(tmp_path, None))
    with pytest.raises(KeyboardInterrupt):
        sync.import_files()
    monkeypatch.setattr(FileImport, "apply", applying)
    monkeypatch.setattr(batchsync.snapshot, "write_whole", writing)
    monkeypatch.undo()
    assert _files(sync.engine) == [("unsubscribers_1.csv", "applied")]
    report = Sync(sync.profile, clock=clock, engine=sync.engine).import_files()
    expected = [("unsubscribers_1.continued.csv", "applied")] if grown else []
    assert [(item.name, item.outcome) for item in report.files] == expected
    assert _files(sync.engine) == [("unsubscribers_1.csv", "applied"), *expected]  # no duplicate entry
    archive = tmp_path / "work" / "archive"
    assert read_csv(archive / "unsubscribers_1.csv")[1][0] == "bob@example.com"
    assert not list(archive.glob("*.duplicate"))
    assert not [path for path in (tmp_path / "work" / "staging").rglob("*.csv") if path.is_file()]
    assert _activities(sync.engine) == (2 if grown else 1)  # bob once, and alice once


def test_a_duplicate_whose_file_grows_applies_only_what_was_added(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = _sync(tmp_path, db_url, clock)
    build_tiny_crm(sync.engine)
    rows = [UNSUB_HEADER, unsub_row("bob@example.com", "1", STAMP, "2")]
    sync.import_files([write_csv(tmp_path / "unsubscribers_a.csv", rows)])
    recording = batchsync.reconcile.Reconciler._record

    def writer_still_at_it(self: Reconciler, connection: object, staged: object, *args: object, **kw: object) -> int:
        if args[1] == "duplicate":
            with staged.path.open("a", newline="") as handle:  # type: ignore[attr-defined]
                handle.write(";".join(unsub_row("alice@example.com", "1", STAMP, "2")) + "\r\n")
        return recording(self, connection, staged, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(batchsync.reconcile.Reconciler, "_record", writer_still_at_it)
    report = sync.import_files([write_csv(tmp_path / "unsubscribers_b.csv", rows)])
    assert [(item.name, item.outcome, item.rows) for item in report.files] == [
        ("unsubscribers_b.csv", "duplicate", 0),
        ("unsubscribers_b.continued.csv", "applied", 1),
    ]
    assert _activities(sync.engine) == 2  # bob once, alice once


def test_a_file_cut_in_the_middle_of_a_line_while_it_changes_waits_for_its_writer(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = _sync(tmp_path, db_url, clock)
    build_tiny_crm(sync.engine)
    whole = f"email;idList;OptOut_Date;optout_type\r\nbob@example.com;1;{STAMP};16\r\n"
    staged_at = tmp_path / "work" / "inbox" / "unsubscribers_cut.csv"
    staged_at.parent.mkdir(parents=True, exist_ok=True)
    staged_at.write_text(whole[:-3])  # cut in the last column: optout_type "1", not the complaint "16" yet
    applying = FileImport.apply

    def writer_finishes(self: FileImport, events: object, rejected: object) -> None:
        staged = next((tmp_path / "work" / "staging").rglob("unsubscribers_cut.csv"))
        staged.write_text(whole)
        applying(self, events, rejected)  # type: ignore[arg-type]

    monkeypatch.setattr(FileImport, "apply", writer_finishes)
    [waiting] = sync.import_files().files
    assert waiting.outcome == "waiting" and "still being written" in (waiting.reason or "")
    assert status_of(sync.engine, 2, "newsletter") == "subscribed" and _files(sync.engine) == []
    monkeypatch.undo()
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.rows) == ("applied", 1)
    assert status_of(sync.engine, 2, "offers") == "unsubscribed"  # the whole code: a complaint, every list


@pytest.mark.parametrize("concurrent", [False, True])
def test_two_processes_past_the_locks_apply_a_file_once(
    tmp_path: Path, db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, concurrent: bool
) -> None:
    """Two work folders on one CRM (another host, an admin importing by hand elsewhere) hold different file
    locks, and a PostgreSQL advisory lock fails behind a pooler in transaction mode: the database's own unique
    key on applied content lets only one of them apply a file."""
    monkeypatch.setattr(batchsync.sync, "profile_lock", lambda profile, engine: contextlib.nullcontext())
    one, other = _sync(tmp_path, db_url, clock, "one"), _sync(tmp_path, db_url, clock, "other")
    build_tiny_crm(one.engine)
    rows = [UNSUB_HEADER] + [unsub_row(f"nobody{i}@example.com", "1", STAMP, "2") for i in range(3000)]
    rows.append(unsub_row("bob@example.com", "1", STAMP, "16"))
    dropped = write_csv(tmp_path / "unsubscribers_shared.csv", rows)
    if concurrent:
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def importer(sync: Sync) -> None:
            barrier.wait()
            outcomes.extend(item.outcome for item in sync.import_files([dropped]).files)

        threads = [threading.Thread(target=importer, args=(sync,)) for sync in (one, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(outcomes) == ["applied", "duplicate"]
    else:  # both looked before either committed: the ledger's first question cannot tell
        monkeypatch.setattr(batchsync.reconcile.ledger, "applied_file", lambda *args: None)
        assert [item.outcome for item in one.import_files([dropped]).files] == ["applied"]
        assert [item.outcome for item in other.import_files([dropped]).files] == ["duplicate"]
    assert sorted(outcome for _, outcome in _files(one.engine)) == ["applied", "duplicate"]
    assert _activities(one.engine) == 1  # bob's complaint, once


def test_import_checks_every_named_file_before_staging_any(user: User) -> None:
    good = write_csv(
        user.tmp_path / "unsubscribers_good.csv", [UNSUB_HEADER, unsub_row("bob@example.com", "1", STAMP, "2")]
    )
    bad = user.tmp_path / "bad.txt"
    bad.write_text("not a profile's file\n")
    done = user.batchsync("import", "--file", str(good), "--file", str(bad))
    assert done.code == 2 and "bad.txt matches no inbound pattern" in done.err
    assert not [path for path in (user.tmp_path / "work" / "staging").rglob("*") if path.is_file()]
    assert "import: no new files" in user.batchsync("import").out
    assert status_of(user.engine, 2, "newsletter") == "subscribed"


def test_a_dry_run_import_says_what_it_would_do(user: User) -> None:
    user.admin_file([unsub_row("bob@example.com", "1", mailup_time(hours_ago(2)), "2")])
    done = user.batchsync("import", "--dry-run")
    assert "would be applied" in done.out and ": applied" not in done.out
    assert status_of(user.engine, 2, "newsletter") == "subscribed"


def test_partial_uploads_a_stopped_export_left_are_removed_by_the_next(user: User) -> None:
    folder = user.provider / "import" / "1"
    folder.mkdir(parents=True)
    (folder / "1_202601050230000000.csv.part").write_text("half a fi")  # ours: the profile's name pattern
    (folder / "someone_else.csv.part").write_text("not ours")
    user.export("--full")
    assert sorted(path.name for path in folder.glob("*.part")) == ["someone_else.csv.part"]


def test_a_stop_between_the_remote_rename_and_the_sent_copy_keeps_the_copy(
    user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    keeping = WorkDir.keep_sent

    def killed(self: WorkDir, files: object) -> list[Path]:
        monkeypatch.setattr(WorkDir, "keep_sent", keeping)
        raise KeyboardInterrupt("killed after the upload")

    monkeypatch.setattr(WorkDir, "keep_sent", killed)
    assert user.batchsync("export", "--full").code == 1  # "aborted"
    [delivered] = list((user.provider / "import" / "1").glob("*.csv"))
    user.export("--diff")
    assert (user.tmp_path / "work" / "sent" / delivered.name).read_bytes() == delivered.read_bytes()
    assert not list((user.tmp_path / "work" / "outbox").iterdir())


def test_a_file_the_provider_may_have_taken_keeps_its_copy_marked_unconfirmed(user: User) -> None:
    """A stopped export's note says a file went to import/1; the server has neither it nor its .part (MailUp
    moves what it takes): its copy is kept in sent/, marked unconfirmed, never dropped."""
    outbox = user.tmp_path / "work" / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    (outbox / "1_202601050230000000.csv").write_text("111|1|2|idList|ExternalGroupName|optout\r\n")
    (outbox / ".1_202601050230000000.csv.remote").write_text("import/1/1_202601050230000000.csv")
    user.export("--diff")
    assert (user.tmp_path / "work" / "sent" / "1_202601050230000000.csv.unconfirmed").exists()
    assert not list(outbox.iterdir())


def test_init_brings_an_older_database_up_to_the_unique_key_on_applied_files(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    """A database an older batchsync made: no unique key on applied content, and one file applied twice by two
    processes past the locks. Commands refuse it until init, which keeps the history (the later entry becomes
    'applied twice') and makes the key."""
    sync = _sync(tmp_path, db_url, clock)
    with sync.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ux_bs_files_applied")
        for name in ("a.csv", "b.csv"):
            connection.execute(
                insert(bs_files).values(
                    profile="mailup",
                    sha256="f" * 64,
                    name=name,
                    origin="remote:x",
                    size=1,
                    outcome="applied",
                    at=clock.now(),
                )
            )
    fresh = Sync(sync.profile, clock=clock, engine=sync.engine)
    with pytest.raises(DatabaseError, match="lacks index ux_bs_files_applied: run `batchsync init"):
        fresh.import_files()
    fresh.init()
    assert _files(sync.engine) == [("a.csv", "applied"), ("b.csv", "applied twice")]
    assert fresh.import_files().files == []


def test_a_file_an_older_version_left_in_staging_is_taken_up_as_the_provider_s(
    tmp_path: Path, db_url: str, clock: ManualClock
) -> None:
    sync = _sync(tmp_path, db_url, clock)
    build_tiny_crm(sync.engine)
    write_csv(
        tmp_path / "work" / "staging" / "unsubscribers" / "unsubscribers_old.csv",  # staging/<kind>/, as it was
        [UNSUB_HEADER, unsub_row("bob@example.com", "1", STAMP, "2")],
    )
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.origin) == ("applied", "provider")
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
