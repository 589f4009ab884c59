"""`batchsync status` as a table and as JSON, and the summary email through a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from batchsync.cli import main
from batchsync.clock import ManualClock
from batchsync.daemon import Daemon

from .conftest import Inbox, notify_section
from .crmdata import UNSUB_HEADER, unsub_row, write_csv
from .peers import free_port
from .test_daemon import prepared


def test_status_reports_runs_next_run_waiting_quarantine_and_rejections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = prepared(tmp_path, db_url)
    inbox = tmp_path / "work" / "inbox"
    write_csv(
        inbox / "unsubscribers_1.csv",
        [
            UNSUB_HEADER,
            unsub_row("bob@example.com", "1", "20260105T100000", "2"),
            unsub_row("broken", "1", "20260105T100000", "2"),
        ],
    )
    (inbox / "unsubscribers_bad.csv").write_bytes(b"")
    import os
    import time

    old = time.time() - 3600
    for path in inbox.iterdir():
        os.utime(path, (old, old))
    assert main(["import", "-p", str(profile)]) == 3
    write_csv(inbox / "unsubscribers_2.csv", [UNSUB_HEADER])  # too new: waits
    capsys.readouterr()

    assert main(["status", "-p", str(profile), "--json"]) == 0
    [status] = json.loads(capsys.readouterr().out)
    assert status["profile"] == "mailup"
    assert status["next_run"].endswith(("T01:30:00+00:00", "T00:30:00+00:00"))  # 02:30 in Rome
    assert status["waiting"] == ["inbox/unsubscribers_2.csv"]
    assert status["quarantined"] == ["quarantine/unsubscribers_bad.csv"]
    assert status["rejected_last_run"] == 1
    [run] = status["last_runs"]
    assert (run["kind"], run["outcome"], run["counts"]["changed"], run["counts"]["quarantined"]) == (
        "import",
        "rejected",
        1,
        1,
    )

    assert main(["status", "-p", str(profile)]) == 0
    table = capsys.readouterr().out
    assert "profile mailup" in table and "next run:" in table
    assert "waiting files:  1 (inbox/unsubscribers_2.csv)" in table
    assert "quarantined:    1 (quarantine/unsubscribers_bad.csv)" in table
    assert "rejected rows in the last run: 1" in table
    assert "import  " in table and "rejected" in table


def test_a_summary_email_arrives_with_counts_bounces_and_the_errors_file(
    tmp_path: Path, smtp: tuple[Inbox, int]
) -> None:
    mailbox, port = smtp
    profile = prepared(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", extra=notify_section(port))
    write_csv(
        tmp_path / "work" / "inbox" / "unsubscribers_1.csv",
        [
            UNSUB_HEADER,
            unsub_row("bob@example.com", "1", "20260105T100000", "2"),
            unsub_row("dave@example.com", "1", "20260105T100000", "8"),
            unsub_row("not an email", "1", "20260105T100000", "2"),
        ],
    )
    clock = ManualClock(datetime(2030, 1, 3, 1, 25, tzinfo=UTC))  # a night long after the file was written
    daemon = Daemon([profile], clock=clock)
    daemon.start()  # the recovery import at start mails too
    daemon.close()
    [message] = mailbox.messages
    assert message["To"] == "crm-admin@example.com"
    assert message["Subject"] == "batchsync mailup: 2 changes, 1 rows rejected"
    parts = list(message.walk())
    body = next(part for part in parts if part.get_content_type() == "text/plain").get_payload(decode=True).decode()
    body = body.replace("\r\n", "\n")
    assert "3 rows, 2 changed, 1 rejected" in body
    assert "Hard bounces (1):\n  dave@example.com" in body
    [attachment] = [part for part in parts if part.get_filename()]
    assert attachment.get_filename() == "unsubscribers_1.csv.errors.csv"
    errors = attachment.get_payload(decode=True).decode()
    assert "not an email" in errors and "invalid email" in errors


def test_the_summary_goes_over_starttls_with_a_verified_certificate_and_a_login(tmp_path: Path) -> None:
    import ssl

    from aiosmtpd.smtp import AuthResult, LoginPassword

    from .peers import make_certificates

    certs = make_certificates(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    logins: list[tuple[str, str]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login.decode(), data.password.decode()))
        return AuthResult(success=data.password == b"smtp-secret")

    mailbox = Inbox()
    port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    controller.start()
    try:
        import os

        os.environ["BATCHSYNC_TEST_SMTP_PASSWORD"] = "smtp-secret"
        notify = notify_section(port) + (
            'smtp_user = "batchsync"\nsmtp_password_env = "BATCHSYNC_TEST_SMTP_PASSWORD"\n'
            f'starttls = "required"\nca_file = "{certs.ca}"\n'
        )
        profile = prepared(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", extra=notify)
        write_csv(
            tmp_path / "work" / "inbox" / "unsubscribers_1.csv",
            [UNSUB_HEADER, unsub_row("bob@example.com", "1", "20260105T100000", "2")],
        )
        daemon = Daemon([profile], clock=ManualClock(datetime(2030, 1, 3, 1, 25, tzinfo=UTC)))
        daemon.start()
        daemon.close()
    finally:
        controller.stop()
    assert logins == [("batchsync", "smtp-secret")]
    [message] = mailbox.messages
    assert message["Subject"] == "batchsync mailup: 1 changes, 0 rows rejected"


def test_no_summary_is_sent_for_an_import_that_took_nothing(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    mailbox, port = smtp
    profile = prepared(tmp_path, f"sqlite:///{tmp_path / 'crm.sqlite'}", extra=notify_section(port))
    daemon = Daemon([profile], clock=ManualClock(datetime(2030, 1, 3, 1, 25, tzinfo=UTC)))
    daemon.start()  # the start-up import finds nothing
    daemon.close()
    assert mailbox.messages == []
