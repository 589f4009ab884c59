"""What is Acoustic's own in the acoustic transport, against OpenSSH's sshd for the files and the fake Acoustic XML
API and OAuth endpoint (tests/acoustic_server.py), both on one folder as the SFTP account's home: the files and
maps in upload/ and an ImportList each; opt-outs and undeliverables by ExportList in both of Acoustic's export
styles, fetched and removed; check. The scenarios every API transport shares are in tests/test_api_scenarios.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from batchsync.check import run_checks
from batchsync.clock import ManualClock
from batchsync.config import load_profile
from batchsync.sync import Sync
from batchsync.transport import open_transport

from .acoustic_server import STYLE_2017, STYLE_2024, AcousticServer, Column
from .conftest import ROOT, own_folder, sftp_transport
from .crmdata import build_tiny_crm, status_of
from .peers import SshServer, give_to

LIST_ID = "1234567"
# the tiny CRM's subscribed addresses (eve's second contact is unsubscribed: the address goes as opted out)
SUBSCRIBED = {"alice@example.com", "bob@example.com", "dave@example.com", "grace@example.com", "heidi@example.com",
              "ivan@example.com", "judy@example.com"}  # fmt: skip


@pytest.fixture
def home(sshd: SshServer) -> Path:
    return own_folder(sshd.root, sshd.user)


@pytest.fixture
def acoustic(home: Path, clock: ManualClock, sshd: SshServer) -> Iterator[AcousticServer]:
    with AcousticServer(home) as server:
        server.clock = clock.now
        server.job_polls = 2
        for folder in (home / "upload", home / "download"):
            give_to(folder, sshd.user)  # the SFTP account's own folders
        server.add_list(
            int(LIST_ID), "Newsletter", [Column("FIRST_NAME"), Column("LAST_NAME"), Column("OPT_IN_STATUS")]
        )
        yield server


@pytest.fixture
def sync(
    tmp_path: Path, acoustic: AcousticServer, sshd: SshServer, home: Path, clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> Sync:  # fmt: skip
    monkeypatch.setenv("ACOUSTIC_CLIENT_SECRET", acoustic.client_secret)
    monkeypatch.setenv("ACOUSTIC_REFRESH_TOKEN", acoustic.refresh_token)
    files = sftp_transport(sshd, home, monkeypatch)
    profile = load_profile(
        ROOT / "profiles" / "acoustic-api.toml",
        overrides={
            "database": {"url": f"sqlite:///{tmp_path / 'crm.sqlite'}"},
            "work.dir": str(tmp_path / "work"),
            "transport": {
                **files,
                "kind": "acoustic",
                "url": acoustic.base_url,
                "client_id": acoustic.client_id,
                "client_secret_env": "ACOUSTIC_CLIENT_SECRET",
                "refresh_token_env": "ACOUSTIC_REFRESH_TOKEN",
                "poll_seconds": 5,
            },
        },
    )
    sync = Sync(profile, clock=clock, transport_factory=lambda p: open_transport(p, clock))
    sync.init()
    build_tiny_crm(sync.engine)
    return sync


def held(server: AcousticServer) -> dict[str, bool]:
    """Address -> opted out, for every contact of the list."""
    return {email: contact.opted_out for email, contact in server.lists[LIST_ID].contacts.items()}


def test_full_export_is_imported_by_importlist_with_its_opt_outs(
    sync: Sync, acoustic: AcousticServer, home: Path
) -> None:
    result = sync.export("full")

    contacts = held(acoustic)
    assert {email for email, out in contacts.items() if not out} == SUBSCRIBED
    alice = acoustic.contact(int(LIST_ID), "alice@example.com")
    assert alice is not None and alice.fields["FIRST_NAME"] == "Alice"
    assert [op for op in acoustic.api.operations if op == "ImportList"] == ["ImportList", "ImportList"]
    assert result.rejected == 0 and result.api_calls > 0
    assert not list((home / "upload").iterdir())  # imported, then removed: no contact data left on the server
    assert sync.export("diff").rows == 0


@pytest.mark.parametrize("style", [STYLE_2024, STYLE_2017])  # 02/20/2024 09:01 AM, and 10/18/16 08:01 PM
def test_opt_out_and_undeliverable_at_acoustic_come_back_by_exportlist(
    sync: Sync, acoustic: AcousticServer, clock: ManualClock, home: Path, style: str
) -> None:
    acoustic.api.export_style = style
    sync.export("full")
    clock.advance(3600)
    acoustic.opt_out(int(LIST_ID), "bob@example.com", at=clock.now() - timedelta(minutes=5))
    dave = acoustic.contact(int(LIST_ID), "dave@example.com")
    assert dave is not None
    dave.undeliverable, dave.last_modified = True, clock.now() - timedelta(minutes=5)
    clock.advance(60)

    report = sync.run("diff")

    assert status_of(sync.engine, 2, "newsletter") == "unsubscribed"
    assert status_of(sync.engine, 4, "newsletter") == "cleaned"
    assert report is not None and report.exported is not None and report.exported.rows == 0  # not echoed
    assert not [path.name for path in (home / "download").iterdir() if path.suffix == ".csv"]  # fetched, removed
    clock.advance(2 * 86400)
    later = sync.run("diff")  # the next window starts after these: nothing new
    assert later is not None and all(outcome.changed == 0 for outcome in later.imported.files)  # type: ignore[union-attr]


def test_check_reports_the_login_the_list_and_missing_columns(
    sync: Sync, acoustic: AcousticServer, clock: ManualClock
) -> None:
    acoustic.lists[LIST_ID].columns = [Column("FIRST_NAME")]

    found = {result.name: result for result in run_checks(sync.profile, clock=clock)}

    assert found[f"Acoustic API {acoustic.base_url}"].ok
    assert found[f"list {LIST_ID} (lists.newsletter)"].ok
    columns = found[f"columns of list {LIST_ID}"]
    assert not columns.ok and "LAST_NAME" in columns.detail and "OPT_IN_STATUS" in columns.detail
