"""Reading inbound files as frames: the rows, lines and fields ``read_records`` gives, whatever the file holds, and
the checks of ``inspect_csv`` the same for a plain file (read without the csv module) as for any other."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchsync.config import Dialect
from batchsync.errors import BadFile
from batchsync.formats import csvfile
from batchsync.formats.csvfile import FileShape, inspect_csv, read_records
from batchsync.formats.csvframe import cell, read_frames

cells = st.text(
    alphabet=st.sampled_from(["a", "b", " ", ";", ",", '"', "'", "\r", "\n", "é", "\x1c", "\t"]), max_size=6
)
endings = st.sampled_from(["\r\n", "\n", "\r"])
rows = st.lists(st.lists(cells, min_size=0, max_size=5), min_size=0, max_size=12)
dialects = st.sampled_from([Dialect(), Dialect(delimiter=","), Dialect(quote="'"), Dialect(encoding="utf-16")])


def _text(header: list[str], body: list[list[str]], ending: str, delimiter: str, last: bool) -> str:
    lines = [delimiter.join(header), *(delimiter.join(row) for row in body)]
    return ending.join(lines) + (ending if last else "")


def _inspect(path: Path, dialect: Dialect, *, plain: bool) -> FileShape | str:
    original = csvfile._TextFacts.end
    try:
        if not plain:  # the csv module's strict pass, as for any file that is not plain

            def end(self: csvfile._TextFacts) -> csvfile._TextFacts:
                facts = original(self)
                facts.plain = False
                return facts

            csvfile._TextFacts.end = end  # type: ignore[method-assign]
        return inspect_csv(path, dialect, ["email"], 10**9)
    except BadFile as exc:
        return exc.reason
    finally:
        csvfile._TextFacts.end = original  # type: ignore[method-assign]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows, endings, dialects, st.booleans(), st.sampled_from([1 << 20, 7, 1]))
def test_frames_hold_the_rows_read_records_gives(
    tmp_path: Path, body: list[list[str]], ending: str, dialect: Dialect, last: bool, batch: int
) -> None:
    path = tmp_path / "file.csv"
    header = ["email", "list", "code"]
    path.write_text(_text(header, body, ending, dialect.delimiter, last), encoding=dialect.encoding, newline="")
    shape = _inspect(path, dialect, plain=True)
    strict = _inspect(path, dialect, plain=False)
    if isinstance(shape, FileShape) and isinstance(strict, FileShape):
        assert (shape.header, shape.records) == (strict.header, strict.records)
    else:
        assert shape == strict
    event(f"plain={getattr(shape, 'plain', None)}")
    if not isinstance(shape, FileShape):
        return
    expected = [(r.line, len(r.raw), [*r.raw[:3], *[None] * (3 - len(r.raw))]) for r in read_records(path, dialect)]
    got = [
        (row["line"], row["width"], [row[cell(i)] for i in range(3)])
        for frame in read_frames(path, dialect, shape, batch)
        for row in frame.iter_rows(named=True)
    ]
    assert got == expected


def test_a_line_longer_than_a_field_may_be_is_not_plain(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("email;x\r\n" + "a" * (csvfile.FIELD_LIMIT + 1) + ";y\r\n")
    with pytest.raises(BadFile, match="field larger than field limit"):
        inspect_csv(path, Dialect(), ["email"], 10**9)
