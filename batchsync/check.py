"""``batchsync check``: is this profile ready to run? One result per check, each with how to fix a fault::

    for result in run_checks(profile):
        print(result.ok, result.name, result.detail)

Checks the CRM database and its tables, the server (it answers, its host key or certificate is trusted, the
login works), and that every remote and local folder can be listed and written: a probe file is written and
removed again.
"""

from __future__ import annotations

import posixpath
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.db.schema import make_engine, missing_tables
from batchsync.errors import BatchsyncError
from batchsync.export import remote_folder
from batchsync.transport import Transport, open_transport
from batchsync.workdir import WorkDir

PROBE = b"batchsync check\n"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def run_checks(
    profile: Profile, transport_factory: Callable[[Profile], Transport] = open_transport
) -> list[CheckResult]:
    results = [CheckResult("profile", True, f"{profile.name} is valid")]
    results += _database(profile)
    results += _local_folders(profile)
    try:
        transport = transport_factory(profile)
    except BatchsyncError as exc:
        return [*results, CheckResult("server", False, str(exc))]
    try:
        results += _server(profile, transport)
    finally:
        transport.close()
    return results


def _database(profile: Profile) -> Iterator[CheckResult]:
    try:
        engine = make_engine(profile.database_url())
        missing = missing_tables(engine)
        engine.dispose()
    except BatchsyncError as exc:
        yield CheckResult("database", False, f"{exc}; check database.url or the variable it names")
        return
    if missing:
        yield CheckResult("database", False, f"tables missing ({', '.join(missing)}): run batchsync init")
    else:
        yield CheckResult("database", True, "reachable, every table present")


def _local_folders(profile: Profile) -> Iterator[CheckResult]:
    work = WorkDir.of(profile)
    for folder in (work.inbox, work.staging, work.archive, work.quarantine, work.outbox, work.sent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".batchsync-probe-"):
                pass
            yield CheckResult(f"local {folder}", True, "writable")
        except OSError as exc:
            yield CheckResult(f"local {folder}", False, f"{exc.strerror}: make it writable for this user")


def _server(profile: Profile, transport: Transport) -> Iterator[CheckResult]:
    config = profile.transport
    where = config.path or "." if config.kind == "local" else f"{config.kind}://{config.host}:{config.port_or_default}"
    try:
        transport.list(".")
    except BatchsyncError as exc:
        yield CheckResult(f"server {where}", False, str(exc))
        return
    yield CheckResult(f"server {where}", True, "answers; host key or certificate trusted; login accepted")
    folders = [remote_folder(profile, code, Clock().now()) for code in profile.lists]
    for entry in profile.inbound:
        if entry.remote_dir is not None:
            folders += [entry.remote_dir, posixpath.join(entry.remote_dir, entry.processed_dir)]
    for folder in dict.fromkeys(folders):
        yield _probe(transport, folder)


def _probe(transport: Transport, folder: str) -> CheckResult:
    """List the folder, then write, size and remove a probe file in it."""
    probe = posixpath.join(folder, f".batchsync-probe-{secrets.token_hex(4)}")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "probe"
        local.write_bytes(PROBE)
        try:
            transport.list(folder)
            transport.upload(local, probe)
            written = transport.size(probe)
            transport.delete(probe)
        except BatchsyncError as exc:
            return CheckResult(f"remote {folder}/", False, f"{exc}: give the account list and write rights there")
    if written != len(PROBE):
        return CheckResult(f"remote {folder}/", False, "the probe file arrived truncated")
    return CheckResult(f"remote {folder}/", True, "listed, written and cleaned up")
