"""The local folders of one profile: inbox, staging, archive, quarantine, outbox, sent, held, reports, dry-run.

Files are moved between them with ``os.replace`` on one file system, so a file is always whole wherever it is.
A name already taken in the target folder gets a numbered suffix rather than overwriting anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from batchsync.config import Profile

log = logging.getLogger(__name__)


class WorkDir:
    """A profile's local work folders, and moving files between them whole."""

    def __init__(self, root: Path, inbox: Path | None = None) -> None:
        self.root = root
        self.inbox = inbox or root / "inbox"
        self.staging = root / "staging"
        self.archive = root / "archive"
        self.quarantine = root / "quarantine"
        self.outbox = root / "outbox"
        self.sent = root / "sent"
        self.held = root / "held"  # export files the safety stop held back, each with a .reason.txt
        self.reports = root / "reports"  # the latest duplicates and skipped reports of a list nothing was sent for
        self.dry_run = root / "dry-run"

    @classmethod
    def of(cls, profile: Profile) -> WorkDir:
        inbox = profile.path(profile.work.inbox_dir) if profile.work.inbox_dir else None
        return cls(profile.work_dir, inbox)

    def create(self) -> None:
        for folder in (self.inbox, self.staging, self.archive, self.quarantine, self.outbox, self.sent):
            folder.mkdir(parents=True, exist_ok=True)

    def keep_sent(self, files: Iterable[Path]) -> list[Path]:
        """Move sent files and their reports from the outbox into ``sent/``; returns their new paths."""
        return [move_unique(path, self.sent) for path in files if path.exists()]

    def keep_report(self, report: Path, list_code: str) -> Path:
        """A report (``NAME.duplicates.csv``, ``NAME.skipped.csv``) of an export that sent nothing for a list: it
        replaces the list's earlier one in ``reports/`` (every export reports the duplicates again; ``sent/``
        keeps only the reports that went with a file)."""
        self.reports.mkdir(parents=True, exist_ok=True)
        kind = report.name.rsplit(".", 2)[-2]
        target = self.reports / f"{list_code}.{kind}.csv"
        os.replace(report, target)
        return target

    def hold(self, path: Path, reason: str) -> Path:
        """Move an export file the safety stop held back into ``held/``, with a ``.reason.txt`` beside it."""
        kept = move_unique(path, self.held)
        kept.with_name(kept.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
        return kept

    def quarantine_file(self, path: Path, name: str, reason: str) -> Path:
        """Move a file into quarantine with a ``.reason.txt`` beside it."""
        kept = move_unique(path, self.quarantine, name)
        kept.with_name(kept.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")
        return kept

    def clear(self, folder: Path) -> None:
        """Remove every file in ``folder`` (the outbox holds nothing worth keeping between runs)."""
        if folder.is_dir():
            for item in folder.iterdir():
                if item.is_file():
                    item.unlink()

    def prune(self, folder: Path, older_than: datetime) -> int:
        """Remove files in ``folder`` last changed before ``older_than`` (the retention period)."""
        if not folder.is_dir():
            return 0
        removed = 0
        for item in folder.iterdir():
            if item.is_file() and datetime.fromtimestamp(item.stat().st_mtime, UTC) < older_than:
                item.unlink()
                removed += 1
        if removed:
            log.info("removed %d files older than the retention period from %s", removed, folder)
        return removed


def write_whole(target: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a ``.part`` file, then rename it to ``target``: the target is whole or absent."""
    part = target.with_name(target.name + ".part")
    try:
        write(part)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)


def move_unique(path: Path, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = unique_path(folder, name or path.name)
    os.replace(path, target)
    return target


def unique_path(folder: Path, name: str, *, also_in: tuple[Path, ...] = ()) -> Path:
    """``folder/name``, or ``folder/stem-N.ext`` when that name is taken here or in ``also_in``."""
    stem, dot, suffix = name.partition(".")
    candidate, counter = name, 1
    while any((place / candidate).exists() for place in (folder, *also_in)):
        candidate = f"{stem}-{counter}{dot}{suffix}"
        counter += 1
    return folder / candidate


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
