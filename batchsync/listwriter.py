"""The files an export writes for one list: the data file (and an opt-out file where the profile splits them),
and the reports beside them (duplicate addresses, skipped invalid ones), counting what went in::

    writer = ListWriter(profile, "newsletter", outbox / "1_202601050230000000.csv")
    writer.write(row.values, opted_out=False)
    writer.close()
"""

from __future__ import annotations

from pathlib import Path

from batchsync.config import Profile
from batchsync.formats.csvfile import CsvWriter, ReportWriter
from batchsync.rows import ProviderRow, written_columns


class ListWriter:
    """The export files of one list (data, and opt-outs where the profile splits them) and the reports beside
    them (duplicates, skipped rows)."""

    def __init__(self, profile: Profile, code: str, path: Path) -> None:
        self.profile, self.code, self.path = profile, code, path
        self.opt_out_path = path.with_name(path.stem + "_optout" + path.suffix)
        self.headers = [column.header for column in written_columns(profile)]
        self._files: dict[Path, CsvWriter] = {}
        self._duplicates: CsvWriter | None = None
        self._invalid: CsvWriter | None = None
        self.rows = self.main_rows = self.opt_out_rows = self.tombstones = self.duplicates = self.invalid = 0
        self.taken_off = 0  # rows taking an address the provider has as subscribed off the list
        self.reports: list[Path] = []

    def write(self, values: list[str], opted_out: bool = False, takes_off: bool = False) -> None:
        split = opted_out and self.profile.export.opt_out_file
        target = self.opt_out_path if split else self.path
        if target not in self._files:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._files[target] = CsvWriter(target, self.profile.export, self.headers)
        self._files[target].write(values)
        self.rows += 1
        self.taken_off += takes_off
        if split:
            self.opt_out_rows += 1
        else:
            self.main_rows += 1

    def write_tombstone(self, values: list[str]) -> None:
        self.write(values, opted_out=True, takes_off=True)
        self.tombstones += 1

    def report_duplicate(self, row: ProviderRow) -> None:
        if self._duplicates is None:
            self._duplicates = self._report("duplicates", ["email", "list", "contact_ids", "statuses", "exported"])
        ids = ",".join(str(i) for i in row.contact_ids)
        self._duplicates.write([row.email, self.code, ids, ",".join(row.source_statuses), row.status])
        self.duplicates += 1

    def report_invalid(self, contact_id: int, email: str, reason: str) -> None:
        if self._invalid is None:
            self._invalid = self._report("skipped", ["contact_id", "email", "list", "reason"])
        self._invalid.write([str(contact_id), email, self.code, reason])
        self.invalid += 1

    def _report(self, kind: str, header: list[str]) -> CsvWriter:
        path = self.path.with_name(f"{self.path.name}.{kind}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.reports.append(path)
        return ReportWriter(path, self.profile.export, header)

    def close(self) -> None:
        for handle in (*self._files.values(), self._duplicates, self._invalid):
            if handle is not None:
                handle.close()
