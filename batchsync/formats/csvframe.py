"""An inspected inbound file's rows as frames (polars), for the set-based import: the rows ``read_records``
would give, in batches of about ``batch_characters`` characters, each row with its line.

A batch has the columns ``line`` (where the record starts, the header being line 1), ``width`` (its number of
fields) and ``c0``, ``c1``... (its fields, one column per header name in the header's order; null where the row
is shorter). Blank lines are no rows. A plain file (``FileShape.plain``: no quote character, no carriage return
but before a line feed) is read by polars alone: its records are its lines, split at the delimiter. Any other is
read by the csv module, which follows quoted fields across lines::

    for batch in read_frames(path, kind, shape):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain, islice, zip_longest
from pathlib import Path
from typing import Any

import polars as pl

from batchsync.config import Dialect
from batchsync.formats.csvfile import FORMULA_STARTS, FileShape, ReportWriter, _open, _reader

# Per batch: memory is bounded by the size of the rows held, not their count. About 28k rows of a MailUp file: on
# the bench's 100k unsubscribes, the import's peak RSS is 300 MB at 2M characters and 480 MB at 16M (one batch),
# for the same time within the machine's noise.
BATCH_CHARACTERS = 2_000_000
_SLICE = 1000  # rows the csv module reads between two looks at the batch's size


def cell(index: int) -> str:
    """The name of a batch's column for the header's ``index``-th field."""
    return f"c{index}"


def read_frames(
    path: Path, dialect: Dialect, shape: FileShape, batch_characters: int = BATCH_CHARACTERS
) -> Iterator[pl.DataFrame]:
    """The file's data rows in batches; ``shape`` is what :func:`inspect_csv` found."""
    width = len(shape.header)
    if shape.plain:
        yield from _plain_frames(path, dialect, width, batch_characters)
    else:
        yield from _csv_frames(path, dialect, width, batch_characters)


def _plain_frames(path: Path, dialect: Dialect, width: int, batch_characters: int) -> Iterator[pl.DataFrame]:
    first_line, rest = 1, ""
    with _open(path, dialect) as handle:
        while True:
            text = handle.read(batch_characters)
            block = rest + text
            cut = block.rfind("\n") + 1 if text else len(block)  # whole lines only, but at the end
            block, rest = block[:cut], block[cut:]
            if block:
                frame = _lines_frame(block, first_line, dialect.delimiter, width)
                first_line += block.count("\n")
                yield frame.filter(pl.col("line") > 1)  # the header is line 1
            if not text:
                return


def _lines_frame(block: str, first_line: int, delimiter: str, width: int) -> pl.DataFrame:
    lines = pl.Series("text", [block]).str.split("\n").explode()
    if block.endswith("\n"):
        lines = lines.head(-1)  # the empty text after the block's last line break
    frame = lines.to_frame().with_row_index("line", offset=first_line)
    frame = frame.with_columns(pl.col("line").cast(pl.Int64), pl.col("text").str.strip_suffix("\r"))
    frame = frame.filter(pl.col("text") != "").with_columns(pl.col("text").str.split(delimiter))
    cells = [pl.col("text").list.get(index, null_on_oob=True).alias(cell(index)) for index in range(width)]
    return frame.select("line", pl.col("text").list.len().cast(pl.Int64).alias("width"), *cells)


def _csv_frames(path: Path, dialect: Dialect, width: int, batch_characters: int) -> Iterator[pl.DataFrame]:
    with _open(path, dialect) as handle:
        reader = _reader(handle, dialect)
        if next(reader, None) is None:
            return
        start = reader.line_num + 1
        while True:
            rows, ends = _csv_batch(reader, batch_characters)
            if not ends:
                return
            starts = [start, *(end + 1 for end in ends[:-1])]
            start = ends[-1] + 1
            kept = [(line, row) for line, row in zip(starts, rows, strict=True) if row]
            if kept:
                yield _rows_frame([line for line, _ in kept], [row for _, row in kept], width)


def _csv_batch(reader: Any, batch_characters: int) -> tuple[list[list[str]], list[int]]:
    """Rows, and the line each ends on, until the batch holds ``batch_characters`` characters. They are read a
    slice at a time, each slice as many rows as should fit in what is left, by the rows' size so far."""
    rows: list[list[str]] = []
    ends: list[int] = []
    characters = 0
    while characters < batch_characters:
        average = characters // len(rows) if rows else batch_characters
        part = [(row, reader.line_num) for row in islice(reader, _slice(batch_characters - characters, average))]
        if not part:
            break
        rows += [row for row, _ in part]
        ends += [end for _, end in part]
        characters += sum(map(len, chain.from_iterable(row for row, _ in part)))
    return rows, ends


def _slice(room: int, average: int) -> int:
    return max(1, min(_SLICE, room // max(average, 1)))


def _rows_frame(lines: list[int], rows: list[list[str]], width: int) -> pl.DataFrame:
    columns = list(zip_longest(*rows))[:width]
    columns += [(None,) * len(rows)] * (width - len(columns))
    data = {cell(index): pl.Series(values, dtype=pl.String) for index, values in enumerate(columns)}
    return pl.DataFrame(
        {"line": pl.Series(lines, dtype=pl.Int64), "width": pl.Series(list(map(len, rows)), dtype=pl.Int64), **data}
    )


def write_frame(report: ReportWriter, frame: pl.DataFrame) -> None:
    """Every row of ``frame`` (its columns in the report's order) into a report, written as ``ReportWriter.write``
    writes one: text cells neutralised, quoted only where the csv module quotes (a delimiter, quote or line break
    inside), an empty text and a null both as nothing."""
    if frame.is_empty():
        return
    cells = [
        pl.when(pl.col(name) == "")
        .then(None)
        .when(pl.col(name).str.contains(_FORMULA))
        .then(pl.lit("'") + pl.col(name))
        .otherwise(pl.col(name))
        .alias(name)
        for name, kind in frame.schema.items()
        if kind == pl.String
    ]
    text = frame.with_columns(cells).write_csv(
        include_header=False, separator=report.delimiter, quote_char=report.quote, line_terminator="\r\n"
    )
    report.write_text(text, frame.height)


_FORMULA = "^[" + "".join(f"\\x{ord(start):02X}" for start in FORMULA_STARTS) + "]"  # csvfile.neutralised's test
