"""Reading rows into events a batch at a time (``EventFrames``) gives, row by row, what the scalar reader
(``EventReader``) gives: the same events, the same rejected rows with the same reasons."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchsync.config import InboundConfig, Profile, load_profile
from batchsync.eventframe import EventFrames
from batchsync.events import EventReader, RowError
from batchsync.formats.csvfile import inspect_csv, read_records
from batchsync.formats.csvframe import read_frames

from .conftest import ROOT

NOW = datetime(2026, 2, 1, 3, 0, tzinfo=UTC)
MAILUP = load_profile(ROOT / "profiles" / "mailup.toml")
CHANGES = {
    "kind": "changes",
    "pattern": "changes*.csv",
    "event": "email_change",
    "columns": {"email": "old_email", "new_email": "new_email", "at": "when", "note": "why"},
    "optional_columns": ["at"],
}
SFMC_LIKE = {
    "kind": "events",
    "pattern": "events*.csv",
    "columns": {"email": "email", "list_id": "list", "at": "when", "reason": "code"},
    "codes": {"o": {"event": "open", "reason": "opened"}, "s": {"event": "soft_bounce", "reason": "soft"}},
    "timestamp_format": "%m/%d/%Y %I:%M:%S %p",
    "timezone": "Etc/GMT+6",
}

addresses = st.sampled_from(
    [
        "bob@example.com",
        " Bob@Example.COM ",
        "'=x@example.com",
        "'-y@example.com",
        "bad",
        "",
        "a..b@example.com",
        "é@example.com",
        "ÉVE@EXAMPLE.COM",
        "x\x1c@example.com",
        "\x1cz@example.com\x1c",
        "tab\t@example.com",
        "İ@example.com",
        "q@ex-ample.co.uk",
        "x" * 250 + "@example.com",
    ]
)
codes = st.sampled_from(["2", "8", "16", "512", "0", "99", "", " 2 ", "'=2"])
lists = st.sampled_from(["1", "2", "3", "", "9", " 1", "x"])
mailup_times = st.sampled_from(
    [
        "20260131T030000",
        "20260131T030000 ",
        "20270131T030000",
        "20260201T030000",
        "2026013T030000",
        "",
        "x",
        "20260229T000000",
        "20251026T023000",
        "20250330T023000",
        "'+20260131T030000",
    ]
)
sfmc_times = st.sampled_from(["1/5/2026 4:00:00 AM", "01/05/2026 04:00:00 PM", "13/5/2026 4:00:00 AM", "", "5"])
notes = st.sampled_from(["", "moved", "x" * 120, "'@note"])


def _profile(extra: dict[str, Any]) -> Profile:
    mailup = tomllib.loads((ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8"))["inbound"][0]
    return load_profile(ROOT / "profiles" / "mailup.toml", overrides={"inbound": [mailup, extra]})


def _compare(tmp_path: Path, profile: Profile, kind: InboundConfig, header: list[str], rows: list[list[str]]) -> None:
    path = tmp_path / "rows.csv"
    text = "\r\n".join(";".join(row) for row in [header, *rows]) + "\r\n"
    path.write_text(text, encoding="utf-8", newline="")
    reader = EventReader(profile, kind, NOW)
    shape = inspect_csv(path, kind, reader.required_columns(), 10**9)
    reader.use_header(shape.header)
    expected_events, expected_rejected = [], []
    for record in read_records(path, kind):
        try:
            event = reader.read(record)
        except RowError as exc:
            expected_rejected.append((record.line, str(exc)))
            continue
        expected_events.append(
            (
                event.line,
                event.email,
                event.email_key,
                event.list_code,
                event.kind,
                event.at,
                event.reason,
                event.code,
                event.new_email,
                event.warning,
            )
        )
    frames = EventFrames(EventReader(profile, kind, NOW), shape.header)
    got_events, got_rejected = [], []
    for batch in read_frames(path, kind, shape, 50):
        events, rejected = frames.read(batch)
        columns = ("line", "email", "email_key", "list_code", "kind", "at", "reason", "code", "new_email", "warning")
        got_events += [tuple(row[name] for name in columns) for row in events.iter_rows(named=True)]
        got_rejected += [(row["line"], row["reason"]) for row in rejected.iter_rows(named=True)]
    assert sorted(got_events) == expected_events
    assert sorted(got_rejected) == expected_rejected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(addresses, lists, mailup_times, codes, notes), min_size=1, max_size=30))
def test_mailup_rows_read_a_batch_at_a_time_as_one_by_one(tmp_path: Path, rows: list[tuple[str, ...]]) -> None:
    header = ["email", "idList", "OptOut_Date", "optout_type", "extra"]
    body = [[email, listed, when, code, note] for email, listed, when, code, note in rows]
    _compare(tmp_path, MAILUP, MAILUP.inbound[0], header, body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(addresses, addresses, st.sampled_from(["", "2026-01-31T03:00:00", "x"]), notes), max_size=20))
def test_email_changes_read_a_batch_at_a_time_as_one_by_one(tmp_path: Path, rows: list[tuple[str, ...]]) -> None:
    profile = _profile(CHANGES)
    _compare(tmp_path, profile, profile.inbound[-1], ["old_email", "new_email", "when", "why"], [list(r) for r in rows])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(addresses, lists, sfmc_times, st.sampled_from(["o", "s", "", "z"])), max_size=20))
def test_coded_events_read_a_batch_at_a_time_as_one_by_one(tmp_path: Path, rows: list[tuple[str, ...]]) -> None:
    profile = _profile(SFMC_LIKE)
    _compare(tmp_path, profile, profile.inbound[-1], ["email", "list", "when", "code"], [list(r) for r in rows])


def test_a_short_or_long_row_is_rejected_with_its_width(tmp_path: Path) -> None:
    header = ["email", "idList", "OptOut_Date", "optout_type"]
    _compare(
        tmp_path, MAILUP, MAILUP.inbound[0], header, [["a@example.com", "1"], ["b@example.com", "1", "", "2", "x"]]
    )
