"""Shared fixtures: real peers on loopback (PostgreSQL via initdb + pg_ctl, pyftpdlib), SQLite files, profiles."""

from __future__ import annotations

import email
import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import Engine, text

from batchsync.clock import ManualClock
from batchsync.config import Profile, load_profile
from batchsync.db.mapping import CANONICAL, crm_tables_for, open_engine
from batchsync.db.schema import make_engine
from batchsync.dbconfig import CRM_TABLES, DatabaseConfig
from batchsync.ftpserver import LoopbackFtpServer
from batchsync.transport import Transport
from batchsync.transport.ftp import FtpTransport
from batchsync.transport.sftp import SftpTransport

from .peers import (
    PASSPHRASE,
    Certificates,
    SshServer,
    Vsftpd,
    free_port,
    give_to,
    make_certificates,
    start_sshd,
    start_vsftpd,
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A CLI test points the root logger at the runner's own stderr, closed when the test ends: put the
    logger back, so later tests do not log into a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


ROOT = Path(__file__).resolve().parents[1]
FTP_PASSWORD_ENV = "BATCHSYNC_TEST_FTP_PASSWORD"


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found: install PostgreSQL (scripts/test does)")
    return found


def _as_postgres_user(command: list[str]) -> list[str]:
    """initdb refuses root: as root, run the server as 'nobody'."""
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A real PostgreSQL cluster in a temporary folder (initdb + pg_ctl, as 'nobody' when root), on a free
    loopback port, that a test may stop and start again."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="batchsync-pg-"))
        self.data = self.folder / "data"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "nobody")
            self.folder.chmod(0o700)
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        initdb = [_pg_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        subprocess.run(_as_postgres_user([*initdb, "--locale=C.UTF-8"]), check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off -c full_page_writes=off"
        command = [_pg_binary("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log")]
        subprocess.run(_as_postgres_user([*command, "-w", "start"]), check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        command = [_pg_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
        subprocess.run(_as_postgres_user(command), capture_output=True)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A real PostgreSQL shared by the session's tests; yields its base URL."""
    server = PostgresServer()
    server.start()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def own_pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop and start."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


_db_counter = iter(range(1_000_000))
BACKENDS = ["sqlite", "postgresql"]
# A module that overrides ``db_url`` with these params runs its scenarios a third time, on the CRM of one's own of
# samples/mapped_crm: batchsync mapped onto PostgreSQL views with INSTEAD OF triggers (see backend_url).
WITH_MAPPED_CRM = [*BACKENDS, "mapped-postgresql"]
MAPPED_CRM = ROOT / "samples" / "mapped_crm"
_mapped_urls: dict[str, dict[str, Any]] = {}  # database URL -> the [database] keys that map it


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty CRM database: a SQLite file, or a new database on the real PostgreSQL."""
    return backend_url(request, tmp_path)


def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database of the backend ``request.param``. For ``mapped-postgresql``, a database holding the example's
    CRM (samples/mapped_crm/postgresql.sql) and no canonical CRM table; every profile and engine the tests make
    on it (mailup_profile, crm_engine, usercli) maps the CRM tables as samples/mapped_crm/profile.toml does.

    The scenarios' own statements on ``db.schema``'s Table objects (``update(contacts)`` in a test) go to the
    mapped views too: in the test module, those names are swapped for the profile's mapped Tables, which name
    the views with their schema (crmdata's helpers ask the engine). Nothing is put on the search path, so
    batchsync itself cannot reach a CRM table by its canonical name: a statement it failed to map fails."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crm.sqlite'}"
    if request.param == "postgresql":
        return make_database(request.getfixturevalue("pg_server"))
    # A scenario marked canonical_crm is never collected here (pytest_collection_modifyitems), so never skipped.
    assert request.node.get_closest_marker("canonical_crm") is None, "a canonical_crm scenario on the mapped CRM"
    url = make_mapped_database(request.getfixturevalue("pg_server"))
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    mapped = crm_tables_for(DatabaseConfig.model_validate(database_keys(url)))
    for name in CRM_TABLES:
        if getattr(request.module, name, None) is CANONICAL.table(name):
            monkeypatch.setattr(request.module, name, mapped.table(name))
    return url


def mapped_crm_keys() -> dict[str, Any]:
    """The [database] keys of samples/mapped_crm/profile.toml that map batchsync onto the example's views."""
    keys = tomllib.loads((MAPPED_CRM / "profile.toml").read_text(encoding="utf-8"))["database"]
    return {key: value for key, value in keys.items() if key in ("schema", "tables")}


def make_mapped_database(base: str) -> str:
    """A new database holding the example CRM of samples/mapped_crm, loaded as its header says (psql)."""
    url = make_database(base)
    load = [_pg_binary("psql"), "-v", "ON_ERROR_STOP=1", "-q", "-d", url, "-f", str(MAPPED_CRM / "postgresql.sql")]
    subprocess.run(load, check=True, capture_output=True)
    _mapped_urls[url] = mapped_crm_keys()
    return url


def database_keys(db_url: str) -> dict[str, Any]:
    """A profile's [database] for a test database: its URL, and its mapping when it holds the example CRM."""
    return {"url": db_url, **_mapped_urls.get(db_url, {})}


def crm_engine(db_url: str) -> Engine:
    """An engine on a test database, carrying its mapping when it holds the example CRM (as a profile's)."""
    return open_engine(db_url, DatabaseConfig.model_validate(database_keys(db_url)))


def make_database(base: str) -> str:
    """A new, empty database on the test PostgreSQL server; its URL."""
    name = f"crm_{os.getpid()}_{next(_db_counter)}"
    admin = make_engine(f"{base}/postgres").execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{base}/{name}"


@pytest.fixture
def clock() -> ManualClock:
    """A settable clock, a day ahead of the file system's time so that new files count as old enough."""
    return ManualClock(datetime.now(UTC).replace(microsecond=0) + timedelta(days=1))


@pytest.fixture
def ftp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackFtpServer]:
    monkeypatch.setenv(FTP_PASSWORD_ENV, "s3cret-ftp-password")
    with LoopbackFtpServer(tmp_path / "provider", "provider", "s3cret-ftp-password") as server:
        yield server


def local_transport(tmp_path: Path) -> dict[str, Any]:
    return {"kind": "local", "path": str(tmp_path / "provider")}


def ftp_transport(server: LoopbackFtpServer) -> dict[str, Any]:
    return {
        "kind": "ftp",
        "host": "127.0.0.1",
        "port": server.port,
        "user": "provider",
        "password_env": FTP_PASSWORD_ENV,
        "retries": 1,
        "timeout_seconds": 10,
    }


def mailup_profile(tmp_path: Path, db_url: str, transport: dict[str, Any] | None = None, **overrides: Any) -> Profile:
    """The shipped MailUp profile, pointed at a test database, work folder and provider."""
    values: dict[str, Any] = {
        "database": database_keys(db_url),
        "work.dir": str(tmp_path / "work"),
        "transport": transport or local_transport(tmp_path),
    }
    values.update(overrides)
    return with_remote_inboxes(load_profile(ROOT / "profiles" / "mailup.toml", overrides=values), tmp_path / "provider")


def with_remote_inboxes(profile: Profile, root: Path, user: str | None = None) -> Profile:
    """Make the profile's remote inbox folders under the provider's root, as a provider's account has them
    (batchsync never makes an inbox folder: a missing one is an error)."""
    for entry in profile.inbound:
        if entry.remote_dir is not None:
            folder = root / entry.remote_dir
            folder.mkdir(parents=True, exist_ok=True)
            if user is not None:
                give_to(folder, user)
    return profile


@pytest.fixture(scope="session")
def peers_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="batchsync-peers-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd(peers_dir: Path) -> Iterator[SshServer]:
    """OpenSSH's sshd on loopback, with its own host key and the test's authorized keys."""
    server = start_sshd(peers_dir / "ssh")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vsftpd(peers_dir: Path) -> Iterator[Vsftpd]:
    """vsftpd requiring explicit TLS on both channels and TLS session reuse."""
    server = start_vsftpd(peers_dir / "vsftpd")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def certificates(peers_dir: Path) -> Certificates:
    return make_certificates(peers_dir / "tls")


def own_folder(root: Path, user: str | None = None) -> Path:
    """A fresh folder under a shared server's root, owned by its login user."""
    folder = root / uuid.uuid4().hex
    folder.mkdir()
    if user is not None:
        give_to(folder, user)
    return folder


def cut_connection(transport: Transport) -> None:
    """Cut an FTP, FTPS or SFTP transport's connection under it, as a reset network does: its next operation
    fails (a retryable error), and the one after that connects again."""
    transport.connect()
    if isinstance(transport, FtpTransport):
        live = transport._ftp.sock  # type: ignore[union-attr]
    elif isinstance(transport, SftpTransport):
        live = transport._ssh.sock  # type: ignore[union-attr]
    else:
        raise TypeError(f"{transport!r} has no connection to cut")
    live.shutdown(socket.SHUT_RDWR)


def sftp_transport(server: SshServer, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("BATCHSYNC_TEST_KEY_PASSPHRASE", PASSPHRASE)
    return {
        "kind": "sftp",
        "host": "127.0.0.1",
        "port": server.port,
        "user": server.user,
        "known_hosts": str(server.known_hosts),
        "key_file": str(server.keys["encrypted"]),
        "key_passphrase_env": "BATCHSYNC_TEST_KEY_PASSPHRASE",
        "path": str(folder),
        "retries": 1,
        "timeout_seconds": 10,
    }


def vsftpd_transport(server: Vsftpd, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("BATCHSYNC_TEST_VSFTPD_PASSWORD", server.password)
    return {
        "kind": "ftps",
        "host": "127.0.0.1",
        "port": server.port,
        "user": server.user,
        "password_env": "BATCHSYNC_TEST_VSFTPD_PASSWORD",
        "ca_file": str(server.certificates.ca),
        "path": str(folder),
        "retries": 1,
        "timeout_seconds": 10,
    }


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    """A real SMTP server on loopback (aiosmtpd): its mailbox and port."""
    mailbox, port = Inbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def notify_section(port: int) -> str:
    return (
        f'\n[notify]\nemail_to = ["crm-admin@example.com"]\nemail_from = "batchsync@example.com"\n'
        f'smtp_host = "127.0.0.1"\nsmtp_port = {port}\n'
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A scenario marked ``canonical_crm`` does not apply to the mapped CRM: it is not collected there (rather than
    skipped, so that a skip in CI always means something is missing)."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        mapped = "mapped-postgresql" in params.values()
        (drop if mapped and item.get_closest_marker("canonical_crm") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
