"""One contract, run against every transport: a local folder and FTP (pyftpdlib) on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchsync.errors import TransportError, UnsafeRemoteName
from batchsync.ftpserver import LoopbackFtpServer
from batchsync.transport import Transport, check_remote_name, upload_confirmed
from batchsync.transport.ftp import FtpTransport
from batchsync.transport.local import LocalTransport


@pytest.fixture(params=["local", "ftp"])
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Transport, Path]]:
    """A transport and the folder that is its server-side root."""
    root = tmp_path / "server"
    if request.param == "local":
        with LocalTransport(root) as local:
            yield local, root
        return
    with LoopbackFtpServer(root, "user", "pw") as server, FtpTransport("127.0.0.1", server.port, "user", "pw") as ftp:
        yield ftp, root


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_upload_creates_folders_and_lists_plain_files(transport: tuple[Transport, Path], tmp_path: Path) -> None:
    client, root = transport
    client.upload(_file(tmp_path, "a.csv", b"x;y\r\n"), "import/1/a.csv")
    (root / "import" / "1" / "sub").mkdir()
    [entry] = client.list("import/1")
    assert (entry.name, entry.size) == ("a.csv", 5)
    assert entry.mtime is not None and abs(entry.mtime - datetime.now(UTC)) < timedelta(minutes=5)
    assert (root / "import" / "1" / "a.csv").read_bytes() == b"x;y\r\n"


def test_a_missing_folder_lists_as_empty(transport: tuple[Transport, Path]) -> None:
    client, _ = transport
    assert client.list("no/such/folder") == []


def test_download_size_rename_move_delete(transport: tuple[Transport, Path], tmp_path: Path) -> None:
    client, root = transport
    data = os.urandom(3 * 1024 * 1024 + 17)  # several transfer blocks
    client.upload(_file(tmp_path, "big.bin", data), "export/big.bin")
    assert client.size("export/big.bin") == len(data)
    client.download("export/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    client.rename("export/big.bin", "export/renamed.bin")
    moved = client.move("export/renamed.bin", "export/processed")
    assert moved == "export/processed/renamed.bin"
    assert (root / "export" / "processed" / "renamed.bin").stat().st_size == len(data)
    client.delete(moved)
    assert client.list("export/processed") == []


def test_native_errors_are_translated(transport: tuple[Transport, Path], tmp_path: Path) -> None:
    client, _ = transport
    with pytest.raises(TransportError) as caught:
        client.download("export/missing.csv", tmp_path / "x")
    assert not caught.value.retryable
    with pytest.raises(TransportError):
        client.delete("export/missing.csv")


def test_confirmed_upload_leaves_only_the_whole_file(transport: tuple[Transport, Path], tmp_path: Path) -> None:
    client, root = transport
    size = upload_confirmed(client, _file(tmp_path, "f.csv", b"a" * 1000), "import/2/f.csv")
    assert size == 1000
    assert sorted(p.name for p in (root / "import" / "2").iterdir()) == ["f.csv"]


def test_remote_names_are_data_not_paths() -> None:
    assert check_remote_name("unsubscribers_20260105.csv") == "unsubscribers_20260105.csv"
    for hostile in ("../x.csv", "a/b.csv", "a\\b.csv", "x\n.csv", "x\x00.csv", "..", ".", ""):
        with pytest.raises(UnsafeRemoteName):
            check_remote_name(hostile)


def test_hostile_listed_names_are_refused_and_reported(tmp_path: Path, clock: object) -> None:
    from batchsync.collect import Collector, CollectReport

    from .conftest import mailup_profile

    root = tmp_path / "provider"
    (root / "export").mkdir(parents=True)
    (root / "export" / "unsubscribers_ok.csv").write_text("email\r\n")
    (root / "export" / "unsubscribers_\nevil.csv").write_text("email\r\n")
    profile = mailup_profile(tmp_path, "sqlite://")
    report = CollectReport()
    with LocalTransport(root) as local:
        Collector(profile, clock).from_remote(local, report)  # type: ignore[arg-type]
    assert [s.name for s in report.staged] == ["unsubscribers_ok.csv"]
    assert len(report.refused) == 1 and "control characters" in report.refused[0]
