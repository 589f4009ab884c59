"""A private copy of a staged file, and what becomes of the staged file once its copy has been dealt with.

A file is applied from a snapshot taken when the reconcile picks it up, never from the staged file itself: a
writer that still has the file open (a slow admin tool, a writer that paused past the minimum age) may go on
appending to it. After the snapshot's fate is decided (applied, a duplicate, quarantined), :func:`settle` looks
at the staged file again::

    snapshot = Snapshot.take(staged)
    ...                                   # apply, or record a duplicate, or quarantine: from snapshot.path
    follow_ups = settle(staged, snapshot, work, applied=True)
    os.replace(snapshot.path, archived)   # last: a snapshot still in staging means "not finished"

Every step before the snapshot leaves staging can be done again, so a process stopped anywhere in between is
finished by the next run (``Reconciler.finish_interrupted``), and nothing is applied twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from batchsync.collect import StagedFile
from batchsync.workdir import WorkDir, sha256_of, write_whole

log = logging.getLogger(__name__)
NAME = ".{name}.applying"


@dataclass(frozen=True)
class Snapshot:
    """The private copy a staged file is applied from: its path, and the sha256 and size of what was copied."""

    path: Path
    sha256: str
    size: int

    @classmethod
    def take(cls, staged: StagedFile) -> Snapshot:
        """Copy the staged file beside it under a hidden name, hashing what is copied."""
        target = staged.path.with_name(NAME.format(name=staged.name))
        digest = hashlib.sha256()
        size = 0
        with staged.path.open("rb") as source, target.open("wb") as sink:
            while block := source.read(1 << 20):
                digest.update(block)
                sink.write(block)
                size += len(block)
        return cls(target, digest.hexdigest(), size)

    @classmethod
    def of(cls, path: Path) -> Snapshot:
        """A file as it is (a dry run reads the staged copy itself; a stopped run's snapshot)."""
        return cls(path, sha256_of(path), path.stat().st_size)

    def ends_line(self) -> bool:
        """Whether the content ends with a line break: a cut in the middle of a line is not."""
        with self.path.open("rb") as handle:
            handle.seek(max(self.size - 2, 0))
            return handle.read(2).rstrip(b"\0")[-1:] in (b"\n", b"\r")

    def matches(self, path: Path) -> bool:
        """Whether ``path`` holds exactly this content."""
        return path.stat().st_size == self.size and sha256_of(path) == self.sha256


def settle(staged: StagedFile, snapshot: Snapshot, work: WorkDir, *, applied: bool) -> list[StagedFile]:
    """The staged file, once its snapshot has been applied (``applied``: its content is in the CRM, by this file
    or an earlier one with the same content) or quarantined. Returns the file of its own made of what was
    appended, if any.

    - Unchanged: removed.
    - Whole lines appended after the snapshot's content, which was applied: the new lines, under the header,
      become ``NAME.continued.csv`` beside it (written whole, made again the same way by a rerun), and the
      staged file goes.
    - Any other change after an apply: quarantined with the reason; never archived as applied.
    - Changed, when nothing of it was applied: left staged, a file of its own for the next run.
    """
    if not staged.path.exists() or snapshot.matches(staged.path):
        staged.path.unlink(missing_ok=True)
        return []
    if not applied:
        log.warning("%s changed while it was read: it stays staged for the next run", staged.name)
        return []
    rest = _appended_lines(staged, snapshot)
    if rest is not None:
        log.warning(
            "%s grew while it was applied: its first %d bytes were applied; the lines added after them are a "
            "file of their own, %s",
            staged.name,
            snapshot.size,
            rest.name,
        )
        staged.path.unlink()
        return [rest]
    reason = (
        f"the file changed while it was being applied (a writer still had it open): its first {snapshot.size} "
        f"bytes (sha256 {snapshot.sha256[:12]}) were applied and archived; this is the file as it is now, and "
        "none of it beyond that was applied. Take out the rows already applied and drop the rest back into the inbox"
    )
    work.quarantine_file(staged.path, staged.name, f"{staged.location}: {reason}")
    log.warning("%s: %s", staged.name, reason)
    return []


def _appended_lines(staged: StagedFile, snapshot: Snapshot) -> StagedFile | None:
    """When the staged file is the snapshot's content, ending a line, plus more after it: that more, under the
    header, as a staged file of its own; else None."""
    if not snapshot.ends_line() or staged.kind.encoding.startswith("utf-16"):
        return None  # a line cut, or a two-byte encoding whose header cannot be copied line by line
    with snapshot.path.open("rb") as done, staged.path.open("rb") as now:
        header = done.readline()
        done.seek(0)
        while block := done.read(1 << 20):
            if now.read(len(block)) != block:
                return None
        stem, dot, suffix = staged.name.partition(".")
        target = staged.path.with_name(f"{stem}.continued{dot}{suffix}")

        def write(part: Path) -> None:
            with part.open("wb") as rest:
                rest.write(header)
                shutil.copyfileobj(now, rest, 1 << 20)

        write_whole(target, write)
    return StagedFile(target, target.name, staged.kind, f"{staged.location} (continued)", staged.origin)


def archive(snapshot: Snapshot, target: Path) -> Path:
    """The snapshot leaves staging, last of all: it is now what the archive (or quarantine) holds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(snapshot.path, target)
    return target
