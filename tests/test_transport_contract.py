"""One contract, run against every transport: a local folder, FTP and FTPS (pyftpdlib, vsftpd) and SFTP
(OpenSSH) on loopback; and the retry policy every caller reaches the transports through."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from batchsync.clock import ManualClock
from batchsync.errors import DiskFull, RemoteFolderMissing, TransportError, UnsafeRemoteName
from batchsync.ftpserver import LoopbackFtpServer
from batchsync.transport import RetryPolicy, Transport, check_remote_name, upload_confirmed
from batchsync.transport.ftp import FtpsTransport, FtpTransport
from batchsync.transport.local import LocalTransport
from batchsync.transport.sftp import SftpCredentials, SftpTransport

from .conftest import cut_connection, own_folder

KINDS = ["local", "ftp", "ftps-pyftpdlib", "ftps-vsftpd", "sftp-openssh"]


@pytest.fixture(params=KINDS)
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Transport, Path]]:
    """A transport and the folder that is its server-side root, for each real server kind."""
    kind = request.param
    if kind == "local":
        with LocalTransport(tmp_path / "server") as local:
            yield local, tmp_path / "server"
    elif kind == "ftp":
        with (
            LoopbackFtpServer(tmp_path / "server", "user", "pw") as server,
            FtpTransport("127.0.0.1", server.port, "user", "pw") as ftp,
        ):
            yield ftp, tmp_path / "server"
    elif kind == "ftps-pyftpdlib":
        certs = request.getfixturevalue("certificates")
        with (
            LoopbackFtpServer(tmp_path / "server", "user", "pw", tls=(certs.cert, certs.key)) as server,
            FtpsTransport("127.0.0.1", server.port, "user", "pw", ca_file=certs.ca) as ftps,
        ):
            yield ftps, tmp_path / "server"
    elif kind == "ftps-vsftpd":
        vs = request.getfixturevalue("vsftpd")
        folder = own_folder(vs.root, vs.user)
        with FtpsTransport(
            "127.0.0.1", vs.port, vs.user, vs.password, ca_file=vs.certificates.ca, root=str(folder)
        ) as ftps:
            yield ftps, folder
    else:
        ssh = request.getfixturevalue("sshd")
        folder = own_folder(ssh.root, ssh.user)
        credentials = SftpCredentials(ssh.user, key_file=ssh.keys["ed25519"])
        with SftpTransport("127.0.0.1", ssh.port, credentials, ssh.known_hosts, root=str(folder)) as sftp:
            yield sftp, folder


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


def test_a_missing_folder_is_an_error_and_an_empty_one_lists_as_empty(
    transport: tuple[Transport, Path], tmp_path: Path
) -> None:
    client, _ = transport
    with pytest.raises(RemoteFolderMissing, match="no/such/folder") as caught:
        client.list("no/such/folder")
    assert not caught.value.retryable
    client.upload(_file(tmp_path, "a.csv", b"x"), "empty/a.csv")
    client.delete("empty/a.csv")
    assert client.list("empty") == []


def test_download_size_rename_delete(transport: tuple[Transport, Path], tmp_path: Path) -> None:
    client, root = transport
    data = os.urandom(3 * 1024 * 1024 + 17)  # several transfer blocks
    client.upload(_file(tmp_path, "big.bin", data), "export/big.bin")
    assert client.size("export/big.bin") == len(data)
    client.download("export/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    client.rename("export/big.bin", "export/renamed.bin")
    moved = "export/processed/renamed.bin"
    client.rename("export/renamed.bin", moved)  # into a folder that is not there yet: rename makes it
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


def test_a_full_local_disk_is_disk_full_never_a_network_error_to_retry(
    transport: tuple[Transport, Path], tmp_path: Path
) -> None:
    client, _ = transport
    client.connect()  # connecting first, as an export does, changes nothing for what follows
    client.upload(_file(tmp_path, "big.csv", b"x" * 300_000), "import/big.csv")
    with pytest.raises(DiskFull, match="no space left") as caught:
        client.download("import/big.csv", Path("/dev/full"))  # the kernel's own ENOSPC on every write
    assert not isinstance(caught.value, TransportError)


def _fail_next_copy_as_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local folder's transient fault: the next file copy finds the file busy (EBUSY), the one after works."""
    real = shutil.copyfile

    def busy_once(source: object, target: object) -> object:
        monkeypatch.setattr(shutil, "copyfile", real)
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(shutil, "copyfile", busy_once)


def _counted(tries: list[str], action: Callable[[], None]) -> Callable[[], None]:
    def counted() -> None:
        tries.append("try")
        action()

    return counted


def test_each_backend_s_transient_failures_are_tried_again_and_its_final_ones_are_not(
    transport: tuple[Transport, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend marks what it translates retryable or not; the policy acts on that mark alone."""
    client, _ = transport
    client.upload(_file(tmp_path, "a.csv", b"x;y\r\n"), "export/a.csv")
    clock = ManualClock(datetime(2026, 1, 5, 2, 30, tzinfo=UTC))
    retry, started = RetryPolicy(3, clock), clock.now()
    if isinstance(client, LocalTransport):
        _fail_next_copy_as_busy(monkeypatch)
    else:
        cut_connection(client)  # a reset connection: the download fails, the next try connects again
    tries: list[str] = []
    retry.call(_counted(tries, partial(client.download, "export/a.csv", tmp_path / "back.csv")), what="download")
    assert len(tries) == 2 and (clock.now() - started).total_seconds() == 1
    assert (tmp_path / "back.csv").read_bytes() == b"x;y\r\n"
    tries.clear()
    with pytest.raises(TransportError) as caught:  # no such file: waiting does not make it appear
        retry.call(_counted(tries, partial(client.download, "export/missing.csv", tmp_path / "x")), what="download")
    assert not caught.value.retryable
    assert len(tries) == 1 and (clock.now() - started).total_seconds() == 1
    with pytest.raises(RemoteFolderMissing):
        retry.call(_counted(tries, partial(client.list, "no/such/folder")), what="listing")
    assert len(tries) == 2 and (clock.now() - started).total_seconds() == 1


def test_the_policy_doubles_its_waits_up_to_a_minute_and_gives_up_after_its_retries() -> None:
    clock = ManualClock(datetime(2026, 1, 5, 2, 30, tzinfo=UTC))
    tries: list[float] = []

    def reset() -> None:
        tries.append(clock.monotonic())
        raise TransportError("connection reset", retryable=True)

    with pytest.raises(TransportError, match="connection reset"):
        RetryPolicy(8, clock).call(reset, what="an upload")
    assert tries == [0, 1, 3, 7, 15, 31, 63, 123, 183]  # waits of 1, 2, 4 ... 32 s, then 60 s at most
    tries.clear()
    with pytest.raises(TransportError):
        RetryPolicy(0, clock).call(reset, what="an upload")  # retries = 0: one try
    assert len(tries) == 1

    def full() -> None:
        tries.append(clock.monotonic())
        raise DiskFull("no space left on the disk")

    tries.clear()
    with pytest.raises(DiskFull):
        RetryPolicy(3, clock).call(full, what="a download")  # not a transfer error: never tried again
    assert len(tries) == 1
