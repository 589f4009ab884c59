"""SFTP and FTPS against real servers: host keys, authentication, retries, secrets, and the MailUp flow."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from batchsync.clock import ManualClock
from batchsync.errors import RemoteFolderMissing, TransportError
from batchsync.sync import Sync
from batchsync.transport import open_transport
from batchsync.transport.ftp import FtpsTransport
from batchsync.transport.sftp import HostKeyRefused, SftpCredentials, SftpTransport

from .conftest import mailup_profile, own_folder, sftp_transport, vsftpd_transport
from .crmdata import UNSUB_HEADER, build_tiny_crm, status_of, unsub_row, write_csv
from .peers import IS_ROOT, PASSPHRASE, SshServer, Vsftpd, give_to


def host_fingerprint(server: SshServer) -> str:
    key_file = server.config.parent / "host_key.pub"
    printed = subprocess.run(["ssh-keygen", "-lf", str(key_file)], capture_output=True, text=True, check=True)
    return printed.stdout.split()[1]


def sftp(server: SshServer, known_hosts: Path, **credentials: Any) -> SftpTransport:
    creds = (
        SftpCredentials(server.user, **credentials)
        if credentials
        else SftpCredentials(server.user, key_file=server.keys["ed25519"])
    )
    return SftpTransport("127.0.0.1", server.port, creds, known_hosts, root=str(server.root), timeout=10)


def test_an_unknown_host_key_is_refused_with_its_fingerprint_and_how_to_trust_it(
    tmp_path: Path, sshd: SshServer
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    with pytest.raises(HostKeyRefused) as caught:
        sftp(sshd, known_hosts).list(".")
    message = str(caught.value)
    assert f"[127.0.0.1]:{sshd.port}" in message
    assert str(known_hosts) in message
    assert host_fingerprint(sshd) in message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts}" in message
    assert not caught.value.retryable


def test_a_changed_host_key_is_refused_loudly(tmp_path: Path, sshd: SshServer) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(HostKeyRefused) as caught:
        sftp(sshd, known_hosts).list(".")
    message = str(caught.value)
    assert "HOST KEY CHANGED" in message and host_fingerprint(sshd) in message
    assert "intercepting" in message and str(known_hosts) in message


def test_a_missing_known_hosts_file_refuses_too(tmp_path: Path, sshd: SshServer) -> None:
    with pytest.raises(HostKeyRefused):
        sftp(sshd, tmp_path / "none").list(".")


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_key_authentication(sshd: SshServer, kind: str) -> None:
    with sftp(sshd, sshd.known_hosts, key_file=sshd.keys[kind]) as client:
        with pytest.raises(RemoteFolderMissing):
            client.list("no-such-folder")
        if kind == "rsa":  # OpenSSH 8.8+ refuses SHA-1 "ssh-rsa" signatures: this login used rsa-sha2
            assert client._ssh is not None
            assert client._ssh.auth_handler is not None


def test_a_key_with_a_passphrase_and_a_wrong_one(sshd: SshServer) -> None:
    with sftp(sshd, sshd.known_hosts, key_file=sshd.keys["encrypted"], key_passphrase=PASSPHRASE) as client:
        client.list(".")
    with pytest.raises(TransportError) as caught:
        sftp(sshd, sshd.known_hosts, key_file=sshd.keys["encrypted"], key_passphrase="wrong horse").list(".")
    assert "passphrase" in str(caught.value) and "wrong horse" not in str(caught.value)
    assert not caught.value.retryable


@pytest.mark.skipif(
    not IS_ROOT and not os.environ.get("CI"),
    reason="password logins need the test user that only root can create; in CI (root) this always runs",
)
def test_password_authentication_and_a_wrong_password(sshd: SshServer) -> None:
    with sftp(sshd, sshd.known_hosts, password=sshd.password) as client:
        client.list(".")
    with pytest.raises(TransportError) as caught:
        sftp(sshd, sshd.known_hosts, password="not-the-password").list(".")
    assert "authentication as" in str(caught.value) and "not-the-password" not in str(caught.value)
    assert not caught.value.retryable


def test_ftps_refuses_a_certificate_it_cannot_verify(vsftpd: Vsftpd) -> None:
    with pytest.raises(TransportError) as caught:
        FtpsTransport("127.0.0.1", vsftpd.port, vsftpd.user, vsftpd.password, root=str(vsftpd.root)).list(".")
    assert "not trusted" in str(caught.value) and "ca_file" in str(caught.value)
    assert not caught.value.retryable


def _flow(tmp_path: Path, db_url: str, clock: ManualClock, transport: dict[str, Any], folder: Path, user: str) -> None:
    """The MailUp flow: full export, MailUp returns unsubscribers, import."""
    sync = Sync(mailup_profile(tmp_path, db_url, transport=transport), clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    result = sync.export("full")
    assert [item.uploaded for item in result.files if item.rows] == [True, True]
    [newsletter] = list((folder / "import" / "1").iterdir())
    assert newsletter.read_bytes().startswith(b"111|1|2|idList|ExternalGroupName|optout\r\n")
    returned = write_csv(
        folder / "export" / "unsubscribers_20260105.csv",
        [
            UNSUB_HEADER,
            unsub_row("bob@example.com", "1", "20260105T100000", "2"),
            unsub_row("dave@example.com", "2", "20260105T100000", "8"),
        ],
    )
    give_to(returned.parent, user)  # the provider's own folder and file, as it would leave them
    give_to(returned, user)
    [outcome] = sync.import_files().files
    assert (outcome.outcome, outcome.changed) == ("applied", 2)
    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(sync.engine, 4, "offers") == "cleaned"
    assert not returned.exists() and len(list((folder / "export" / "processed").iterdir())) == 1
    assert sync.export("diff").rows == 0


def test_mailup_flow_over_sftp_to_openssh(
    tmp_path: Path, db_url: str, clock: ManualClock, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = own_folder(sshd.root, sshd.user)
    _flow(tmp_path, db_url, clock, sftp_transport(sshd, folder, monkeypatch), folder, sshd.user)


def test_mailup_flow_over_ftps_to_vsftpd(
    tmp_path: Path, db_url: str, clock: ManualClock, vsftpd: Vsftpd, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = own_folder(vsftpd.root, vsftpd.user)
    _flow(tmp_path, db_url, clock, vsftpd_transport(vsftpd, folder, monkeypatch), folder, vsftpd.user)


def test_transient_failures_are_retried_with_back_off_and_final_ones_are_not(
    tmp_path: Path, clock: ManualClock, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    transport = {**sftp_transport(sshd, own_folder(sshd.root, sshd.user), monkeypatch), "retries": 3}
    refused = {**transport, "known_hosts": str(tmp_path / "empty_known_hosts")}
    sync = Sync(mailup_profile(tmp_path, db_url, transport=refused), clock=clock)
    sync.init()
    build_tiny_crm(sync.engine)
    started = clock.now()
    with pytest.raises(HostKeyRefused):
        sync.export("full")
    assert clock.now() == started  # refused at once: no back-off sleeps
    closed_port = {**transport, "port": _closed_port()}
    sync = Sync(mailup_profile(tmp_path, db_url, transport=closed_port), clock=clock)
    with pytest.raises(TransportError) as caught:
        sync.export("full")
    assert caught.value.retryable
    assert (clock.now() - started).total_seconds() == 1 + 2 + 4  # three retries, doubling


def _closed_port() -> int:
    from .peers import free_port

    return free_port()


def test_no_secret_appears_in_logs_or_errors(
    tmp_path: Path,
    clock: ManualClock,
    sshd: SshServer,
    vsftpd: Vsftpd,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [PASSPHRASE, vsftpd.password, *([sshd.password] if sshd.password else [])]
    messages: list[str] = []
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    good_sftp = sftp_transport(sshd, own_folder(sshd.root, sshd.user), monkeypatch)
    good_ftps = vsftpd_transport(vsftpd, own_folder(vsftpd.root, vsftpd.user), monkeypatch)
    monkeypatch.setenv("WRONG_SECRET", "wrong-" + PASSPHRASE)
    secrets.append("wrong-" + PASSPHRASE)
    for transport in (
        good_sftp,
        good_ftps,
        {**good_sftp, "key_passphrase_env": "WRONG_SECRET"},
        {**good_ftps, "password_env": "WRONG_SECRET"},
    ):
        profile = mailup_profile(tmp_path, db_url, transport={**transport, "retries": 0})
        sync = Sync(profile, clock=clock)
        if sync.init().tables_missing:
            build_tiny_crm(sync.engine)
        try:
            sync.export("full")
            client = open_transport(profile)
            messages.append(repr(client))
            client.close()
        except TransportError as exc:
            messages.append(str(exc))
            messages.append(repr(exc))
    messages += [record.getMessage() for record in caplog.records]
    messages += [str(record.exc_info) for record in caplog.records if record.exc_info]
    text = "\n".join(messages)
    assert "refused" in text or "passphrase" in text  # the failures did happen
    for secret in secrets:
        assert secret not in text
