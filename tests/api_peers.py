"""Each provider API, its fake server and its profile behind one small interface, so that one scenario suite
(tests/test_api_scenarios.py) runs against every API transport, as the transport contract suite runs against
every file server. A peer knows how to make its provider hold, refuse, opt out and clean an address, in that
provider's own terms (Mailchimp forgets an address for good; Acoustic refuses a text in a numeric column;
Flexmail refuses an address it holds unsubscribed), and how the provider's reports reach batchsync."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from batchsync.clock import ManualClock
from batchsync.config import Profile, load_profile
from batchsync.db.schema import contacts
from batchsync.sync import Sync
from batchsync.transport import open_transport

from .acoustic_server import NUMERIC, AcousticServer, Column
from .conftest import ROOT, own_folder, sftp_transport
from .crmdata import build_tiny_crm, set_status
from .flexmail_server import FlexmailServer
from .mailchimp_server import MailchimpServer, MergeField, subscriber_hash
from .peers import SshServer, free_port, give_to
from .test_unattended import wait_until

KINDS = ["mailchimp", "acoustic", "flexmail"]
# The tiny CRM's newsletter, as a list (Mailchimp, Acoustic: eve's second contact is unsubscribed, so her address
# is) and as Flexmail's segment of flagged contacts (eve's flagged contact alone).
ON_THE_LIST = {"alice", "bob", "dave", "grace", "heidi", "ivan", "judy"}
IN_THE_SEGMENT = {"alice", "bob", "dave", "eve", "ivan"}


def address(name: str) -> str:
    return f"{name}@example.com"


class ApiPeer:
    """A provider's fake server, a profile pointed at it and a Sync on the tiny CRM."""

    kind: str
    subscribed_names: set[str]
    sync: Sync

    def __init__(self, tmp_path: Path, clock: ManualClock, stack: ExitStack) -> None:
        self.tmp_path, self.clock, self.stack = tmp_path, clock, stack

    def ready(self, profile: Profile) -> None:
        clock = self.clock
        self.sync = Sync(profile, clock=clock, transport_factory=lambda p: open_transport(p, clock))
        self.sync.init()
        build_tiny_crm(self.sync.engine)

    def held(self) -> dict[str, str]:
        """Address -> the provider's status, in batchsync's words (subscribed, unsubscribed, cleaned, pending)."""
        raise NotImplementedError

    def subscribed(self) -> set[str]:
        return {email for email, status in self.held().items() if status == "subscribed"}

    def refuse(self, name: str) -> None:
        """From now on the provider refuses this address's row."""
        raise NotImplementedError

    def accept(self, name: str) -> None:
        """The provider takes this address's row again."""
        raise NotImplementedError

    def opt_out(self, name: str, at: datetime) -> None:
        """The person opts out at the provider (an unsubscribe link)."""
        raise NotImplementedError

    def clean(self, name: str, at: datetime) -> None:
        """The provider cleans the address (bounced, undeliverable)."""
        raise NotImplementedError

    def reports_in(self) -> None:
        """What the provider reported has reached batchsync (a polled API: nothing to wait for)."""

    def take_off(self, contact_id: int) -> None:
        """The CRM takes the contact off the list."""
        set_status(self.sync.engine, contact_id, "newsletter", "unsubscribed", self.clock.now())

    def fail_next(self, count: int, status: int) -> None:
        raise NotImplementedError

    def api_requests(self) -> int:
        """Requests the provider's API received (what it counts against its limits)."""
        raise NotImplementedError


class MailchimpPeer(ApiPeer):
    kind, subscribed_names = "mailchimp", ON_THE_LIST
    list_id = "a1b2c3d4e5"

    def start(self) -> None:
        server = self.server = self.stack.enter_context(MailchimpServer())
        server.api.clock = self.clock.now
        fields = [MergeField("FNAME", "First Name"), MergeField("LNAME", "Last Name"), MergeField("CITY", "City")]
        server.add_audience(self.list_id, "Newsletter", fields)
        key = self.tmp_path / "mailchimp.key"
        key.write_text(server.api_key, encoding="utf-8")
        transport = {"kind": "mailchimp", "url": server.url, "api_key_file": str(key), "poll_seconds": 1.0}
        self.ready(_profile(self.tmp_path, "mailchimp-api.toml", {**transport, "batch_size": 4}))

    def held(self) -> dict[str, str]:
        with self.server.api.lock:
            members = self.server.audiences[self.list_id].members.values()
            return {member.email_address: member.status for member in members}

    def refuse(self, name: str) -> None:  # deleted for good at Mailchimp: it refuses the address
        self.server.audiences[self.list_id].forgotten.add(subscriber_hash(address(name)))

    def accept(self, name: str) -> None:
        self.server.audiences[self.list_id].forgotten.discard(subscriber_hash(address(name)))

    def opt_out(self, name: str, at: datetime) -> None:
        self._set(name, "unsubscribed", at)

    def clean(self, name: str, at: datetime) -> None:
        self._set(name, "cleaned", at)

    def _set(self, name: str, status: str, at: datetime) -> None:
        member = self.server.member(self.list_id, address(name))
        assert member is not None
        member.status, member.last_changed = status, at

    def fail_next(self, count: int, status: int) -> None:
        self.server.fail_next(count, status)

    def api_requests(self) -> int:
        return sum(1 for request in self.server.requests if request.split(" ", 1)[1].startswith("/3.0/"))


class AcousticPeer(ApiPeer):
    kind, subscribed_names = "acoustic", ON_THE_LIST
    list_id = "1234567"

    def start(self, sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
        home = own_folder(sshd.root, sshd.user)
        server = self.server = self.stack.enter_context(AcousticServer(home))
        server.clock, server.job_polls = self.clock.now, 2
        for folder in (home / "upload", home / "download"):
            give_to(folder, sshd.user)
        # LAST_NAME is a number at this Acoustic: a text there is a row it refuses (refuse, below)
        columns = [Column("FIRST_NAME"), Column("LAST_NAME", NUMERIC), Column("OPT_IN_STATUS")]
        server.add_list(self.list_id, "Newsletter", columns)
        monkeypatch.setenv("ACOUSTIC_CLIENT_SECRET", server.client_secret)
        monkeypatch.setenv("ACOUSTIC_REFRESH_TOKEN", server.refresh_token)
        transport = {
            **sftp_transport(sshd, home, monkeypatch),
            "kind": "acoustic",
            "url": server.base_url,
            "client_id": server.client_id,
            "client_secret_env": "ACOUSTIC_CLIENT_SECRET",
            "refresh_token_env": "ACOUSTIC_REFRESH_TOKEN",
            "retries": 3,
        }
        self.ready(_profile(self.tmp_path, "acoustic-api.toml", transport))
        with self.sync.engine.begin() as connection:  # every last name a number
            connection.execute(update(contacts).values(last_name=contacts.c.id))

    def held(self) -> dict[str, str]:
        with self.server.api.lock:
            found = self.server.lists[self.list_id].contacts.values()
            return {
                c.email: "cleaned" if c.undeliverable else "unsubscribed" if c.opted_out else "subscribed"
                for c in found
            }

    def refuse(self, name: str) -> None:
        self._last_name(name, "Text")

    def accept(self, name: str) -> None:
        self._last_name(name, "42")

    def _last_name(self, name: str, value: str) -> None:
        with self.sync.engine.begin() as connection:
            connection.execute(update(contacts).where(contacts.c.email == address(name)).values(last_name=value))

    def opt_out(self, name: str, at: datetime) -> None:
        self.server.opt_out(self.list_id, address(name), at=at)

    def clean(self, name: str, at: datetime) -> None:
        contact = self.server.contact(self.list_id, address(name))
        assert contact is not None
        contact.undeliverable, contact.last_modified = True, at

    def fail_next(self, count: int, status: int) -> None:
        self.server.fail_next(count, status, endpoint="xml")

    def api_requests(self) -> int:
        return self.server.request_count


class FlexmailPeer(ApiPeer):
    kind, subscribed_names = "flexmail", IN_THE_SEGMENT
    hook_key = "flexmail-hook-secret-42"

    def start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        server = self.server = self.stack.enter_context(FlexmailServer())
        server.clock = self.clock.now
        server.add_source("CRM", 1)
        server.add_custom_field("city", "City")
        self.environment = {
            "BATCHSYNC_FLEXMAIL_TOKEN": server.token,
            "BATCHSYNC_FLEXMAIL_HOOK_KEY": self.hook_key,
            "BATCHSYNC_CRM_URL": f"sqlite:///{self.tmp_path / 'crm.sqlite'}",
        }
        for name, value in self.environment.items():
            monkeypatch.setenv(name, value)
        transport = {"kind": "flexmail", "url": server.url, "user": server.account_id, "language": "nl"}
        transport |= {"source_id": 1, "max_per_minute": 60, "api_key_env": "BATCHSYNC_FLEXMAIL_TOKEN"}
        self.path = self.tmp_path / "flexmail-api.toml"
        self.ready(_profile(self.tmp_path, "flexmail-api.toml", transport, write_to=self.path))

    def held(self) -> dict[str, str]:
        statuses = {"active": "subscribed", "unsubscribed": "unsubscribed", "bounced_out": "cleaned"}
        with self.server.api.lock:
            return {c.email: statuses[c.status] for c in self.server.api.contacts.values()}

    def refuse(self, name: str) -> None:  # Flexmail holds it unsubscribed: a new contact for it is refused (409)
        self.server.add_contact(address(name))
        with self.server.api.lock:
            contact = self.server.api.by_email(address(name))
            assert contact is not None
            contact.status = "unsubscribed"

    def accept(self, name: str) -> None:
        with self.server.api.lock:
            contact = self.server.api.by_email(address(name))
            assert contact is not None
            del self.server.api.contacts[contact.id]

    def take_off(self, contact_id: int) -> None:  # out of the segment
        with self.sync.engine.begin() as connection:
            connection.execute(update(contacts).where(contacts.c.id == contact_id).values(custom={"newsletter": "0"}))

    def opt_out(self, name: str, at: datetime) -> None:
        self._listening()
        self.server.unsubscribe_at_flexmail(address(name), at=at, reason="too many mails")

    def clean(self, name: str, at: datetime) -> None:
        self._listening()
        self.server.bounce(address(name), at=at)

    def _listening(self) -> None:
        """Flexmail tells by webhook: the real ``batchsync serve`` takes its calls, registered at Flexmail."""
        if getattr(self, "serve", None) is not None:
            return
        port, log = free_port(), self.tmp_path / "serve.log"
        command = [
            sys.executable,
            "-m",
            "batchsync.cli",
            "serve",
            "-p",
            str(self.path),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        with log.open("wb") as handle:
            self.serve = subprocess.Popen(command, stdout=handle, stderr=handle, env={**os.environ, **self.environment})
        self.stack.callback(self._stop_serving, log)
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), log)
        target = f"http://127.0.0.1:{port}/hooks/flexmail-api/flexmail?key={self.hook_key}"
        for event in ("contact.unsubscribed", "contact.bounced_out"):
            _post_json(self.server, "/webhooks", {"event_name": event, "target_url": target})

    def _stop_serving(self, log: Path) -> None:
        self.serve.send_signal(signal.SIGTERM)
        assert self.serve.wait(timeout=60) == 0, log.read_text()

    def reports_in(self) -> None:
        """The webhooks' calls, journalled by serve, are in the inbox (serve cuts its journal as it goes)."""
        inbox = self.sync.work.inbox
        wait_until(lambda: any(inbox.glob("callback_flexmail.*.csv")), self.tmp_path / "serve.log")

    def fail_next(self, count: int, status: int) -> None:
        self.server.fail_next(count, status)

    def api_requests(self) -> int:
        return self.server.request_count


def _profile(tmp_path: Path, name: str, transport: dict[str, Any], write_to: Path | None = None) -> Profile:
    """The shipped profile pointed at the fake, a work folder and a SQLite CRM (written to ``write_to`` for a
    process of its own)."""
    database = {"url": f"sqlite:///{tmp_path / 'crm.sqlite'}"}
    overrides = {"database": database, "work.dir": str(tmp_path / "work"), "transport": transport}
    profile = load_profile(ROOT / "profiles" / name, overrides=overrides)
    if write_to is not None:
        text = (ROOT / "profiles" / name).read_text(encoding="utf-8")
        text = text.replace('dir = "../var/flexmail-api"', f'dir = "{tmp_path / "work"}"')
        text = text.replace('url = "https://api.flexmail.eu"', f'url = "{transport["url"]}"')
        write_to.write_text(text.replace('user = "123456"', f'user = "{transport["user"]}"'), encoding="utf-8")
    return profile


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except OSError:
        return False


def _post_json(server: FlexmailServer, path: str, document: dict[str, str]) -> None:
    credentials = base64.b64encode(f"{server.account_id}:{server.token}".encode()).decode()
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(document).encode(),
        headers={"Authorization": f"Basic {credentials}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 201
