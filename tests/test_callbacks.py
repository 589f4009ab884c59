"""Providers' callbacks as they arrive: the real daemon process with its listener on loopback, a real HTTP client,
payloads as each provider documents them (batchsync/hookformats.py cites the pages), the CRM checked after."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from batchsync.db.schema import bs_changes, bs_files, contacts, make_engine

from .crmdata import status_of
from .peers import free_port
from .test_unattended import local_transport, prepare_crm, profile_text, wait_until

SECRETS = {
    "HOOK_MAILCHIMP": "mc-key-5f1e2d",
    "HOOK_MAILIGEN": "mg-secret-77aa",
    "HOOK_MAILUP": "mu-token-31c4",
    "HOOK_CUSTOM": "custom-secret-9b",
}
CALLBACKS = """
[[callback]]
name = "mailchimp"
format = "mailchimp"
secret_env = "HOOK_MAILCHIMP"
secret_in = "query"

[[callback]]
name = "mailigen"
format = "mailigen"
secret_env = "HOOK_MAILIGEN"
secret_in = "mailigen-signature"

[[callback]]
name = "mailigen-changes"
format = "json"
secret_env = "HOOK_MAILIGEN"
secret_in = "query"
event = "email_change"
fields = { email = "data.old_email", new_email = "data.new_email", list_id = "data.list", at = "timestamp" }
timestamp_format = "epoch"

[[callback]]
name = "mailup"
format = "mailup"
secret_env = "HOOK_MAILUP"
secret_in = "path"

[[callback]]
name = "custom"
format = "json"
secret_env = "HOOK_CUSTOM"
secret_in = "hmac-sha256"
fields = { email = "subscriber.email", list_id = "list", at = "when", reason = "code" }
codes = { unsub = "unsubscribe", spam = "complaint" }
timestamp_format = "%Y-%m-%dT%H:%M:%SZ"
max_per_second = 5
"""


def post(url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> int:
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except urllib.error.URLError:
        return 0  # not listening yet


def form(fields: dict[str, str]) -> bytes:
    return urllib.parse.urlencode(fields).encode()


def fired(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}"


def signed(secret: str, body: bytes, scheme: str) -> str:
    digest = hmac.new(secret.encode(), body, hashlib.sha256 if scheme == "sha256" else hashlib.sha1).hexdigest()
    return f"sha1={digest}" if scheme == "sha1" else digest


@contextmanager
def daemon_with_callbacks(tmp_path: Path, log: Path) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """(base URL, CRM URL, process) of a daemon whose profile takes the five callbacks above."""
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = tmp_path / "mailup.toml"
    if not profile.exists():
        profile.write_text(profile_text(tmp_path, db_url, transport=local_transport(tmp_path), extra=CALLBACKS))
        prepare_crm(profile)
    port = free_port()
    command = [sys.executable, "-m", "batchsync.cli", "--log-level", "debug", "daemon", str(profile), "--tick", "0.2"]
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [*command, "--listen", f"127.0.0.1:{port}"], stdout=handle, stderr=handle, env={**os.environ, **SECRETS}
        )
    try:
        base = f"http://127.0.0.1:{port}/hooks/mailup"
        wait_until(lambda: post(f"{base}/mailchimp?key=x", b"", method="GET") in (200, 401), log)
        yield base, db_url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def contact_email(db_url: str, contact_id: int) -> str:
    engine = make_engine(db_url)
    with engine.connect() as connection:
        return str(connection.scalar(select(contacts.c.email).where(contacts.c.id == contact_id)))


def changes_of(db_url: str, contact_id: int) -> list[tuple[str, str | None, str | None]]:
    engine = make_engine(db_url)
    with engine.connect() as connection:
        query = select(bs_changes.c.rule, bs_changes.c.source_file, bs_changes.c.origin).where(
            bs_changes.c.contact_id == contact_id
        )
        return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]


def callback_files(db_url: str) -> list[tuple[str, str]]:
    with make_engine(db_url).connect() as connection:
        query = select(bs_files.c.name, bs_files.c.outcome).where(bs_files.c.name.like("callback_%"))
        return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]


def reached(check: Callable[[], bool], log: Path, seconds: float = 5.0) -> None:
    """Wait for ``check``; it must come true within ``seconds`` (the bar for a callback: in the CRM within seconds
    of the call)."""
    started = time.monotonic()
    wait_until(check, log, timeout=30)
    assert time.monotonic() - started <= seconds, f"took {time.monotonic() - started:.1f} s"


def test_each_provider_s_callbacks_reach_the_crm_within_seconds_and_a_second_delivery_changes_nothing(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC) - timedelta(minutes=1)
    log = tmp_path / "daemon.log"
    with daemon_with_callbacks(tmp_path, log) as (base, db_url, _process):
        engine = make_engine(db_url)
        # Mailchimp: the validation GET, an unsubscribe and an address change, form-encoded as Mailchimp sends them
        assert post(f"{base}/mailchimp?key={SECRETS['HOOK_MAILCHIMP']}", b"", method="GET") == 200
        unsubscribe = form(
            {"type": "unsubscribe", "fired_at": fired(now), "data[action]": "unsub", "data[reason]": "manual",
             "data[id]": "8a25ff1d98", "data[list_id]": "1", "data[email]": "bob@example.com",
             "data[email_type]": "html", "data[merges][EMAIL]": "bob@example.com", "data[web_id]": "210833825"}
        )  # fmt: skip
        mailchimp = f"{base}/mailchimp?key={SECRETS['HOOK_MAILCHIMP']}"
        assert post(mailchimp, unsubscribe, {"Content-Type": "application/x-www-form-urlencoded"}) == 200
        reached(lambda: status_of(engine, 2, "newsletter") == "unsubscribed", log)
        upemail = form(
            {"type": "upemail", "fired_at": fired(now), "data[list_id]": "1", "data[new_id]": "51da8c3259",
             "data[new_email]": "alice.new@example.com", "data[old_email]": "alice@example.com"}
        )  # fmt: skip
        assert post(mailchimp, upemail, {"Content-Type": "application/x-www-form-urlencoded"}) == 200
        reached(lambda: contact_email(db_url, 1) == "alice.new@example.com", log)

        # Mailigen: an unsubscribe (JSON, signed), and an address change through a json callback with a mapping
        body = json.dumps(
            {"hook": "contact.unsubscribe", "timestamp": int(now.timestamp()), "data": [
                {"contact": "58eacf62", "list": "2", "email": "dave@example.com", "email_type": "html",
                 "unsubscribe_ip": "17.142.160.59", "unsubscribe_ts": int(now.timestamp())}]}
        ).encode()  # fmt: skip
        assert post(f"{base}/mailigen", b"", method="HEAD") == 200
        signature = {"X-Mailigen-Signature": signed(SECRETS["HOOK_MAILIGEN"], body, "sha1")}
        assert post(f"{base}/mailigen", body, {"Content-Type": "application/json", **signature}) == 200
        reached(lambda: status_of(engine, 4, "offers") == "unsubscribed", log)
        change = json.dumps(
            {"timestamp": int(now.timestamp()),
             "data": {"list": "1", "old_email": "ivan@example.com", "new_email": "ivan.new@example.com"}}
        ).encode()  # fmt: skip
        assert post(f"{base}/mailigen-changes?key={SECRETS['HOOK_MAILIGEN']}", change) == 200
        reached(lambda: contact_email(db_url, 11) == "ivan.new@example.com", log)

        # MailUp: a webhook by GET with the parameters of MailUp's own example, the secret as the URL's last part
        query = urllib.parse.urlencode(
            {
                "customerEmail": "heidi@example.com",
                "customerList": "1",
                "unsubscribeDate": f"{now:%Y-%m-%dT%H:%M:%S}.695+00",
            }
        )
        assert post(f"{base}/mailup/{SECRETS['HOOK_MAILUP']}?{query}", b"", method="GET") == 200
        reached(lambda: status_of(engine, 10, "newsletter") == "unsubscribed", log)

        # A json callback with a mapping and a reason code, signed with HMAC-SHA256
        body = json.dumps(
            {
                "subscriber": {"email": "judy@example.com"},
                "list": "1",
                "when": f"{now:%Y-%m-%dT%H:%M:%SZ}",
                "code": "unsub",
            }
        ).encode()
        assert post(f"{base}/custom", body, {"X-Signature": signed(SECRETS["HOOK_CUSTOM"], body, "sha256")}) == 200
        reached(lambda: status_of(engine, 12, "newsletter") == "unsubscribed", log)

        before, files = changes_of(db_url, 2), callback_files(db_url)
        assert post(mailchimp, unsubscribe, {"Content-Type": "application/x-www-form-urlencoded"}) == 200  # again
        wait_until(lambda: len(callback_files(db_url)) > len(files), log)  # the retry's file was taken...
        assert changes_of(db_url, 2) == before  # ...and changed nothing
    for contact_id, name in (
        (2, "mailchimp"),
        (1, "mailchimp"),
        (4, "mailigen"),
        (11, "mailigen-changes"),
        (10, "mailup"),
        (12, "custom"),
    ):
        audited = changes_of(db_url, contact_id)
        assert audited and all(
            origin == "callback" and (source or "").startswith(f"callback_{name}.") for _, source, origin in audited
        ), (contact_id, audited)
    text = log.read_text()
    assert "Traceback" not in text
    for secret in SECRETS.values():
        assert secret not in text  # the logs never hold a secret, not even one in a URL


def test_refusals_write_nothing(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    with daemon_with_callbacks(tmp_path, log) as (base, db_url, _process):
        engine = make_engine(db_url)
        unsubscribe = form({"type": "unsubscribe", "fired_at": fired(datetime.now(UTC)), "data[list_id]": "1",
                            "data[email]": "bob@example.com", "data[reason]": "manual"})  # fmt: skip
        assert post(f"{base}/mailchimp?key=not-the-key", unsubscribe) == 401
        assert post(f"{base}/mailchimp", unsubscribe) == 401
        assert post(f"{base}/nothing?key={SECRETS['HOOK_MAILCHIMP']}", unsubscribe) == 404
        assert post(f"{base.replace('/mailup', '/nobody')}/mailchimp?key=x", unsubscribe) == 404
        assert post(f"{base}/mailchimp?key={SECRETS['HOOK_MAILCHIMP']}", b"x" * (1024 * 1024)) == 413
        assert post(f"{base}/mailchimp?key={SECRETS['HOOK_MAILCHIMP']}", b"type=nonsense&data%5Bemail%5D=a") == 400
        garbage = b"{not json"
        assert (
            post(f"{base}/custom", garbage, {"X-Signature": signed(SECRETS["HOOK_CUSTOM"], garbage, "sha256")}) == 400
        )
        codes = [post(f"{base}/custom", b"{}", {"X-Signature": "wrong"}) for _ in range(30)]
        assert 429 in codes and set(codes) <= {401, 429}
        time.sleep(2)
        assert status_of(engine, 2, "newsletter") == "subscribed"
        metrics = urllib.request.urlopen(base.replace("/hooks/mailup", "/metrics"), timeout=30).read().decode()
        for outcome, least in (("unauthorized", 2), ("too_large", 1), ("bad_request", 1), ("rate_limited", 1)):
            found = [line for line in metrics.splitlines() if f'outcome="{outcome}"' in line and "_total{" in line]
            assert sum(float(line.rsplit(" ", 1)[1]) for line in found) >= least, (outcome, found)
        page = urllib.request.urlopen(base.replace("/hooks/mailup", "/"), timeout=30).read().decode()
        assert "<h2>Callbacks</h2>" in page and "unauthorized=" in page
    journals = tmp_path / "work" / "callbacks"
    assert not journals.exists() or not any(journals.iterdir())
    with make_engine(db_url).connect() as connection:
        taken = connection.scalar(select(func.count()).select_from(bs_files).where(bs_files.c.name.like("callback_%")))
    assert taken == 0
    assert all(secret not in log.read_text() for secret in SECRETS.values())


def test_a_daemon_killed_right_after_its_answer_applies_the_call_once_after_a_restart(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    body = form({"type": "unsubscribe", "fired_at": fired(datetime.now(UTC) - timedelta(minutes=1)),
                 "data[list_id]": "1", "data[email]": "bob@example.com", "data[reason]": "manual"})  # fmt: skip
    with daemon_with_callbacks(tmp_path, log) as (base, db_url, process):
        assert post(f"{base}/mailchimp?key={SECRETS['HOOK_MAILCHIMP']}", body) == 200
        os.kill(process.pid, signal.SIGKILL)  # before the journal (cut each second) became a file
        process.wait(timeout=10)
    journal = tmp_path / "work" / "callbacks" / "mailchimp.journal"
    assert journal.read_bytes().count(b"\n") == 1
    with daemon_with_callbacks(tmp_path, log) as (_base, db_url, _process):
        engine = make_engine(db_url)
        wait_until(lambda: status_of(engine, 2, "newsletter") == "unsubscribed", log)
        time.sleep(2)
    assert [rule for rule, _, _ in changes_of(db_url, 2)] == ["opt-out newer than state"] or len(
        changes_of(db_url, 2)
    ) == 1
    with make_engine(db_url).connect() as connection:
        applied = connection.scalar(
            select(func.count())
            .select_from(bs_files)
            .where(bs_files.c.name.like("callback_mailchimp.%"), bs_files.c.outcome == "applied")
        )
    assert applied == 1


def test_a_receiver_alone_journals_calls_into_the_inbox_that_a_later_import_applies(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    text = profile_text(tmp_path, db_url, transport=local_transport(tmp_path), extra=CALLBACKS)
    (tmp_path / "mailup.toml").write_text(text)
    prepare_crm(tmp_path / "mailup.toml")
    dmz = tmp_path / "dmz.toml"  # the receiver's copy of the profile: the CRM's address is not known in the DMZ
    dmz.write_text(text.replace(f'url = "{db_url}"', 'url_env = "BATCHSYNC_CRM_URL_NOT_IN_THE_DMZ"'))
    port, log = free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-m", "batchsync.cli", "serve", "-p", str(dmz), "--listen", f"127.0.0.1:{port}"]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=handle, env={**os.environ, **SECRETS})
    try:
        url = f"http://127.0.0.1:{port}/hooks/mailup/mailchimp?key={SECRETS['HOOK_MAILCHIMP']}"
        wait_until(lambda: post(url, b"", method="GET") == 200, log)
        body = form({"type": "unsubscribe", "fired_at": fired(datetime.now(UTC) - timedelta(minutes=1)),
                     "data[list_id]": "1", "data[email]": "bob@example.com", "data[reason]": "manual"})  # fmt: skip
        assert post(url, body) == 200
        inbox = tmp_path / "work" / "inbox"
        wait_until(lambda: any(inbox.glob("callback_mailchimp.*.csv")), log)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        assert 'batchsync_callbacks_total{callback="mailchimp",outcome="accepted",profile="mailup"} 1.0' in metrics
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    done = subprocess.run(
        [sys.executable, "-m", "batchsync.cli", "import", "-p", str(tmp_path / "mailup.toml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "(callback): applied" in done.stdout
    assert status_of(make_engine(db_url), 2, "newsletter") == "unsubscribed"
    assert [origin for _, _, origin in changes_of(db_url, 2)] == ["callback"]


def test_a_journal_left_uncut_turns_healthz_unhealthy(tmp_path: Path) -> None:
    from batchsync.daemon import Daemon
    from batchsync.web import snapshot

    profile = tmp_path / "mailup.toml"
    profile.write_text(
        profile_text(tmp_path, "sqlite:///x.sqlite", transport=local_transport(tmp_path), extra=CALLBACKS)
    )
    daemon = Daemon([profile], receive_only=True)
    daemon.load_profiles()
    journal = daemon.hooks.journals[("mailup", "mailchimp")]
    journal.folder.mkdir(parents=True)
    journal.path.write_text('{"email": "a@example.com"}\n' * 3)  # three rows no cutter took
    journal.waiting_since = time.monotonic() - 120
    shot = snapshot(daemon)
    daemon.close()
    assert not shot.healthy
    [problem] = shot.statuses[0].problems
    assert problem.startswith("callback mailchimp: 3 rows journalled 120 s ago, not cut")
