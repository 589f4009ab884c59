"""An admin at a terminal: the `batchsync` command on a MailUp profile, a provider folder standing in for
MailUp's FTP account, the local inbox, and the CRM to look into afterwards."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, select

from batchsync.cli import main
from batchsync.db.schema import bs_changes, bs_provider_optouts

from .conftest import ROOT, crm_engine, database_keys
from .crmdata import UNSUB_HEADER, build_tiny_crm, read_csv, unsub_row, write_csv

ROME = ZoneInfo("Europe/Rome")
CHANGES_KIND = """
[[inbound]]
kind = "changes"
pattern = "changes*.csv"
remote_dir = "export"
delimiter = ";"
min_age_seconds = 0
settle_seconds = 0
event = "email_change"
columns = { email = "old_email", new_email = "new_email" }
"""


@dataclass
class Done:
    code: int
    out: str
    err: str


def write_profile(tmp_path: Path, db_url: str, *, extra: str = "", policy: str = "") -> Path:
    """profiles/mailup.toml on a test CRM, a local folder as MailUp's account (its export/ folder made, as MailUp
    has it), files taken at once; ``extra`` is appended, ``policy`` goes into [policy]."""
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    database = "\n".join(f"{key} = {_toml(value)}" for key, value in database_keys(db_url).items())
    text = text.replace('url_env = "BATCHSYNC_CRM_URL"', database)
    text = text.replace('dir = "../var/mailup"', f'dir = "{tmp_path}/work"')
    text = text.replace('kind = "ftp"', f'kind = "local"\npath = "{tmp_path}/provider"')
    text = text.replace("min_age_seconds = 120", "min_age_seconds = 0").replace(
        "settle_seconds = 5", "settle_seconds = 0"
    )
    for line in policy.splitlines():  # a policy key given replaces the profile's own
        key = line.split("=")[0].strip()
        text = re.sub(rf"^{key} = .*$", line, text, flags=re.MULTILINE)
    (tmp_path / "provider" / "export").mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mailup-test.toml"
    path.write_text(text + extra, encoding="utf-8")
    return path


class User:
    def __init__(self, tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str], **profile: str) -> None:
        self.tmp_path, self.db_url, self.capsys = tmp_path, db_url, capsys
        self.profile = write_profile(tmp_path, db_url, **profile)
        self.provider = tmp_path / "provider"
        self.inbox = tmp_path / "work" / "inbox"
        self.engine: Engine = crm_engine(db_url)
        self._seen: set[Path] = set()
        self._count = 0

    def close(self) -> None:
        self.engine.dispose()

    def start(self) -> User:
        """init, and the small hand-made CRM of crmdata."""
        assert self.batchsync("init").code == 0
        build_tiny_crm(self.engine)
        return self

    def batchsync(self, *args: str) -> Done:
        self.capsys.readouterr()
        command, *rest = args
        code = main([command, "-p", str(self.profile), *rest])
        captured = self.capsys.readouterr()
        return Done(code, captured.out, captured.err)

    def export(self, *args: str) -> dict[str, dict[str, str]]:
        """Run an export; what it uploaded: per MailUp list id, each address's optout value (an address twice in
        one file fails the test)."""
        done = self.batchsync("export", *args)
        assert done.code == 0, done.out + done.err
        return self.uploaded()

    def uploaded(self) -> dict[str, dict[str, str]]:
        """The files uploaded since the last look, per MailUp list id: address -> optout."""
        found: dict[str, dict[str, str]] = {}
        for path in sorted((self.provider / "import").glob("*/*.csv")):
            if path in self._seen:
                continue
            self._seen.add(path)
            rows = read_csv(path, delimiter="|")
            addresses = [row[0].lower() for row in rows[1:]]
            assert len(addresses) == len(set(addresses)), f"an address twice in {path.name}"
            found.setdefault(path.parent.name, {}).update({row[0].lower(): row[5] for row in rows[1:]})
        return found

    def provider_file(
        self, rows: list[list[str]], *, kind: str = "unsubscribers", header: list[str] = UNSUB_HEADER
    ) -> Path:
        """A file MailUp leaves in its export/ folder."""
        self._count += 1
        return write_csv(self.provider / "export" / f"{kind}_{self._count}.csv", [header, *rows])

    def admin_file(self, rows: list[list[str]], *, kind: str = "unsubscribers") -> Path:
        """A file an admin drops into the local inbox."""
        self._count += 1
        return write_csv(self.inbox / f"{kind}_{self._count}.csv", [UNSUB_HEADER, *rows])

    def provider_optouts(self) -> dict[tuple[str, str], Any]:
        with self.engine.connect() as connection:
            o = bs_provider_optouts.c
            return {(row[0], row[1]): row[2] for row in connection.execute(select(o.list_code, o.email_key, o.at))}

    def origins(self) -> list[tuple[int, str, str, str | None]]:
        with self.engine.connect() as connection:
            c = bs_changes.c
            return [tuple(row) for row in connection.execute(select(c.contact_id, c.list_code, c.new_status, c.origin))]  # type: ignore[misc]


def _toml(value: Any) -> str:
    """A string or a table of strings as TOML (the [database] keys of a test profile)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def mailup_time(moment: datetime) -> str:
    """An OptOut_Date as MailUp writes it: Rome's local time."""
    return moment.astimezone(ROME).strftime("%Y%m%dT%H%M%S")


def opt_out(email: str, hours: float = 2, code: str = "2", list_id: str = "1") -> list[str]:
    """A row of MailUp's unsubscribers file: ``email`` left list ``list_id`` ``hours`` ago."""
    return unsub_row(email, list_id, mailup_time(hours_ago(hours)), code)


def hours_ago(hours: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(hours=hours)
