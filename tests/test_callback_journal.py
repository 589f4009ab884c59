"""The callbacks' journal and readers, piece by piece: a body that arrives in parts, a torn line, two processes
on one journal, callbacks whose names look alike, GET deliveries, list-less subscribes, redacted logs, revert."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from batchsync.cli import main
from batchsync.collect import Collector
from batchsync.config import load_profile
from batchsync.db.schema import make_engine
from batchsync.hookconfig import CallbackConfig
from batchsync.hookformats import Call, HookRow, read_call
from batchsync.journal import Journal
from batchsync.logs import _Redact

from .crmdata import status_of
from .test_callbacks import CALLBACKS, SECRETS, daemon_with_callbacks, fired, form
from .test_unattended import local_transport, prepare_crm, profile_text, wait_until

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def rows(n: int, start: int = 0) -> list[HookRow]:
    return [HookRow(f"user{i}@example.com", "1", NOW, "unsubscribe") for i in range(start, start + n)]


def cut_emails(inbox: Path) -> list[str]:
    found = []
    for path in sorted(inbox.glob("*.csv")):
        found += [line.split(",")[0] for line in path.read_text().splitlines()[1:]]
    return found


def test_a_body_that_arrives_in_pieces_is_read_whole(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    with daemon_with_callbacks(tmp_path, log) as (base, db_url, _process):
        port = int(base.split(":")[2].split("/")[0])
        body = form({"type": "unsubscribe", "fired_at": fired(datetime.now(UTC)), "data[list_id]": "2",
                     "data[email]": "dave@example.com", "data[reason]": "manual"})  # fmt: skip
        head = (
            f"POST /hooks/mailup/mailchimp?key={SECRETS['HOOK_MAILCHIMP']} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(head + body[:20])
            time.sleep(0.5)  # the rest comes later, as over a slow link
            connection.sendall(body[20:])
            answer = connection.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        engine = make_engine(db_url)
        wait_until(lambda: status_of(engine, 4, "offers") == "unsubscribed", log)
        assert status_of(engine, 4, "newsletter") == "subscribed"  # list 2 only: the whole body was read


def test_a_line_a_failed_write_tore_is_skipped_and_the_rows_after_it_are_cut(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "callbacks", "mailchimp")
    asyncio.run(journal.append(rows(2)))
    with journal.path.open("ab") as handle:
        handle.write(b'{"email": "torn@exa')  # a write cut short by a full disk (that call was answered 503)
    asyncio.run(journal.append(rows(2, start=2)))
    made = journal.cut(tmp_path / "inbox", "callback_mailchimp", "1")
    assert [path.name for path in made] == ["callback_mailchimp.1.csv"]
    assert cut_emails(tmp_path / "inbox") == [f"user{i}@example.com" for i in range(4)]
    assert not journal.has_rows()


def test_a_writer_and_a_cutter_in_two_places_lose_no_row(tmp_path: Path) -> None:
    writer = Journal(tmp_path / "callbacks", "mailchimp")  # the listener of `serve`...
    cutter = Journal(tmp_path / "callbacks", "mailchimp")  # ...and a daemon cutting the same folder
    done = threading.Event()

    def cut_until_done() -> None:
        stamp = 0
        while not done.is_set():
            stamp += 1
            cutter.cut(tmp_path / "inbox", "callback_mailchimp", f"{stamp:06d}")

    thread = threading.Thread(target=cut_until_done)
    thread.start()

    async def write() -> None:
        for start in range(0, 2000, 10):
            await asyncio.gather(*(writer.append(rows(1, start=start + i)) for i in range(10)))

    asyncio.run(write())
    done.set()
    thread.join()
    cutter.cut(tmp_path / "inbox", "callback_mailchimp", "999999")
    assert sorted(cut_emails(tmp_path / "inbox")) == sorted(f"user{i}@example.com" for i in range(2000))


def test_callbacks_whose_names_look_alike_keep_their_files_apart(tmp_path: Path) -> None:
    extra = """
[[inbound]]
kind = "everything"
pattern = "*.csv"
event = "unsubscribe"
columns = { email = "email" }

[[callback]]
name = "mc"
format = "mailchimp"
secret_env = "X"

[[callback]]
name = "mc_eu"
format = "mailchimp"
secret_env = "X"
list_code = "offers"
"""
    path = tmp_path / "p.toml"
    path.write_text(profile_text(tmp_path, "sqlite:///x.sqlite", transport=local_transport(tmp_path), extra=extra))
    collector = Collector(load_profile(path), clock=None)  # type: ignore[arg-type]
    assert collector.kind_for("callback_mc.20261130T120000.csv").kind == "callback_mc"  # type: ignore[union-attr]
    assert collector.kind_for("callback_mc_eu.20261130T120000.csv").kind == "callback_mc_eu"  # type: ignore[union-attr]
    assert collector.kind_for("other.csv").kind == "everything"  # type: ignore[union-attr]


def test_a_form_callback_sent_by_get_is_a_delivery_and_a_listless_subscribe_changes_nothing() -> None:
    config = CallbackConfig.model_validate(
        {"name": "get", "format": "form", "secret_env": "X", "event": "unsubscribe",
         "fields": {"email": "eml", "list_id": "idl"}}
    )  # fmt: skip
    [row] = read_call(config, Call("GET", b"", {"eml": "a@example.com", "idl": "1", "key": "s"}), NOW)
    assert (row.email, row.list_id, row.event) == ("a@example.com", "1", "unsubscribe")
    mailup = CallbackConfig.model_validate({"name": "mu", "format": "mailup", "secret_env": "X"})
    subscribe = {"customerEmail": "a@example.com", "eventType": "SUBSCRIBE"}
    assert read_call(mailup, Call("GET", b"", subscribe), NOW) == []  # would clear every list's opt-outs
    listed = read_call(mailup, Call("GET", b"", {**subscribe, "customerList": "1"}), NOW)
    assert [row.event for row in listed] == ["subscribe"]


def test_aiohttp_s_own_error_lines_are_redacted() -> None:
    line = "GET /hooks/p/mailup/TOKEN-1?customerEmail=a@b.c&key=SECRET-2\x01 HTTP/1.1"
    record = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Error handling request: %r", (line,), None)
    _Redact().filter(record)
    message = record.getMessage()
    assert "TOKEN-1" not in message and "SECRET-2" not in message and "a@b.c" not in message
    assert "/hooks/p/mailup/***" in message


def test_a_callback_s_change_can_be_reverted(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'crm.sqlite'}"
    profile = tmp_path / "mailup.toml"
    profile.write_text(profile_text(tmp_path, db_url, transport=local_transport(tmp_path), extra=CALLBACKS))
    prepare_crm(profile)
    cut = tmp_path / "callback_mailchimp.20261130T120000.csv"
    cut.write_text("email,list_id,at,event,new_email,note\r\nbob@example.com,1,2026-11-30T11:00:00,unsubscribe,,x\r\n")
    os.environ.update(SECRETS)
    assert main(["import", "-p", str(profile), "--file", str(cut)]) == 0
    engine = make_engine(db_url)
    assert status_of(engine, 2, "newsletter") == "unsubscribed"
    assert main(["revert", cut.name, "-p", str(profile)]) == 0
    assert status_of(engine, 2, "newsletter") == "subscribed"  # a callback's change is undone as a provider's
