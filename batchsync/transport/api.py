"""Providers reached through their APIs, behind the same transport contract as a file drop.

An API transport does two things a file server cannot, each an optional ability the export and collect ask for:

* :class:`Submitter`: it takes an export's files row by row into the provider's API and returns the provider's
  verdict on each row (:class:`Submission`). The export advances the ledger only for the rows accepted; the
  rows refused go to the export's ``.rejected.csv`` with the provider's reason and go out again next run.
* A *report inbox* (:class:`ReportInbox`): what the provider reports since the last collect (opt-outs, bounces,
  sign-ups) is asked for when collect lists the inbound folder, written as files in the provider's export
  format, and handed to collect like files on a server. A report's window moves on only when collect has
  applied its file and finishes it (rename or delete), so a crash in between reads the same window again: at
  least once, never a report lost.

    transport = open_transport(profile)              # a MailchimpTransport, say
    if isinstance(transport, Submitter):
        submission = transport.submit(files, "newsletter")
        submission.rejected                          # [Rejected(line=12, email=..., reason=...)]
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import RemoteFolderMissing, TransportError
from batchsync.transport.base import RemoteEntry, Transport, check_remote_name
from batchsync.transport.http import ApiClient
from batchsync.workdir import WorkDir, write_whole

log = logging.getLogger(__name__)
__all__ = ["ApiTransport", "ExportRow", "Finding", "Rejected", "ReportInbox", "Submission", "Submitter", "export_rows"]


@dataclass(frozen=True)
class Rejected:
    """A row of an export file the provider refused: its line in the file, its address, and the provider's reason."""

    line: int
    email: str
    reason: str


@dataclass
class Submission:
    """The provider's verdict on an export's rows: how many it accepted, the ones it refused."""

    accepted: int = 0
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    """One line of ``batchsync check`` about the provider's API: what, whether it is right, and how to fix it."""

    name: str
    ok: bool
    detail: str


@dataclass
class ExportRow:
    """A row of an export file as an API sends it: its line (the header is line 1; lines are the CSV's records,
    a quoted cell may hold a line break), the address, batchsync's word for its status (subscribed where the file
    has none), and every other column as (header, field, cell)."""

    line: int
    email: str = ""
    status: str = "subscribed"
    others: list[tuple[str, str, str]] = field(default_factory=list)


def export_rows(profile: Profile, path: Path) -> Iterator[ExportRow]:
    """The rows of an export file the profile wrote, read back in its dialect."""
    export = profile.export
    fields = {column.header: column.field for column in export.columns}
    statuses = {value: status for status, value in export.status_values.items()}
    with path.open(encoding=export.encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=export.delimiter, quotechar=export.quote)
        header = next(reader, [])
        for line, cells in enumerate(reader, start=2):
            row = ExportRow(line)
            for name, cell in zip(header, cells, strict=False):
                kind = fields.get(name, name)
                if kind == "email":
                    row.email = cell
                elif kind == "status":
                    row.status = statuses.get(cell, cell)
                else:
                    row.others.append((name, kind, cell))
            yield row


class Submitter(Transport):
    """A transport that takes an export's rows itself (an API) instead of files in a folder."""

    @abstractmethod
    def submit(self, files: list[Path], list_code: str) -> Submission:
        """Send the rows of ``files`` (an export's data file, then its opt-out file) for the list; return once
        the provider has given its verdict on every row. Raises TransportError when no verdict came: then
        nothing is taken as accepted and the same rows go out again."""

    @property
    @abstractmethod
    def calls(self) -> int:
        """The requests made to the provider's API through this transport, tries again included."""


class ReportInbox:
    """The provider's reports kept as files in the work folder (``api-inbox/<folder>/``) until collect finishes
    them, and where each report stream got to (``.cursors.json``: stream -> the end of its last window)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def pending(self, folder: str) -> list[Path]:
        place = self.root / folder
        if not place.is_dir():
            return []
        return sorted(path for path in place.iterdir() if path.is_file() and not path.name.startswith("."))

    def waiting(self, folder: str, stream: str) -> bool:
        """A file of this stream is here, not applied yet: the stream's next window waits for it."""
        place = self.root / folder
        windows = place.glob(".*.window") if place.is_dir() else []
        return any(json.loads(path.read_text("utf-8")).get("stream") == stream for path in windows)

    def cursor(self, folder: str, stream: str) -> datetime | None:
        value = self._cursors(folder).get(stream)
        return datetime.fromisoformat(value) if value else None

    def add(self, folder: str, name: str, stream: str, upto: datetime, write: Callable[[Path], None]) -> Path:
        """A report file made whole by ``write``, remembered as covering ``stream`` up to ``upto``."""
        place = self.root / folder
        place.mkdir(parents=True, exist_ok=True)
        (place / f".{name}.window").write_text(json.dumps({"stream": stream, "upto": upto.isoformat()}), "utf-8")
        write_whole(place / check_remote_name(name), write)
        return place / name

    def finish(self, folder: str, name: str) -> None:
        """Collect applied the file: its stream's cursor moves to the end of its window, and the file goes."""
        place = self.root / folder
        window = place / f".{check_remote_name(name)}.window"
        if window.exists():
            done = json.loads(window.read_text("utf-8"))
            self.advance(folder, done["stream"], datetime.fromisoformat(done["upto"]))
            window.unlink()
        (place / name).unlink(missing_ok=True)

    def advance(self, folder: str, stream: str, upto: datetime) -> None:
        """``stream`` is read up to ``upto``."""
        cursors = self._cursors(folder)
        cursors[stream] = upto.isoformat()
        path = self.root / folder / ".cursors.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(cursors, indent=1)

        def write(part: Path) -> None:
            part.write_text(text, "utf-8")

        write_whole(path, write)

    def _cursors(self, folder: str) -> dict[str, str]:
        path = self.root / folder / ".cursors.json"
        return dict(json.loads(path.read_text("utf-8"))) if path.exists() else {}


class ApiTransport(Submitter):
    """The file half of the contract over a :class:`ReportInbox`: ``list`` of a report folder asks the provider
    for what is new (when nothing from before is waiting), ``download`` copies a report, and ``rename`` or
    ``delete`` (collect's "processed") finishes it. Uploading files is not what an API takes: export submits."""

    lists_whole_files = True
    report_folders: tuple[str, ...] = ()
    api: ApiClient  # the provider's API, made by the subclass

    def __init__(self, profile: Profile, clock: Clock) -> None:
        self.profile, self.clock = profile, clock
        self.inbox = ReportInbox(WorkDir.of(profile).root / "api-inbox")
        self._asked: set[str] = set()  # report folders asked this connection (collect lists one once per kind)

    @property
    def calls(self) -> int:
        return self.api.calls

    @abstractmethod
    def check(self) -> Iterator[Finding]:
        """``batchsync check`` for the API: the credentials accepted, every list id known to the provider, every
        mapped field there; stops at the first finding that makes the rest moot."""

    @abstractmethod
    def fetch_reports(self, folder: str) -> None:
        """Ask the provider what is new for ``folder`` and add it to the inbox as files: each stream whose
        last file is not waiting to be applied (``ReportInbox.waiting``)."""

    def list(self, folder: str) -> list[RemoteEntry]:
        if folder not in self.report_folders:
            known = ", ".join(self.report_folders) or "none"
            raise RemoteFolderMissing(f"{type(self).__name__} has no report folder {folder!r} (it has: {known})")
        if folder not in self._asked:
            self._asked.add(folder)
            self.fetch_reports(folder)
        pending = self.inbox.pending(folder)
        for path in pending:
            if not any(kind.remote_dir == folder and kind.matches(path.name) for kind in self.profile.inbound):
                log.error(
                    "%s in %s matches no inbound kind of the profile: its stream waits", path.name, self.inbox.root
                )
        return [RemoteEntry(path.name, path.stat().st_size, None) for path in pending]

    def download(self, remote: str, local: Path) -> None:
        shutil.copyfile(self._report(remote), local)

    def size(self, remote: str) -> int:
        return self._report(remote).stat().st_size

    def rename(self, source: str, target: str) -> None:
        self._finish(source)

    def delete(self, remote: str) -> None:
        self._finish(remote)

    def upload(self, local: Path, remote: str) -> None:
        raise TransportError(f"{self.profile.transport.kind} takes an export's rows through its API, not files")

    def _finish(self, remote: str) -> None:
        folder, _, name = remote.rpartition("/")
        self.inbox.finish(folder, name)

    def _report(self, remote: str) -> Path:
        folder, _, name = remote.rpartition("/")
        path = self.inbox.root / folder / check_remote_name(name)
        if folder not in self.report_folders or not path.is_file():
            raise TransportError(f"no report {remote!r} from {self.profile.transport.kind}")
        return path
