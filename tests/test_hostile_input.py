"""Hostile and odd input: formula cells, zip bombs, control characters, very long rows, and MailUp's export of
unsubscribers with its optional columns and quote character."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from batchsync.config import Dialect
from batchsync.formats.csvfile import inspect_csv
from batchsync.formats.csvframe import read_frames
from batchsync.samples import UNSUBSCRIBERS_HEADER

from .conftest import ROOT
from .crmdata import read_csv, set_email, status_of, suppressed, unsub_row, write_csv
from .test_providers import profile_for, ready
from .usercli import User, hours_ago, mailup_time


@pytest.fixture
def user(tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> User:
    person = User(tmp_path, db_url, capsys).start()
    yield person  # type: ignore[misc]
    person.close()


def test_cells_a_spreadsheet_would_run_are_neutralised_in_reports_and_read_back(user: User) -> None:
    stamp = mailup_time(hours_ago(2))
    user.provider_file(
        [
            ['=HYPERLINK("http://evil.example","x")', "+39 333 1234567", "1", stamp, "1", "2", ""],
            ["bob@example.com", "@SUM(1+1)", "1", "not a date", "1", "2", ""],
            ["-2+3@example.com", "", "1", stamp, "1", "2", ""],  # a valid address that starts with "-"
        ]
    )
    done = user.batchsync("import")
    assert done.code == 3
    archive = user.tmp_path / "work" / "archive"
    [errors] = list(archive.glob("*.errors.csv"))
    [results] = list(archive.glob("*.result.csv"))
    error_rows = read_csv(errors)[1:]
    assert error_rows[0][:2] == ['\'=HYPERLINK("http://evil.example","x")', "'+39 333 1234567"]
    assert error_rows[1][1] == "'@SUM(1+1)"
    cells = [cell for row in read_csv(results)[1:] + error_rows for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "'-2+3@example.com" in cells
    # The errors file, fixed and dropped back in, is read as the original was: the quotes come off.
    fixed = [read_csv(errors)[0][:-3], [*error_rows[1][:3], stamp, *error_rows[1][4:-3]]]
    write_csv(user.inbox / "unsubscribers_fixed.csv", fixed)
    assert user.batchsync("import").code == 0
    assert status_of(user.engine, 2, "newsletter") == "unsubscribed"


def test_export_reports_neutralise_formula_cells(user: User) -> None:
    set_email(user.engine, 7, "=1+2", hours_ago(1))  # an invalid address: listed in the skipped report
    user.export("--full")
    [skipped] = list((user.tmp_path / "work" / "sent").glob("1_*.csv.skipped.csv"))
    assert read_csv(skipped, delimiter="|")[1][1] == "'=1+2"


def test_an_address_with_a_control_character_is_a_rejected_row(user: User) -> None:
    stamp = mailup_time(hours_ago(2))
    user.provider_file(
        [unsub_row("bob\x00@example.com", "1", stamp, "2"), unsub_row("al\x1bice@example.com", "1", stamp, "2")]
    )
    done = user.batchsync("import")
    assert done.code == 3 and "2 rejected" in done.out
    [errors] = list((user.tmp_path / "work" / "archive").glob("*.errors.csv"))
    assert all("email with a control character" in row[-2] for row in read_csv(errors)[1:])
    assert status_of(user.engine, 2, "newsletter") == "subscribed"


def test_a_zip_bomb_stops_at_the_size_limit_and_is_quarantined(tmp_path: Path, clock: object) -> None:
    profile = profile_for(tmp_path, ROOT / "profiles" / "sfmc.toml", **{"work.max_file_bytes": 1_000_000})
    sync = ready(profile, clock)  # type: ignore[arg-type]
    bomb = tmp_path / "TrackingExtract_bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Unsubs.csv", "EmailAddress,ListID,EventDate\r\nbob@example.com,1001,1/5/2026 4:00:00 AM\r\n")
        with archive.open("Bounces.csv", "w") as member:
            for _ in range(64):
                member.write(b"\0" * (1 << 20))  # 64 MB of zeros, a few KB in the zip
    assert bomb.stat().st_size < 200_000
    report = sync.import_files([bomb], origin="provider")
    assert report.files == [] and any("more than the limit of 1000000 bytes" in name for name in report.refused)
    work = tmp_path / "work"
    written = sum(path.stat().st_size for path in work.rglob("*") if path.is_file())
    assert written < 3_000_000  # extraction stopped at the limit: no 64 MB written
    [kept] = list((work / "quarantine").glob("TrackingExtract_bomb.zip"))
    assert "nothing of it applied" in kept.with_name(kept.name + ".reason.txt").read_text()
    assert status_of(sync.engine, 2, "newsletter") == "subscribed"  # not even the small member


@pytest.mark.parametrize("quoted", [False, True])
def test_long_rows_are_held_a_few_at_a_time(tmp_path: Path, quoted: bool) -> None:
    """Memory is bounded by the characters of the rows held, not their count: eight 3 MB rows make batches of
    at most the batch's characters (plus the row that crosses it), never all eight at once; read by polars
    (a plain file) or by the csv module (a quoted one)."""
    long = '"' + "x" * 3_000_000 + '"' if quoted else "x" * 3_000_000
    path = tmp_path / "long.csv"
    path.write_text("email;note\r\n" + "".join(f"a{line}@example.com;{long}\r\n" for line in range(2, 10)))
    shape = inspect_csv(path, Dialect(), ["email"], 10**9)
    assert shape.plain is not quoted
    batches = list(read_frames(path, Dialect(), shape, 8_000_000))
    sizes = [sum(frame[name].str.len_chars().sum() for name in ("c0", "c1")) for frame in batches]
    assert len(sizes) > 1 and max(sizes) <= 8_000_000 + 3_000_100
    assert [line for frame in batches for line in frame["line"]] == list(range(2, 10))
    many = tmp_path / "many.csv"
    many.write_text("email\r\n" + "".join(f"a{n}@example.com\r\n" for n in range(12000)))
    shape = inspect_csv(many, Dialect(), ["email"], 10**9)
    assert sum(frame.height for frame in read_frames(many, Dialect(), shape, 100_000)) == 12000


def test_mailup_s_unsubscribers_export_with_its_documented_headers_optional_columns_and_quote(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    user = User(tmp_path, db_url, capsys).start()
    try:
        text = user.profile.read_text().replace("quote = '\"'", 'quote = "\'"')
        user.profile.write_text(text)
        header = UNSUBSCRIBERS_HEADER  # every column MailUp's export documents
        stamp = mailup_time(hours_ago(2))
        documented = user.provider / "export" / "unsubscribers_documented.csv"
        documented.write_text(
            ";".join(header)
            + "\r\n"
            + f"bob@example.com;'+39; 333';1;{stamp};20250101T100000;161;2;\r\n"
            + f"dave@example.com;;2;{stamp};;;8;\r\n"
        )
        only_addresses = user.provider / "export" / "unsubscribers_addresses.csv"
        only_addresses.write_text("email\r\nalice@example.com\r\n")  # all but the address is optional
        done = user.batchsync("import")
        assert done.code == 0, done.out + done.err
        assert status_of(user.engine, 2, "newsletter") == "unsubscribed"
        assert [status_of(user.engine, 4, code) for code in ("newsletter", "offers")] == ["cleaned", "cleaned"]
        assert "dave@example.com" in suppressed(user.engine)
        # No list: every list; no time: when the file is applied; no code: the kind's event, an unsubscribe.
        assert [status_of(user.engine, 1, code) for code in ("newsletter", "offers")] == ["unsubscribed"] * 2
    finally:
        user.close()
