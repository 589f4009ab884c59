"""Collect: find complete, new inbound files in the remote inbox and the local inbox, and stage them locally.

A file is staged under ``staging/<origin>/<kind>/NAME``: the folders say who reported it (``provider``: the
provider's own reports, collected from its remote inbox; ``admin``: a CRM-side change, dropped into the local
inbox or named with ``import --file``) and which inbound kind it is, so a file left there by a crash is picked up
again on the next run as what it was. Remote names are checked before anything is done with them, and a file
younger than the profile's minimum age is left for the next look (it may still be being written)::

    collector = Collector(profile, clock)
    report = CollectReport()
    collector.from_local_inbox(report)
    collector.from_remote(transport, report)
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Literal

from batchsync.clock import Clock
from batchsync.config import InboundConfig, Profile
from batchsync.errors import ConfigError, RemoteFolderMissing, UnsafeRemoteName
from batchsync.transport import RemoteEntry, RetryPolicy, Transport, check_remote_name
from batchsync.workdir import WorkDir, move_unique, unique_path, write_whole

log = logging.getLogger(__name__)
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".filepart")
Origin = Literal["provider", "admin", "callback"]
ORIGINS: tuple[Origin, ...] = ("provider", "admin", "callback")
REPORTED: frozenset[str] = frozenset({"provider", "callback"})  # the provider's reports: remembered, not echoed


@dataclass
class StagedFile:
    """An inbound file copied into staging, with its kind, where it came from and whose report it is."""

    path: Path
    name: str
    kind: InboundConfig
    location: str  # where it came from: remote:PATH, inbox:NAME, file:PATH, or a zip's location!MEMBER
    origin: Origin  # who reported its events (see the module docstring)
    remote_path: str | None = None
    origin_given: bool = False  # said by a person (import --origin), not by the kind or the file's place


@dataclass
class CollectReport:
    """What a collection found: files staged, names refused (with why), and files left to wait for the next look."""

    staged: list[StagedFile] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


class Collector:
    """Finds complete inbound files (remote inbox, local inbox, named files, zip members) and stages them; after a file
    is applied, moves or deletes its remote original."""

    def __init__(self, profile: Profile, clock: Clock, *, dry_run: bool = False) -> None:
        self.profile, self.clock, self.dry_run = profile, clock, dry_run
        self.retry = RetryPolicy.of(profile.transport, clock)
        self.work = WorkDir.of(profile)
        self.staging = self.work.dry_run / "staging" if dry_run else self.work.staging

    def kind_for(self, name: str, kind: str | None = None) -> InboundConfig | None:
        if kind is not None:
            for entry in self.profile.inbound:
                if entry.kind == kind:
                    return entry
            known = ", ".join(entry.kind for entry in self.profile.inbound) or "none"
            raise ConfigError(f"profile {self.profile.name} has no inbound kind {kind!r} (it has: {known})")
        for entry in self.profile.inbound:
            if entry.matches(name):
                return entry
        return None

    def origin_of(self, entry: InboundConfig, by_place: Origin) -> Origin:
        """The kind's own origin where the profile sets one, else the one its place gives."""
        return entry.origin or by_place

    def left_in_staging(self) -> list[StagedFile]:
        """Files a crashed run staged but did not finish; processing them again is safe (the ledger). A file an
        older version left in ``staging/<kind>/`` was taken as the provider's, as that version took every file."""
        found = []
        for entry in self.profile.inbound:
            folders: list[tuple[Path, Origin]] = [
                (self.work.staging / origin / entry.kind, origin) for origin in ORIGINS
            ]
            folders.append((self.work.staging / entry.kind, "provider"))
            for folder, origin in folders:
                if self.dry_run or not folder.is_dir():
                    continue
                for path in sorted(folder.iterdir()):
                    if path.is_file() and not path.name.endswith(".part") and not path.name.startswith("."):
                        found.append(StagedFile(path, path.name, entry, f"staging:{path.name}", origin))
        return found

    def resolve(self, paths: Sequence[Path], kind: str | None = None) -> list[tuple[Path, InboundConfig]]:
        """The inbound kind of each named file (``import --file``), all checked before any is staged."""
        resolved = []
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"{path}: no such file")
            entry = self.kind_for(path.name, kind)
            if entry is None:
                raise ConfigError(f"{path.name} matches no inbound pattern of profile {self.profile.name}; use --kind")
            resolved.append((path, entry))
        return resolved

    def from_path(self, path: Path, entry: InboundConfig, origin: Origin | None = None) -> StagedFile:
        """Stage a copy of one named file (``import --file``); the original is left where it is. Its origin is
        ``origin`` where given (``--origin``), else the kind's, else an admin's."""
        chosen = origin or self.origin_of(entry, "admin")
        target = self._stage_path(entry, path.name, chosen)
        write_whole(target, partial(shutil.copyfile, path))
        return StagedFile(target, path.name, entry, f"file:{path.resolve()}", chosen, origin_given=origin is not None)

    def from_local_inbox(self, report: CollectReport, ready: Collection[str] = (), busy: Collection[str] = ()) -> None:
        """Stage inbox files; a name in ``ready`` (its writer closed it) skips the minimum age, a name in
        ``busy`` (still open somewhere) waits whatever its age."""
        inbox = self.work.inbox
        if not inbox.is_dir():
            return
        for path in sorted(inbox.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.name.endswith(IGNORED_SUFFIXES):
                continue
            if path.name in busy and path.name not in ready:
                report.waiting.append(f"inbox/{path.name}")
                continue
            entry = self.kind_for(path.name)
            mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            min_age = entry.min_age_seconds if entry else self._min_age()
            if path.name not in ready and not self._old_enough(mtime, min_age):
                report.waiting.append(f"inbox/{path.name}")
                continue
            if entry is None:
                if not self.dry_run:
                    self.work.quarantine_file(path, path.name, "the name matches no inbound pattern of the profile")
                report.refused.append(f"inbox/{path.name}: matches no inbound pattern")
                continue
            origin = self.origin_of(entry, "admin")
            target = self._stage_path(entry, path.name, origin)
            if self.dry_run:
                shutil.copyfile(path, target)
            else:
                _take(path, target)
            report.staged.append(StagedFile(target, path.name, entry, f"inbox:{path.name}", origin))

    def expand(self, staged: StagedFile, report: CollectReport) -> list[StagedFile]:
        """Stage the members of a zip as files of the kinds their names match; the zip goes to the archive.

        Member names are data, not paths: only the last part of each is used, and names with control
        characters are refused. A zip that cannot be read, or whose members hold more than the profile's file
        size limit in all (a zip bomb), goes to quarantine with nothing of it staged: extraction stops at the
        limit, whatever sizes the zip's directory claims.
        """
        members: list[StagedFile] = []
        budget = _Budget(self.profile.work.max_file_bytes)
        try:
            with zipfile.ZipFile(staged.path) as archive:
                for info in archive.infolist():
                    member = self._stage_member(archive, info, staged, report, budget)
                    if member is not None:
                        members.append(member)
        except (zipfile.BadZipFile, OSError, EOFError, _OverLimit) as exc:
            for member in members:
                member.path.unlink(missing_ok=True)
            problem = str(exc) if isinstance(exc, _OverLimit) else f"not a readable zip: {exc}"
            if not self.dry_run:
                self.work.quarantine_file(staged.path, staged.name, f"{staged.location}: {problem}")
            report.refused.append(f"{staged.name}: {problem}")
            return []
        if not self.dry_run:
            move_unique(staged.path, self.work.archive, staged.name)
        return members

    def _stage_member(
        self,
        archive: zipfile.ZipFile,
        info: zipfile.ZipInfo,
        staged: StagedFile,
        report: CollectReport,
        budget: _Budget,
    ) -> StagedFile | None:
        if info.is_dir():
            return None
        name = PurePosixPath(info.filename.replace("\\", "/")).name
        try:
            check_remote_name(name)
        except UnsafeRemoteName as exc:
            report.refused.append(f"{staged.name}: {exc}")
            return None
        kinds = [entry for entry in self.profile.inbound if not entry.unzip]
        entry = next((kind for kind in kinds if kind.matches(name)), None)
        if entry is None:
            report.refused.append(f"{staged.name}: member {name} matches no inbound pattern")
            return None
        origin = entry.origin or staged.origin
        target = self._stage_path(entry, f"{Path(staged.name).stem}__{name}", origin)

        def extract(part: Path) -> None:
            with archive.open(info) as source, part.open("wb") as sink:
                while block := source.read(1 << 20):
                    budget.take(len(block), staged.name, name)
                    sink.write(block)

        write_whole(target, extract)
        return StagedFile(target, target.name, entry, f"{staged.location}!{name}", origin)

    def from_remote(self, transport: Transport, report: CollectReport) -> None:
        """Download the remote files that are complete: matched, old enough, and either settled (the same size
        and time on a second look ``settle_seconds`` later) or announced by their marker file. A remote inbox
        folder that does not exist is a configuration error: a mistyped folder would stop every opt-out."""
        for entry in self.profile.inbound:
            if entry.remote_dir is None:
                continue
            try:
                listing = self._list(transport, entry.remote_dir)
            except RemoteFolderMissing:
                raise ConfigError(
                    f"profile {self.profile.name}: inbound {entry.kind}: the remote folder {entry.remote_dir!r} "
                    "does not exist on the server; check inbound.remote_dir (nothing was collected from it)"
                ) from None
            candidates = self._candidates(entry, listing, report)
            if entry.marker:
                names = {remote.name for remote in listing}
                ready = [remote for remote in candidates if remote.name + entry.marker in names]
            else:
                ready = self._settled(transport, entry, candidates)
            for remote in candidates:
                if remote not in ready:
                    report.waiting.append(f"{entry.remote_dir}/{remote.name}")
            report.staged += [self._download(transport, entry, remote.name) for remote in ready]

    def _list(self, transport: Transport, folder: str) -> list[RemoteEntry]:
        return self.retry.call(partial(transport.list, folder), what=f"listing {folder}")

    def _candidates(self, entry: InboundConfig, listing: list[RemoteEntry], report: CollectReport) -> list[RemoteEntry]:
        found = []
        for remote in listing:
            problem = remote.problem
            if problem is None:
                try:
                    check_remote_name(remote.name)
                except UnsafeRemoteName as exc:
                    problem = str(exc)
            if problem is not None:
                log.warning("%s: %s", entry.remote_dir, problem)
                report.refused.append(f"{entry.remote_dir}: {problem}")
            elif not entry.matches(remote.name):
                continue
            elif remote.mtime is not None and not self._old_enough(remote.mtime, entry.min_age_seconds):
                report.waiting.append(f"{entry.remote_dir}/{remote.name}")
            else:
                found.append(remote)
        return found

    def _settled(self, transport: Transport, entry: InboundConfig, candidates: list[RemoteEntry]) -> list[RemoteEntry]:
        if not candidates or transport.lists_whole_files:
            return candidates
        self.clock.sleep(entry.settle_seconds)
        again = {remote.name: remote for remote in self._list(transport, entry.remote_dir or "")}
        return [remote for remote in candidates if again.get(remote.name) == remote]

    def finish_remote(self, transport: Transport, staged: StagedFile) -> None:
        """After the reconcile committed: move the remote file to ``processed/`` or delete it."""
        if staged.remote_path is None or self.dry_run:
            return
        remote = staged.remote_path
        if staged.kind.after_import == "delete":
            self.retry.call(partial(transport.delete, remote), what=f"removing {remote}")
        else:
            folder = posixpath.join(posixpath.dirname(remote), staged.kind.processed_dir)
            target = posixpath.join(folder, f"{self.clock.now():%Y%m%dT%H%M%S}_{staged.name}")
            self.retry.call(partial(transport.rename, remote, target), what=f"moving {remote} to {folder}")
        if staged.kind.marker:
            marker = remote + staged.kind.marker
            self.retry.call(partial(transport.delete, marker), what=f"removing {marker}")

    def _download(self, transport: Transport, entry: InboundConfig, name: str) -> StagedFile:
        remote_path = posixpath.join(entry.remote_dir or "", name)
        origin = self.origin_of(entry, "provider")
        target = self._stage_path(entry, name, origin)
        write_whole(
            target,
            lambda part: self.retry.call(
                partial(transport.download, remote_path, part), what=f"download of {remote_path}"
            ),
        )
        return StagedFile(target, name, entry, f"remote:{remote_path}", origin, remote_path)

    def _stage_path(self, entry: InboundConfig, name: str, origin: Origin) -> Path:
        folder = self.staging / origin / entry.kind
        folder.mkdir(parents=True, exist_ok=True)
        return unique_path(folder, name)

    def _old_enough(self, mtime: datetime, min_age_seconds: float) -> bool:
        return self.clock.now() - mtime >= timedelta(seconds=min_age_seconds)

    def _min_age(self) -> float:
        return min((entry.min_age_seconds for entry in self.profile.inbound), default=0.0)


class _OverLimit(Exception):
    """A zip's members hold more than the file size limit."""


class _Budget:
    """The bytes a zip's members may still hold."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit

    def take(self, count: int, archive: str, member: str) -> None:
        self.left -= count
        if self.left < 0:
            raise _OverLimit(
                f"its members hold more than the limit of {self.limit} bytes (extraction stopped in {member}): "
                "nothing of it applied"
            )


def _take(path: Path, target: Path) -> None:
    """Move a file into staging; across file systems (an inbox on its own volume), copy it whole under a
    temporary name first, so that staging never holds half a file."""
    try:
        os.replace(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        write_whole(target, partial(shutil.copyfile, path))
        path.unlink()
