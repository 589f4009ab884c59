"""Remote inboxes on real servers: hostile names, files still being written, markers, and cut connections."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import ThrottledDTPHandler
from sqlalchemy import update

from batchsync.clock import ManualClock
from batchsync.collect import Collector, CollectReport
from batchsync.db import snapshots
from batchsync.db.schema import contacts
from batchsync.errors import TransportError
from batchsync.ftpserver import LoopbackFtpServer
from batchsync.sync import Sync
from batchsync.transport import open_transport
from batchsync.transport.ftp import FtpTransport
from batchsync.transport.sftp import SftpCredentials, SftpTransport

from .conftest import FTP_PASSWORD_ENV, cut_connection, ftp_transport, mailup_profile, own_folder
from .crmdata import UNSUB_HEADER, build_tiny_crm, status_of, unsub_row, write_csv
from .peers import SshServer

HOSTILE = ["../x.csv", "a/b.csv", "unsubscribers_\nevil.csv"]


class HostileFS(AbstractedFS):  # type: ignore[misc]
    """A real FTP server whose listing also names files a malicious or broken server might send."""

    def format_mlsx(self, basedir: str, listing: list[str], perms: str, facts: str, ignore_err: bool = True) -> Any:
        yield from super().format_mlsx(basedir, listing, perms, facts, ignore_err)
        for name in HOSTILE:
            yield f"modify=20200101000000;size=5;type=file; {name}\r\n".encode()


def collect(profile: Any, clock: ManualClock, transport: Any) -> CollectReport:
    report = CollectReport()
    Collector(profile, clock).from_remote(transport, report)
    return report


def test_hostile_names_from_a_real_ftp_server_are_refused_and_reported(tmp_path: Path, clock: ManualClock) -> None:
    root = tmp_path / "provider"
    write_csv(root / "export" / "unsubscribers_ok.csv", [UNSUB_HEADER])
    server = LoopbackFtpServer(root, "provider", "pw")
    server.handler.abstracted_fs = HostileFS
    with server:
        profile = mailup_profile(tmp_path, "sqlite://")
        with FtpTransport("127.0.0.1", server.port, "provider", "pw") as ftp:
            report = collect(profile, clock, ftp)
    assert [staged.name for staged in report.staged] == ["unsubscribers_ok.csv"]
    refused = "\n".join(report.refused)
    assert "'../x.csv'" in refused and "'a/b.csv'" in refused
    assert "unreadable listing line" in refused  # the name with a line break arrives as two broken lines
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "work" / "x.csv").exists()


def test_a_name_with_a_newline_on_an_sftp_server_is_refused(
    tmp_path: Path, clock: ManualClock, sshd: SshServer
) -> None:
    folder = own_folder(sshd.root, sshd.user)
    (folder / "export").mkdir()
    write_csv(folder / "export" / "unsubscribers_ok.csv", [UNSUB_HEADER])
    write_csv(folder / "export" / "unsubscribers_\nevil.csv", [UNSUB_HEADER])
    profile = mailup_profile(tmp_path, "sqlite://")
    with SftpTransport(
        "127.0.0.1",
        sshd.port,
        SftpCredentials(sshd.user, key_file=sshd.keys["rsa"]),
        sshd.known_hosts,
        root=str(folder),
    ) as sftp:
        report = collect(profile, clock, sftp)
    assert [staged.name for staged in report.staged] == ["unsubscribers_ok.csv"]
    assert len(report.refused) == 1 and "control characters" in report.refused[0]


class GrowingClock(ManualClock):
    """Sleeping on it appends to a file, as a slow writer would between the two looks."""

    def __init__(self, start: Any, growing: Path) -> None:
        super().__init__(start)
        self.growing = growing

    def sleep(self, seconds: float) -> None:
        with self.growing.open("a") as handle:
            handle.write("late@example.com;;1;20260105T100000;1;2;\r\n")
        super().sleep(seconds)


def test_a_file_still_growing_waits_and_a_settled_one_is_taken(tmp_path: Path, clock: ManualClock) -> None:
    root = tmp_path / "provider"
    settled = write_csv(root / "export" / "unsubscribers_a.csv", [UNSUB_HEADER])
    growing = write_csv(root / "export" / "unsubscribers_b.csv", [UNSUB_HEADER])
    profile = mailup_profile(tmp_path, "sqlite://")
    growing_clock = GrowingClock(clock.now(), growing)
    with (
        LoopbackFtpServer(root, "provider", "pw") as server,
        FtpTransport("127.0.0.1", server.port, "provider", "pw") as ftp,
    ):
        report = collect(profile, growing_clock, ftp)
    assert [staged.name for staged in report.staged] == [settled.name]
    assert report.waiting == ["export/unsubscribers_b.csv"]


def test_with_markers_only_announced_files_are_taken_and_the_marker_goes(
    tmp_path: Path, clock: ManualClock, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FTP_PASSWORD_ENV, "s3cret-ftp-password")
    root = tmp_path / "provider"
    write_csv(
        root / "export" / "unsubscribers_a.csv",
        [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")],
    )
    write_csv(root / "export" / "unsubscribers_b.csv", [UNSUB_HEADER])
    (root / "export" / "unsubscribers_a.csv.done").write_text("")
    with LoopbackFtpServer(root, "provider", "s3cret-ftp-password") as server:
        profile = mailup_profile(tmp_path, db_url, transport=ftp_transport(server), **{"inbound.0.marker": ".done"})
        sync = Sync(profile, clock=clock)
        sync.init()
        build_tiny_crm(sync.engine)
        report = sync.import_files()
    assert [item.name for item in report.files] == ["unsubscribers_a.csv"]
    assert report.waiting == ["export/unsubscribers_b.csv"]
    assert sorted(p.name for p in (root / "export").iterdir()) == ["processed", "unsubscribers_b.csv"]
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"


@pytest.mark.parametrize("after_import", ["move", "delete"])
def test_a_taken_file_is_moved_or_deleted_on_a_new_connection_when_the_old_one_was_cut(
    tmp_path: Path, clock: ManualClock, ftp_server: LoopbackFtpServer, after_import: str
) -> None:
    root = tmp_path / "provider"
    write_csv(root / "export" / "unsubscribers_a.csv", [UNSUB_HEADER])
    (root / "export" / "unsubscribers_a.csv.done").write_text("")
    overrides = {"inbound.0.marker": ".done", "inbound.0.after_import": after_import}
    profile = mailup_profile(tmp_path, "sqlite://", transport=ftp_transport(ftp_server), **overrides)
    with open_transport(profile) as ftp:
        collector = Collector(profile, clock)
        [staged] = collect(profile, clock, ftp).staged
        cut_connection(ftp)  # the file was applied meanwhile; then the connection dropped
        started = clock.now()
        collector.finish_remote(ftp, staged)
    assert (clock.now() - started).total_seconds() == 1  # one more try, after the first wait
    left = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    moved = [f"export/processed/{started:%Y%m%dT%H%M%S}_unsubscribers_a.csv"]
    assert left == ([] if after_import == "delete" else moved)  # the marker went with the file


@pytest.fixture
def slow_ftp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackFtpServer]:
    """A real FTP server whose data channel runs at 256 KiB/s, so a transfer can be cut in the middle."""
    monkeypatch.setenv(FTP_PASSWORD_ENV, "s3cret-ftp-password")
    dtp = type("SlowDTP", (ThrottledDTPHandler,), {"read_limit": 256 * 1024, "write_limit": 256 * 1024})
    server = LoopbackFtpServer(tmp_path / "provider", "provider", "s3cret-ftp-password")
    server.handler.dtp_handler = dtp
    server.start()
    yield server
    server.stop()


def _cut_after(server: LoopbackFtpServer, seconds: float) -> threading.Thread:
    def cut() -> None:
        time.sleep(seconds)
        server.stop()

    thread = threading.Thread(target=cut)
    thread.start()
    return thread


def _with_note_column(tmp_path: Path, db_url: str, transport: dict[str, Any]) -> Any:
    """The MailUp profile plus a wide custom column, so that an export file takes seconds to upload."""
    import tomllib

    from .conftest import ROOT

    columns = tomllib.loads((ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8"))["export"]["columns"]
    columns.append({"header": "note", "field": "custom.note"})
    return mailup_profile(tmp_path, db_url, transport={**transport, "retries": 0}, **{"export.columns": columns})


def test_a_cut_upload_leaves_no_final_file_and_the_next_attempt_completes_it(
    tmp_path: Path, clock: ManualClock, slow_ftp: LoopbackFtpServer
) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    sync = Sync(_with_note_column(tmp_path, db_url, ftp_transport(slow_ftp)), clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    with sync.engine.begin() as connection:
        connection.execute(update(contacts).values(custom={"note": "x" * 200_000}))  # ~2 MB: 8 s at 256 KiB/s
    cutter = _cut_after(slow_ftp, 1.0)
    with pytest.raises(TransportError):
        sync.export("full")
    cutter.join()
    landed = tmp_path / "provider" / "import" / "1"
    assert [p.name for p in landed.iterdir() if p.name.endswith(".csv")] == []
    with sync.engine.connect() as connection:
        assert snapshots.exported_count(connection, "mailup") == 0
    restarted = LoopbackFtpServer(tmp_path / "provider", "provider", "s3cret-ftp-password").start()
    try:
        result = Sync(_with_note_column(tmp_path, db_url, ftp_transport(restarted)), clock=clock).export("full")
    finally:
        restarted.stop()
    sent = [item for item in result.files if item.uploaded]
    assert [item.list_code for item in sent] == ["newsletter", "offers"]
    for item in sent:
        assert item.local_path is not None and item.remote_path is not None
        assert (tmp_path / "provider" / item.remote_path).read_bytes() == item.local_path.read_bytes()
    with sync.engine.connect() as connection:
        assert snapshots.exported_count(connection, "mailup", "newsletter") == 10
    assert not list((tmp_path / "provider").rglob("*.part"))


def test_a_cut_download_applies_nothing_and_the_next_run_takes_the_file_whole_once(
    tmp_path: Path, clock: ManualClock, slow_ftp: LoopbackFtpServer, db_url: str
) -> None:
    rows = [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")]
    rows += [unsub_row(f"nobody{i}@example.com", "1", "20260105T100000", "2") for i in range(40_000)]
    remote = write_csv(tmp_path / "provider" / "export" / "unsubscribers_big.csv", rows)
    assert remote.stat().st_size > 1_000_000
    profile = mailup_profile(tmp_path, db_url, transport={**ftp_transport(slow_ftp), "retries": 0})
    sync = Sync(profile, clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    cutter = _cut_after(slow_ftp, 1.0)
    with pytest.raises(TransportError):
        sync.import_files()
    cutter.join()
    assert status_of(sync.engine, 2, "newsletter") == "subscribed"
    assert not list((tmp_path / "work" / "staging").rglob("*.csv*"))
    restarted = LoopbackFtpServer(tmp_path / "provider", "provider", "s3cret-ftp-password").start()
    try:
        again = Sync(mailup_profile(tmp_path, db_url, transport=ftp_transport(restarted)), clock=clock)
        [outcome] = again.import_files().files
        assert again.import_files().files == []
    finally:
        restarted.stop()
    assert (outcome.outcome, outcome.rows, outcome.changed) == ("applied", 40_001, 1)
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    assert os.path.exists(tmp_path / "provider" / "export" / "processed")
