"""`batchsync check`: one line per check, with the fault and how to fix it; exit 0 only when all pass."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from batchsync.check import run_checks
from batchsync.cli import main
from batchsync.clock import ManualClock
from batchsync.config import Profile, load_profile
from batchsync.transport import Transport, open_transport

from .conftest import ROOT, cut_connection, own_folder
from .peers import PASSPHRASE, SshServer, give_to


def sftp_profile(tmp_path: Path, server: SshServer, folder: Path, known_hosts: Path) -> Path:
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    text = text.replace('url_env = "BATCHSYNC_CRM_URL"', f'url = "sqlite:///{tmp_path}/crm.sqlite"')
    text = text.replace('dir = "../var/mailup"', f'dir = "{tmp_path}/work"')
    start, end = text.index("[transport]"), text.index("[export]")
    text = (
        text[:start]
        + (
            f'[transport]\nkind = "sftp"\nhost = "127.0.0.1"\nport = {server.port}\nuser = "{server.user}"\n'
            f'known_hosts = "{known_hosts}"\nkey_file = "{server.keys["encrypted"]}"\n'
            f'key_passphrase_env = "CHECK_PASSPHRASE"\npath = "{folder}"\nretries = 0\n\n'
        )
        + text[end:]
    )
    path = tmp_path / "sftp.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def profile(tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CHECK_PASSPHRASE", PASSPHRASE)
    return sftp_profile(tmp_path, sshd, own_folder(sshd.root, sshd.user), sshd.known_hosts)


def test_check_passes_on_a_ready_profile(profile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "-p", str(profile)]) == 0
    capsys.readouterr()
    assert main(["check", "-p", str(profile)]) == 1
    out = capsys.readouterr().out
    assert "FAIL remote export/: the inbound folder of kind unsubscribers does not exist" in out
    assert not (Path(_transport_path(profile)) / "export").exists()  # check never creates an inbound folder
    (Path(_transport_path(profile)) / "export").mkdir()
    give_to(Path(_transport_path(profile)) / "export", _user(profile))
    assert main(["check", "-p", str(profile)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("ok ") for line in lines), lines
    names = " ".join(lines)
    for folder in ("import/1/", "import/2/", "import/3/", "export/", "export/processed/", "inbox", "sent"):
        assert folder in names
    assert "login accepted" in names
    assert "datasync" in names  # MailUp applies optout 0 to existing recipients only with it set


def _user(profile: Path) -> str:
    return next(line for line in profile.read_text().splitlines() if line.startswith("user = ")).split('"')[1]


def _transport_path(profile: Path) -> str:
    return next(line for line in profile.read_text().splitlines() if line.startswith("path = ")).split('"')[1]


def test_check_names_each_fault_and_how_to_fix_it(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHECK_PASSPHRASE", PASSPHRASE)
    folder = own_folder(sshd.root, sshd.user)
    (folder / "export").mkdir(mode=0o555)  # the inbox folder exists but cannot be written
    profile = sftp_profile(tmp_path, sshd, folder, sshd.known_hosts)
    assert main(["check", "-p", str(profile)]) == 1
    out = capsys.readouterr().out
    assert "FAIL database: tables missing" in out and "run batchsync init" in out
    assert "FAIL remote export/: " in out and "permission denied" in out
    assert "ok   remote import/1/" in out

    unknown = sftp_profile(tmp_path, sshd, folder, tmp_path / "empty_known_hosts")
    assert main(["check", "-p", str(unknown)]) == 1
    out = capsys.readouterr().out
    assert "FAIL server sftp://127.0.0.1" in out and "unknown host key" in out and "ssh-keyscan" in out


def test_a_probe_cut_halfway_is_tried_again_on_a_new_connection(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHECK_PASSPHRASE", PASSPHRASE)
    folder = own_folder(sshd.root, sshd.user)
    (folder / "export").mkdir()
    give_to(folder / "export", sshd.user)
    path = sftp_profile(tmp_path, sshd, folder, sshd.known_hosts)
    path.write_text(path.read_text().replace("retries = 0", "retries = 2"))
    cuts: list[str] = []

    def cut_before_the_first_upload(profile: Profile) -> Transport:
        transport = open_transport(profile)
        upload = transport.upload

        def cut_then_upload(local: Path, remote: str) -> None:
            if not cuts:
                cuts.append(remote)
                cut_connection(transport)
            upload(local, remote)

        transport.upload = cut_then_upload  # type: ignore[method-assign]
        return transport

    clock = ManualClock(datetime(2026, 1, 5, 2, 30, tzinfo=UTC))
    results = run_checks(load_profile(path), cut_before_the_first_upload, clock)
    remote = [result for result in results if result.name.startswith("remote ")]
    assert [result.name for result in remote if not result.ok] == []
    assert cuts and cuts[0].startswith("import/1/.batchsync-probe-")
    assert clock.monotonic() == 1  # the cut probe waited once and was made again whole
    assert not [path for path in folder.rglob("*") if ".batchsync-probe-" in path.name]
