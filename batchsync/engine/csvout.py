"""The files an export writes for one list, a bucket at a time: the data file (and an opt-out file where the
profile splits them) by polars' CSV writer, and the reports beside them (duplicate addresses, skipped invalid
ones), counting what went in::

    files = ListFiles(profile, "newsletter", outbox / "1_202601050230000000.csv", headers)
    files.write(compared.written)      # cells c0..cN, with the flags opted_out, takes_off, tombstone
    files.close()

The dialect is Python's csv module's (minimal quoting, CRLF), which the files were always written in: an empty
cell is written as nothing, not as ``""``. Encodings other than UTF-8 are transcoded from polars' UTF-8 as the
bytes stream past, an unencodable character becoming "?" (a Chinese name in cp1252), never failing the file.
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path
from typing import IO

import polars as pl

from batchsync.config import Dialect, Profile
from batchsync.formats.csvfile import ReportWriter


class ColumnarCsv:
    """One CSV file in a profile's dialect, written frame by frame (constant memory)."""

    def __init__(self, path: Path, dialect: Dialect, header: list[str]) -> None:
        self.path, self.dialect = path, dialect
        self._handle: IO[bytes] = path.open("wb")
        plain = dialect.encoding == "utf-8"
        self._encoder = None if plain else codecs.getincrementalencoder(dialect.encoding)(errors="replace")
        text = io.StringIO()
        csv.writer(text, delimiter=dialect.delimiter, quotechar=dialect.quote, lineterminator="\r\n").writerow(header)
        self._write(text.getvalue().encode("utf-8"))

    def write(self, cells: pl.DataFrame) -> None:
        if not len(cells):
            return
        empty_as_null = [
            pl.when(pl.col(name) == "").then(None).otherwise(pl.col(name)).alias(name) for name in cells.columns
        ]
        buffer = io.BytesIO()
        cells.select(empty_as_null).write_csv(
            buffer,
            include_header=False,
            separator=self.dialect.delimiter,
            quote_char=self.dialect.quote,
            line_terminator="\r\n",
        )
        self._write(buffer.getvalue())

    def _write(self, data: bytes) -> None:
        if self._encoder is None:
            self._handle.write(data)
        else:
            self._handle.write(self._encoder.encode(data.decode("utf-8")))

    def close(self) -> None:
        if self._encoder is not None:
            self._handle.write(self._encoder.encode("", final=True))
        self._handle.close()


class ListFiles:
    """The export files of one list (data, and opt-outs where the profile splits them) and the reports beside
    them (duplicates, skipped rows)."""

    def __init__(self, profile: Profile, code: str, path: Path, headers: list[str]) -> None:
        self.profile, self.code, self.path, self.headers = profile, code, path, headers
        self.opt_out_path = path.with_name(path.stem + "_optout" + path.suffix)
        self._files: dict[Path, ColumnarCsv] = {}
        self._duplicates: ReportWriter | None = None
        self._invalid: ReportWriter | None = None
        self.rows = self.main_rows = self.opt_out_rows = self.tombstones = self.duplicates = self.invalid = 0
        self.taken_off = 0  # rows taking an address the provider has as subscribed off the list
        self.reports: list[Path] = []

    def write(self, written: pl.DataFrame) -> None:
        """Rows to send, in order: cells ``c0..cN`` and the flags ``opted_out`` (an opt-out or a tombstone),
        ``takes_off`` (the provider has the address from us as subscribed) and ``tombstone``."""
        if not len(written):
            return
        cells = [f"c{index}" for index in range(len(self.headers))]
        if self.profile.export.opt_out_file:
            self._to(self.opt_out_path, written.filter(pl.col("opted_out")).select(cells))
            main = written.filter(~pl.col("opted_out"))
            self.opt_out_rows += len(written) - len(main)
        else:
            main = written
        self._to(self.path, main.select(cells))
        self.main_rows += len(main)
        self.rows += len(written)
        self.tombstones += int(written["tombstone"].sum())
        self.taken_off += int(written["takes_off"].sum())

    def _to(self, path: Path, cells: pl.DataFrame) -> None:
        if not len(cells):
            return
        if path not in self._files:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[path] = ColumnarCsv(path, self.profile.export, self.headers)
        self._files[path].write(cells)

    def report_duplicates(self, rows: pl.DataFrame) -> None:
        """Addresses several contacts share (email, ids, statuses, the status sent): a few rows, one by one."""
        for email, ids, statuses, status in rows.iter_rows():
            if self._duplicates is None:
                self._duplicates = self._report("duplicates", ["email", "list", "contact_ids", "statuses", "exported"])
            self._duplicates.write([email, self.code, ids, statuses, status])
            self.duplicates += 1

    def report_invalid(self, rows: pl.DataFrame) -> None:
        """Contacts skipped for an invalid address (contact_id, email, reason)."""
        for contact_id, email, reason in rows.iter_rows():
            if self._invalid is None:
                self._invalid = self._report("skipped", ["contact_id", "email", "list", "reason"])
            self._invalid.write([str(contact_id), email, self.code, reason])
            self.invalid += 1

    def _report(self, kind: str, header: list[str]) -> ReportWriter:
        path = self.path.with_name(f"{self.path.name}.{kind}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.reports.append(path)
        return ReportWriter(path, self.profile.export, header)

    def close(self) -> None:
        for handle in (*self._files.values(), self._duplicates, self._invalid):
            if handle is not None:
                handle.close()
