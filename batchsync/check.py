"""``batchsync check``: is this profile ready to run? One result per check, each with how to fix a fault::

    for result in run_checks(profile):
        print(result.ok, result.name, result.detail)

Checks the CRM database and its tables, the server (it answers, its host key or certificate is trusted, the
login works), and that every remote and local folder can be listed and written: a probe file is written and
removed again. A provider reached through its API is asked instead whether it accepts the credentials, knows
every list id and has every mapped field. The server is asked under the profile's retry policy, as an export or
import would ask it: a failure a run would get past by trying again does not fail the check.
"""

from __future__ import annotations

import posixpath
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.db.mapping import mapped_problems, missing_tables, open_engine
from batchsync.errors import BatchsyncError, RemoteFolderMissing
from batchsync.export import remote_folder
from batchsync.transport import RetryPolicy, Transport, open_transport
from batchsync.transport.api import ApiTransport
from batchsync.workdir import WorkDir

PROBE = b"batchsync check\n"


@dataclass(frozen=True)
class CheckResult:
    """One line of ``batchsync check``: what was checked, whether it passed, and the fault with its fix."""

    name: str
    ok: bool
    detail: str


def run_checks(
    profile: Profile,
    transport_factory: Callable[[Profile], Transport] = open_transport,
    clock: Clock | None = None,
) -> list[CheckResult]:
    """Every check of the profile, in order; the remote ones wait on ``clock`` between tries."""
    clock = clock or Clock()
    results = [CheckResult("profile", True, f"{profile.name} is valid")]
    results += _database(profile)
    results += _local_folders(profile)
    try:
        transport = transport_factory(profile)
    except BatchsyncError as exc:
        return [*results, CheckResult("server", False, str(exc))]
    try:
        results += _server(profile, _Remote(transport, RetryPolicy.of(profile.transport, clock)), clock)
    finally:
        transport.close()
    return results


def _database(profile: Profile) -> Iterator[CheckResult]:
    try:
        engine = open_engine(profile.database_url(), profile.database)
        misfits = [str(problem) for problem in mapped_problems(engine)]
        missing = missing_tables(engine)
        engine.dispose()
    except BatchsyncError as exc:
        yield CheckResult("database", False, f"{exc}; check database.url or the variable it names")
        return
    if misfits:
        # Tables the profile maps onto the CRM's own: init never makes them, so it is no advice there.
        advice = "fix the table or view, or database.schema / database.tables"
        yield CheckResult("database", False, f"{'; '.join(misfits)}: {advice}")
    own = [name for name in missing if name not in misfits]
    if own:
        yield CheckResult("database", False, f"tables missing ({', '.join(own)}): run batchsync init")
    if not missing:
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


@dataclass(frozen=True)
class _Remote:
    """The server being checked, and the retry policy every question to it goes through."""

    transport: Transport
    retry: RetryPolicy


def _server(profile: Profile, remote: _Remote, clock: Clock) -> Iterator[CheckResult]:
    if isinstance(remote.transport, ApiTransport):
        for finding in remote.transport.check():
            yield CheckResult(finding.name, finding.ok, finding.detail)
        return
    config = profile.transport
    where = config.path or "." if config.kind == "local" else f"{config.kind}://{config.host}:{config.port_or_default}"
    try:
        remote.retry.call(partial(remote.transport.list, "."), what=f"listing the root of {where}")
    except BatchsyncError as exc:
        yield CheckResult(f"server {where}", False, str(exc))
        return
    yield CheckResult(f"server {where}", True, "answers; host key or certificate trusted; login accepted")
    for folder in dict.fromkeys(remote_folder(profile, code, clock.now()) for code in profile.lists):
        yield _probe(remote, folder, create=True)
    for entry in profile.inbound:
        if entry.remote_dir is not None:
            yield _probe(remote, entry.remote_dir, create=False, kind=entry.kind)
            yield _processed(remote, posixpath.join(entry.remote_dir, entry.processed_dir))
    if profile.provider == "mailup":
        yield CheckResult("note", True, MAILUP_NOTE)


MAILUP_NOTE = (
    "MailUp applies optout 0 (unsubscribed) to recipients it already has only when the account's (S)FTP import "
    "datasync is set to update subscription statuses; by default it leaves existing statuses as they are. Ask "
    "MailUp to set it, or tombstones and CRM opt-outs change nothing there"
)


def _probe(remote: _Remote, folder: str, *, create: bool, kind: str | None = None) -> CheckResult:
    """List the folder, then write, size and remove a probe file in it. An export folder is made by the first
    upload anyway (``create``); an inbound folder must already be there: a mistyped one would stop every
    opt-out, so it is reported, never made."""
    probe = posixpath.join(folder, f".batchsync-probe-{secrets.token_hex(4)}")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "probe"
        local.write_bytes(PROBE)
        try:
            # Tried again as a whole: a probe cut after its upload is written again under the same name.
            written = remote.retry.call(
                partial(_write_size_remove, remote.transport, local, probe, list_first=not create),
                what=f"the probe of {folder}/",
            )
        except RemoteFolderMissing:
            return CheckResult(
                f"remote {folder}/",
                False,
                f"the inbound folder of kind {kind} does not exist on the server: check inbound.remote_dir "
                "(check never creates it)",
            )
        except BatchsyncError as exc:
            return CheckResult(f"remote {folder}/", False, f"{exc}: give the account list and write rights there")
    if written != len(PROBE):
        return CheckResult(f"remote {folder}/", False, "the probe file arrived truncated")
    return CheckResult(f"remote {folder}/", True, "listed, written and cleaned up")


def _write_size_remove(transport: Transport, local: Path, probe: str, *, list_first: bool) -> int:
    """Write ``local`` as ``probe``, ask its size, remove it and list its folder again; returns the size the
    server gave. ``list_first``: list the folder before writing (a missing one is then reported as missing)."""
    folder = posixpath.dirname(probe)
    if list_first:
        transport.list(folder)
    transport.upload(local, probe)
    written = transport.size(probe)
    transport.delete(probe)
    transport.list(folder)
    return written


def _processed(remote: _Remote, folder: str) -> CheckResult:
    """Where taken files are moved: probed when it exists; otherwise the first move makes it, in the inbound
    folder probed just before."""
    try:
        remote.retry.call(partial(remote.transport.list, folder), what=f"listing {folder}")
    except RemoteFolderMissing:
        return CheckResult(f"remote {folder}/", True, "not there yet: the first file taken is moved into it")
    except BatchsyncError as exc:
        return CheckResult(f"remote {folder}/", False, f"{exc}: give the account list and write rights there")
    return _probe(remote, folder, create=False)
