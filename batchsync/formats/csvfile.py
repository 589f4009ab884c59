"""Reading provider CSV files, and writing ours, in the dialect a profile declares.

Reading is two passes. :func:`inspect_csv` reads the whole file once and raises :class:`BadFile` for anything
that makes the file untrustworthy as a whole (empty, over the size limit, undecodable, a header without the
required columns, a truncated last record). Only then does :func:`read_records` hand out rows, each with the
line it starts on, so row-level problems can be reported by line.

The csv module is used rather than pandas because every row needs its source line number, also across quoted
fields with embedded newlines.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

from batchsync.config import Dialect
from batchsync.errors import BadFile

FIELD_LIMIT = 1 << 24
csv.field_size_limit(FIELD_LIMIT)


@dataclass(frozen=True)
class Record:
    """One record of an inbound file: its fields by header name, as read, and the line it starts on."""

    line: int  # the line the record starts on, 1-based, counting the header as line 1
    values: dict[str, str]
    raw: list[str]
    expected: int  # the number of fields in the header


@dataclass(frozen=True)
class FileShape:
    """An inbound file checked whole before anything of it is applied: its header and how many records follow it."""

    header: list[str]
    records: int
    plain: bool = False  # its records are its lines (see _TextFacts): csvframe reads it without the csv module


def _python_encoding(dialect: Dialect) -> str:
    # A UTF-8 file may start with a BOM whether or not the profile says so: utf-8-sig reads both.
    return "utf-8-sig" if dialect.encoding in ("utf-8", "utf-8-sig") else dialect.encoding


def _open(path: Path, dialect: Dialect) -> IO[str]:
    return path.open("r", encoding=_python_encoding(dialect), errors="strict", newline="")


def _reader(handle: IO[str], dialect: Dialect, *, strict: bool = False) -> Any:
    return csv.reader(handle, delimiter=dialect.delimiter, quotechar=dialect.quote, strict=strict)


def inspect_csv(path: Path, dialect: Dialect, required: Sequence[str], max_bytes: int) -> FileShape:
    """Check a whole file before anything of it is applied; raise BadFile when it cannot be trusted."""
    size = path.stat().st_size
    if size == 0:
        raise BadFile(path.name, "empty file")
    if size > max_bytes:
        raise BadFile(path.name, f"file of {size} bytes is over the limit of {max_bytes} bytes")
    facts = _check_text(path, dialect)
    if facts.plain:
        return _plain_shape(path, dialect, required, facts)
    records, line, header = 0, 1, None
    last: list[str] = []
    try:
        with _open(path, dialect) as handle:
            reader = _reader(handle, dialect, strict=True)
            for row in reader:
                if header is None:
                    header = _check_header(path, row, required)
                elif row:
                    records += 1
                    last = row
                line = reader.line_num + 1
    except csv.Error as exc:
        raise BadFile(path.name, f"truncated or malformed CSV at line {line}: {exc}") from None
    if header is None:
        raise BadFile(path.name, "empty file: no header row")
    if last and len(last) < len(header) and not facts.ends_with_newline:
        raise BadFile(path.name, f"truncated last line {line - 1}: {len(last)} of {len(header)} fields")
    return FileShape(header, records)


def _plain_shape(path: Path, dialect: Dialect, required: Sequence[str], facts: _TextFacts) -> FileShape:
    """The checks of :func:`inspect_csv` for a plain file (see ``_TextFacts.plain``): a record is a line, its
    fields the line split at the delimiter, and no row can be malformed, so the text's counts say it all."""
    with _open(path, dialect) as handle:
        header = _check_header(path, next(_reader(handle, dialect), []), required)
    records = facts.lines - facts.blank - 1
    if records and not facts.ends_with_newline and facts.tail_fields < len(header):
        raise BadFile(path.name, f"truncated last line {facts.lines}: {facts.tail_fields} of {len(header)} fields")
    return FileShape(header, records, plain=True)


class _TextFacts:
    """What one pass over a file's text tells, block by block: whether it ends a line, its lines (``blank``:
    the empty ones), the fields of a last line without a line break, and whether it is plain: no quote
    character, no carriage return but before a line feed, no line longer than a field may be. A plain file's
    records are its lines, exactly as the csv module reads them, so ``csvframe`` reads it without that module."""

    def __init__(self, dialect: Dialect) -> None:
        self.delimiter, self.quote = dialect.delimiter, dialect.quote
        self.ends_with_newline, self.lines, self.blank, self.tail_fields, self.plain = False, 1, 0, 1, True
        self._carry, self._run = "", 0  # the text's last two characters; the characters since the last line feed

    def feed(self, text: str) -> None:
        joined = self._carry + text  # a pattern across two blocks is counted once, in the block where it ends
        self.blank += len(_BLANK.findall(joined)) - len(_BLANK.findall(self._carry))
        bare = _bare_returns(joined) - _bare_returns(self._carry)
        self.plain &= self.quote not in text and bare == 0
        cut = text.rfind("\n")
        if cut < 0:
            self._run += len(text)
            self.tail_fields += text.count(self.delimiter)
        else:  # a block holds at most a million characters: only a line across blocks can be too long
            self.plain &= self._run + text.find("\n") <= FIELD_LIMIT
            self._run, self.tail_fields = len(text) - cut - 1, text.count(self.delimiter, cut) + 1
        self.plain &= self._run <= FIELD_LIMIT
        self.lines += text.count("\n")
        self._carry = joined[-2:]

    def end(self) -> _TextFacts:
        self.ends_with_newline = self._carry[-1:] in ("\n", "\r")
        self.lines -= self._run == 0  # the empty text after the last line break is no line
        return self


_BLANK = re.compile(r"\n(?=\r?\n)")  # a line break that ends an empty line


def _check_text(path: Path, dialect: Dialect) -> _TextFacts:
    """Decode the whole file in blocks, so an undecodable byte is reported with its line (counted in the text
    decoded before it), whatever the encoding (UTF-16 included), noting the text's facts as it goes."""
    decoder = codecs.getincrementaldecoder(_python_encoding(dialect))(errors="strict")
    facts, offset = _TextFacts(dialect), 0
    with path.open("rb") as handle:
        while True:
            block = handle.read(1 << 20)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                before = codecs.decode(block[: exc.start], _python_encoding(dialect), errors="ignore")
                raise BadFile(
                    path.name,
                    f"not valid {dialect.encoding} text at line {facts.lines + before.count(chr(10))}, "
                    f"byte {offset + exc.start + 1}: {exc.reason}",
                ) from None
            facts.feed(text)
            offset += len(block)
            if not block:
                return facts.end()


def _bare_returns(text: str) -> int:
    return text.count("\r") - text.count("\r\n")


def _header(row: list[str]) -> list[str]:
    """Header names, trimmed; a byte order mark a UTF-16 file carries (utf-16-le, -be) is not part of the name."""
    return [cell.strip().lstrip("\ufeff") for cell in row]


def _check_header(path: Path, row: list[str], required: Sequence[str]) -> list[str]:
    header = _header(row)
    missing = [name for name in required if name not in header]
    if missing:
        raise BadFile(
            path.name,
            f"wrong header: missing column(s) {', '.join(missing)}; found {';'.join(header) or 'nothing'}",
        )
    if len(set(header)) != len(header):
        raise BadFile(path.name, "wrong header: a column name appears twice")
    return header


def read_records(path: Path, dialect: Dialect) -> Iterator[Record]:
    """The data rows of an inspected file, with their starting line numbers."""
    with _open(path, dialect) as handle:
        reader = _reader(handle, dialect)
        header = _header(next(reader))
        start = reader.line_num + 1
        for row in reader:
            if row:
                yield Record(start, dict(zip(header, row, strict=False)), row, len(header))
            start = reader.line_num + 1


class CsvWriter:
    """A CSV file in a profile's dialect, written row by row (constant memory)."""

    def __init__(self, path: Path, dialect: Dialect, header: Sequence[str]) -> None:
        self.path, self.delimiter, self.quote = path, dialect.delimiter, dialect.quote
        # Characters the encoding cannot hold (a Chinese name in cp1252) become "?" rather than failing the file.
        self._handle = path.open("w", encoding=dialect.encoding, errors="replace", newline="")
        self._writer = csv.writer(
            self._handle, delimiter=dialect.delimiter, quotechar=dialect.quote, lineterminator="\r\n"
        )
        self._writer.writerow(header)
        self.rows = 0

    def write(self, row: Sequence[Any]) -> None:
        self._writer.writerow(row)
        self.rows += 1

    def write_text(self, text: str, rows: int) -> None:
        """``rows`` rows already written as CSV text in this file's dialect (``csvframe.write_frame``)."""
        self._handle.write(text)
        self.rows += rows

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A cell a spreadsheet would take for a formula: OWASP ASVS 1.2.10 and its CSV injection page name =, +, -, @,
# tab, carriage return and NUL as first characters, and a leading single quote as the escape.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0")


FORMULA_FIRST = frozenset(FORMULA_STARTS)


def neutralised(cell: Any) -> Any:
    """A text cell that would start a formula, with a single quote before it; anything else as it is."""
    return "'" + cell if isinstance(cell, str) and cell[:1] in FORMULA_FIRST else cell


def restored(cell: str) -> str:
    """A cell read back from a file batchsync wrote (an errors file fixed and dropped in again): the quote
    :func:`neutralised` put before a formula character comes off."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in FORMULA_STARTS and cell[1:2] else cell


ERRORS_COLUMNS = ("bs_line", "bs_reason", "bs_origin")  # what an errors file adds to the input's own columns


class ErrorsWriter:
    """``NAME.errors.csv``: the rejected rows in the input's own columns, then their line, the reason and the
    file's origin, so that a person can fix them and drop the file back in (read again, it is taken as from the
    same origin). The columns an earlier errors file added are not repeated."""

    def __init__(self, path: Path, dialect: Dialect, header: Sequence[str], origin: str) -> None:
        self.keep = [index for index, name in enumerate(header) if name not in ERRORS_COLUMNS]
        self.origin = origin
        self._writer = ReportWriter(path, dialect, [*(header[index] for index in self.keep), *ERRORS_COLUMNS])
        self.path = path

    def write(self, raw: Sequence[str], line: int, reason: str) -> None:
        cells = [raw[index] for index in self.keep if index < len(raw)]
        self._writer.write([*cells, str(line), reason, self.origin])

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> ErrorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReportWriter(CsvWriter):
    """A CSV a person opens in a spreadsheet (result, errors, duplicates and skipped reports): every cell copied
    from outside (a name, an address, a provider's row) is written so that no spreadsheet runs it."""

    def write(self, row: Sequence[Any]) -> None:
        super().write([neutralised(cell) for cell in row])
