"""The set-based import against the import it replaced (``tests/scalar_oracle``: one event at a time, under
``rules``): random files of every kind of event, from every origin, on random CRM states, leave the same tables
(statuses, contacts, activities, the audit trail with its undo columns, suppressions, the provider's remembered
opt-outs, the export ledger's notes), the same result and errors files and the same counts."""

from __future__ import annotations

import csv
import shutil
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select

from batchsync.collect import StagedFile
from batchsync.config import Profile, load_profile
from batchsync.db import crm, snapshots
from batchsync.db.schema import (
    activities,
    bs_changes,
    bs_provider_optouts,
    contacts,
    make_engine,
    subscriptions,
    suppressions,
)
from batchsync.eventframe import EventFrames
from batchsync.events import EventReader
from batchsync.formats.csvfile import ErrorsWriter, ReportWriter, inspect_csv
from batchsync.formats.csvframe import read_frames
from batchsync.reconcile import RESULT_COLUMNS
from batchsync.setimport import FileImport, Writers
from batchsync.sync import Sync
from batchsync.tally import Tally

from . import scalar_oracle
from .conftest import BACKENDS, ROOT, make_database
from .crmdata import build_tiny_crm

NOW = datetime(2026, 2, 1, 3, 0, tzinfo=UTC)
EVENTS_KIND = {
    "kind": "events",
    "pattern": "events*.csv",
    "columns": {"email": "email", "list_id": "list", "at": "when", "reason": "code", "new_email": "new"},
    "optional_columns": ["list_id"],
    "timestamp_format": "%Y-%m-%dT%H:%M:%S",
    "unknown_codes": "reject",
    "codes": {
        code: {"event": event, "reason": event.replace("_", " ")}
        for code, event in {
            "u": "unsubscribe", "h": "hard_bounce", "x": "complaint", "cl": "clean", "s": "soft_bounce",
            "sub": "subscribe", "o": "open", "c": "click", "up": "update", "i": "ignore", "ch": "email_change",
        }.items()
    },
}  # fmt: skip
COLUMNS = [
    {"header": "111", "field": "email"},
    {"header": "1", "field": "first_name", "direction": "both"},
    {"header": "City", "field": "custom.city", "direction": "in", "values": {"rome": "Roma"}},
    {"header": "idList", "field": "list_id"},
    {"header": "optout", "field": "status"},
]
HEADER = ["email", "list", "when", "code", "new", "1", "City"]
EMAILS = [
    "alice@example.com", "BOB@example.com", "carol@example.com", "dave@example.com", "eve@example.com",
    "frank@example.com", "grace@example.com", "ivan@example.com", "judy@example.com", "stranger@example.com",
    "new@example.com", "bad", "zoë@example.com",
]  # fmt: skip
LEDGER = ["alice@example.com", "bob@example.com", "dave@example.com", "ivan@example.com", "new@example.com"]
TIMES = [NOW - timedelta(hours=h) for h in (1, 30, 24 * 200, 24 * 400)]


def _profile(tmp: Path, url: str, every_list: bool, suppresses: bool) -> Profile:
    mailup = tomllib.loads((ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8"))["inbound"][0]
    overrides = {
        "database": {"url": url},
        "work.dir": str(tmp / "work"),
        "transport": {"kind": "local", "path": str(tmp / "provider")},
        "inbound": [mailup, EVENTS_KIND],
        "export.columns": COLUMNS,
        "policy.unsubscribe_all_lists": every_list,
        "policy.hard_bounce_suppresses": suppresses,
        "policy.soft_bounce_threshold": 2,
    }
    return load_profile(ROOT / "profiles" / "mailup.toml", overrides=overrides)


@pytest.fixture(scope="module", params=BACKENDS)
def template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny CRM, with the state a CRM and earlier runs leave: soft bounces counted, the provider's opt-outs
    remembered, an export ledger, an address on the suppression list. Its URL: a SQLite file each case copies,
    or a PostgreSQL database each case's databases are made from."""
    folder = tmp_path_factory.mktemp("oracle")
    url = f"sqlite:///{folder / 'crm.sqlite'}" if request.param == "sqlite" else make_database(_pg(request))
    sync = Sync(_profile(folder, url, False, True))
    sync.init()
    build_tiny_crm(sync.engine)
    at = datetime(2026, 1, 20, 10, tzinfo=UTC)
    with sync.engine.begin() as connection:
        connection.execute(
            insert(activities),
            [{"contact_id": c, "kind": "soft_bounce", "at": at, "detail": "earlier"} for c in (2, 4, 4)],
        )
        reported = [("bob@example.com", "newsletter", datetime(2026, 1, 31, 1, tzinfo=UTC)),
                    ("judy@example.com", "offers", datetime(2025, 1, 1, tzinfo=UTC))]  # fmt: skip
        connection.execute(
            insert(bs_provider_optouts),
            [
                {"profile": "mailup", "email_key": key, "list_code": code, "email": key, "kind": "unsubscribe",
                 "at": when, "reason": "r", "source": "old:2", "recorded_at": at}
                for key, code, when in reported
            ],
        )  # fmt: skip
        for code in ("newsletter", "offers"):  # the export ledger: a current snapshot of the LEDGER addresses
            writer = snapshots.SnapshotWriter.begin(connection, "mailup", code, "seeded", 0, at)
            keys = sorted(LEDGER)
            writer.add(pl.DataFrame(
                {"email_key": keys, "email": keys, "contact_id": [1] * len(keys), "fingerprint": [5] * len(keys),
                 "status": ["subscribed"] * len(keys), "origin": ["export"] * len(keys), "at": [at] * len(keys)},
                schema=snapshots.CHUNK_SCHEMA,
            ))  # fmt: skip
            writer.finish()
            snapshots.commit(connection, "mailup", code)
    sync.engine.dispose()  # SQLite: the last connection closed puts the whole database in its file, which is copied
    yield url


def _pg(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_server"))


def _copy(template: str, run: Path) -> str:
    """A CRM of the template's for one run: the file copied, or a database made from it."""
    if template.startswith("sqlite"):
        shutil.copy(template.removeprefix("sqlite:///"), run / "crm.sqlite")
        return f"sqlite:///{run / 'crm.sqlite'}"
    base, name = template.rsplit("/", 1)
    copy = f"{name}_{run.parent.name}_{run.name}".replace("-", "_")
    admin = make_engine(f"{base}/postgres").execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
    admin.dispose()
    return f"{base}/{copy}"


WHEN = [t.strftime("%Y-%m-%dT%H:%M:%S") for t in TIMES]
rows = st.lists(
    st.tuples(
        st.sampled_from(EMAILS),
        st.sampled_from(["1", "2", "3", "", "9"]),
        st.sampled_from([*WHEN, *WHEN, *WHEN, "", "never", "2030-01-01T00:00:00"]),  # mostly times it can read
        st.sampled_from([*EVENTS_KIND["codes"], *EVENTS_KIND["codes"], "zz"]),  # type: ignore[list-item]
        st.sampled_from(EMAILS),
        st.sampled_from(["", "Anna", "=cmd"]),
        st.sampled_from(["", "rome", "Oslo"]),
    ),
    min_size=1,
    max_size=40,
)
states = st.lists(
    st.tuples(
        st.integers(1, 12),
        st.sampled_from([1, 2, 3]),
        st.sampled_from(["subscribed", "unsubscribed", "pending", "cleaned", None]),
        st.sampled_from([*TIMES, NOW - timedelta(minutes=5)]),
        st.booleans(),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows,
    states,
    st.sampled_from(["provider", "admin", "callback"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([7, 3]),
)
def test_a_file_leaves_what_the_scalar_import_left(
    template: str,
    tmp_path_factory: pytest.TempPathFactory,
    body: list[tuple[str, ...]],
    crm_states: list[tuple[Any, ...]],
    origin: str,
    every_list: bool,
    suppresses: bool,
    batch: int,
) -> None:
    folder = tmp_path_factory.mktemp("case")
    path = folder / "events_1.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, delimiter=";", lineterminator="\r\n").writerows([HEADER, *body])
    _same(*_both_imports(template, folder, path, crm_states, origin, (every_list, suppresses, 1), batch))


def _both_imports(
    template: str,
    folder: Path,
    path: Path,
    crm_states: list[tuple[Any, ...]],
    origin: str,
    setup: tuple[bool, bool, int],
    batch: int,
) -> list[dict[str, Any]]:
    """The file imported by the scalar import and by the set-based one, each into its own copy of the CRM in
    the same states; ``setup`` is (every_list, suppresses, the profile's inbound source the file came by)."""
    every_list, suppresses, inbound = setup
    outcomes = []
    for engine_name in ("scalar", "set"):
        run = folder / engine_name
        run.mkdir()
        url = _copy(template, run)
        _set_states(url, crm_states)
        profile = _profile(run, url, every_list, suppresses)
        staged = StagedFile(path, path.name, profile.inbound[inbound], f"inbox:{path.name}", origin)  # type: ignore[arg-type]
        outcomes.append(_import(engine_name, profile, staged, run, batch))
    return outcomes


def _same(scalar: dict[str, Any], vectorised: dict[str, Any]) -> None:
    for name in ("tally", "bounced", "opted_out", "result", "errors"):
        assert (name, vectorised[name]) == (name, scalar[name])
    for table, rows_ in scalar["tables"].items():
        assert (table, vectorised["tables"][table]) == (table, rows_)


def _set_states(url: str, crm_states: list[tuple[Any, ...]]) -> None:
    engine = make_engine(url)
    s = subscriptions.c
    with engine.begin() as connection:
        for contact, list_id, status, at, consent in crm_states:
            connection.execute(delete(subscriptions).where(s.contact_id == contact, s.list_id == list_id))
            if status is not None:
                row = {"contact_id": contact, "list_id": list_id, "status": status, "status_at": at, "source": "crm"}
                row |= {"reason": "why", "consent_by": "form" if consent else None, "consent_at": at}
                connection.execute(insert(subscriptions).values(**row))
    engine.dispose()


def _import(engine_name: str, profile: Profile, staged: StagedFile, run: Path, batch: int) -> dict[str, Any]:
    engine = make_engine(str(profile.database.url))
    results, errors = run / "result.csv", run / "errors.csv"
    reader = EventReader(profile, staged.kind, NOW)
    shape = inspect_csv(staged.path, staged.kind, reader.required_columns(), 10**9)
    reader.use_header(shape.header)
    with (
        engine.begin() as connection,
        ReportWriter(results, staged.kind, RESULT_COLUMNS) as report,
        ErrorsWriter(errors, staged.kind, shape.header, staged.origin) as wrong,
    ):
        batches = list(read_frames(staged.path, staged.kind, shape, batch * 20))
        if engine_name == "scalar":  # in chunks as the batches are: the same rows apply together
            chunks = [raw.height for raw in batches]
            tally, opted_out = scalar_oracle.apply_file(profile, connection, staged, 3, NOW, 7, report, wrong, chunks)
        else:
            tally = Tally()
            ids = crm.list_ids(connection, profile.lists)
            state = FileImport(profile, connection, staged, 3, NOW, 7, ids, shape.header, Writers(report, wrong), tally)
            frames = EventFrames(reader, shape.header)
            for raw in batches:
                state.apply(*frames.read(raw))
            state.finish()
            opted_out = state.opted_out_counts()
    engine.dispose()
    return {
        "tally": (tally.rows, tally.changed, tally.unchanged, tally.no_contact, tally.rejected, tally.warnings),
        "bounced": tally.bounced,
        "opted_out": opted_out,
        "tables": _tables(str(profile.database.url), drop=True),
        "result": sorted(_csv(results)[1:], key=lambda row: int(row[0])),
        "errors": sorted(_csv(errors)[1:], key=lambda row: int(row[-3])),
    }


def _csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter=";"))


def _tables(url: str, *, drop: bool) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the import may write, in id order where the order is the file's, read as Core types them; then
    the run's PostgreSQL database is dropped (hundreds of cases)."""
    engine = make_engine(url)
    c = contacts.c
    queries = {
        "subscriptions": select(subscriptions).order_by(subscriptions.c.contact_id, subscriptions.c.list_id),
        "contacts": select(c.id, c.email, c.email_key, c.first_name, c.last_name, c.custom, c.updated_at).order_by(
            c.id
        ),
        "activities": select(activities).order_by(activities.c.id),
        "suppressions": select(suppressions).order_by(suppressions.c.email_key),
        "bs_changes": select(bs_changes).order_by(bs_changes.c.id),
        "bs_provider_optouts": select(bs_provider_optouts).order_by(*bs_provider_optouts.primary_key),
    }
    with engine.connect() as connection:
        found = {name: [tuple(row) for row in connection.execute(query)] for name, query in queries.items()}
        keys = {row[2] for row in found["contacts"]} | set(LEDGER)
        held = snapshots.rows_for_keys(connection, "mailup", sorted(keys)).drop("at")
        found["export ledger"] = sorted(held.rows())
    engine.dispose()
    if drop and not url.startswith("sqlite"):
        base, name = url.rsplit("/", 1)
        admin = make_engine(f"{base}/postgres").execution_options(isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{name}"')
        admin.dispose()
    return found


mailup_rows = st.lists(
    st.tuples(
        st.sampled_from(EMAILS),
        st.sampled_from(["1", "2", "3", "", "9"]),
        st.sampled_from([t.strftime("%Y%m%dT%H%M%S") for t in TIMES] + ["", "x"]),
        st.sampled_from(["0", "2", "4", "8", "16", "512", "3", "x", ""]),  # 3, x and "": unknown, an unsubscribe
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mailup_rows, states, st.sampled_from(["provider", "admin"]), st.booleans(), st.sampled_from([7, 3]))
def test_a_mailup_file_leaves_what_the_scalar_import_left(
    template: str,
    tmp_path_factory: pytest.TempPathFactory,
    body: list[tuple[str, ...]],
    crm_states: list[tuple[Any, ...]],
    origin: str,
    every_list: bool,
    batch: int,
) -> None:
    folder = tmp_path_factory.mktemp("mailup")
    path = folder / "unsubscribers_1.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        header = ["email", "idList", "OptOut_Date", "optout_type"]
        csv.writer(handle, delimiter=";", lineterminator="\r\n").writerows([header, *body])
    _same(*_both_imports(template, folder, path, crm_states, origin, (every_list, True, 0), batch))
