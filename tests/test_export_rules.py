"""The export's vectorised rules (engine.build, engine.diff) give rules.py's answers, row for row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from batchsync.config import load_profile
from batchsync.engine.build import FrameBuilder, valid_email
from batchsync.engine.crmread import GROUP_SEP, ROW_SCHEMA
from batchsync.engine.diff import compare
from batchsync.rules import (
    CrmRow,
    Exported,
    email_problem,
    export_decision,
    export_status,
    export_step,
    merge_statuses,
)

ROOT = Path(__file__).resolve().parents[1]
PROFILE = load_profile(ROOT / "profiles" / "mailup.toml", overrides={"database": {"url": "sqlite://"}})
WITH_PENDING = load_profile(
    ROOT / "profiles" / "mailup.toml",
    overrides={
        "database": {"url": "sqlite://"},
        "export.status_values": {**PROFILE.export.status_values, "pending": "2"},
    },
)
STATUSES = ("subscribed", "unsubscribed", "pending", "cleaned")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
moments = st.none() | st.integers(0, 5).map(lambda hours: T0 + timedelta(hours=hours))
addresses = st.emails() | st.text(max_size=40) | st.sampled_from(["a..b@x.io", " A@B.co ", "x@y", "é@ü.de"])


@given(st.lists(addresses, min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_an_address_is_valid_where_rules_finds_no_problem(emails: list[str]) -> None:
    found = pl.DataFrame({"email": emails}).select(valid_email(pl.col("email")))["email"].to_list()
    assert found == [email_problem(email) is None for email in emails]


contact = st.fixed_dictionaries(
    {
        "status": st.sampled_from(STATUSES),
        "source": st.sampled_from(["crm", "provider", "admin"]),
        "suppressed": st.booleans(),
        "consent_at": moments,
        "codes": st.lists(st.sampled_from(["vip", "customers", "b2b"]), max_size=3),
    }
)


@given(st.lists(st.lists(contact, min_size=1, max_size=3), min_size=1, max_size=8), moments)
@settings(max_examples=200, deadline=None)
def test_contacts_sharing_an_address_merge_as_rules_say(people: list[list[dict[str, Any]]], opted: Any) -> None:
    rows, contact_id = [], 0
    for index, group in enumerate(people):
        for person in group:
            contact_id += 1
            email = f"p{index}@example.com"
            rows.append(_crm_row(contact_id, email, person, opted))
    built = FrameBuilder(PROFILE, "newsletter").build(pl.DataFrame(rows, orient="row", schema=ROW_SCHEMA))
    got = {row["email_key"]: row for row in built.rows.to_dicts()}
    for index, group in enumerate(people):
        status = merge_statuses(export_status(p["status"], p["suppressed"]) for p in group)
        key = f"p{index}@example.com"
        if status == "pending":  # MailUp has no pending value: not sent
            assert key not in got
            continue
        assert got[key]["status"] == status
        assert got[key]["from_provider"] == all(p["source"] == "provider" for p in group)
        consents = [p["consent_at"] for p in group]
        assert got[key]["consent_at"] == (None if None in consents else min(consents))


def _crm_row(contact_id: int, email: str, person: dict[str, Any], opted: Any) -> tuple[Any, ...]:
    codes = GROUP_SEP.join(person["codes"]) or None
    return (
        contact_id,
        email,
        email,
        "N",
        "M",
        None,
        person["status"],
        person["source"],
        person["suppressed"],
        codes,
        person["consent_at"],
        opted,
    )


known_rows = st.none() | st.builds(
    Exported,
    st.sampled_from((*STATUSES, "tombstone")),
    st.sampled_from([1, 2, None]),
    st.sampled_from(["export", "provider", "consent"]),
)
crm_rows = st.none() | st.fixed_dictionaries(
    {
        "status": st.sampled_from(STATUSES),
        "fingerprint": st.sampled_from([1, 2]),
        "opt_out_at": moments,
        "consent_at": moments,
        "from_provider": st.booleans(),
    }
)


@given(st.lists(st.tuples(crm_rows, known_rows), min_size=1, max_size=12), st.booleans(), st.booleans())
@settings(max_examples=400, deadline=None)
def test_each_address_is_written_and_noted_as_rules_say(pairs: list[Any], full: bool, pending_ok: bool) -> None:
    builder = FrameBuilder(WITH_PENDING if pending_ok else PROFILE, "newsletter")
    rows, known = [], []
    for index, (crm, held) in enumerate(pairs):
        key = f"a{index:03d}@example.com"
        if crm is not None:
            cells = {f"c{i}": key if i == 0 else f"v{i}" for i in range(len(builder.columns))}  # c0: the address
            rows.append({"email_key": key, "email": key, "contact_id": index, **crm, **cells})
        if held is not None:
            known.append(
                {
                    "email_key": key,
                    "email": key,
                    "contact_id": index,
                    "fingerprint": held.fingerprint,
                    "status": held.status,
                    "origin": held.origin,
                    "at": T0,
                }
            )
    ours = pl.DataFrame(rows, schema=_row_schema(builder))
    theirs = pl.DataFrame(
        known,
        schema={
            "email_key": pl.String,
            "email": pl.String,
            "contact_id": pl.Int64,
            "fingerprint": pl.Int64,
            "status": pl.String,
            "origin": pl.String,
            "at": pl.Datetime("us", "UTC"),
        },
    )
    written, ledger = compare(ours, theirs, builder, "full" if full else "diff", T0)
    wrote = {row["c0"]: row for row in written.to_dicts()}
    noted = {row["email_key"]: row for row in ledger.to_dicts()}
    supported = "pending" in builder.export.status_values and builder.tombstones
    for index, (crm, held) in enumerate(pairs):
        key = f"a{index:03d}@example.com"
        row = None
        if crm is not None:
            decided = export_decision(crm["status"], crm["opt_out_at"], crm["consent_at"], supported)
            row = CrmRow(
                crm["status"], decided, crm["fingerprint"], crm["opt_out_at"] is not None, crm["from_provider"]
            )
        step = export_step(row, held, full, builder.tombstones)
        assert (key in wrote) == step.write, (crm, held, step)
        if step.write:
            assert wrote[key]["tombstone"] == step.tombstone and wrote[key]["takes_off"] == step.takes_off
        got = noted.get(key)
        expected = step.ledger
        assert (got is None) == (expected is None), (crm, held, step, got)
        if got is not None and expected is not None:
            assert (got["status"], got["fingerprint"], got["origin"]) == tuple(expected), (crm, held)


def _row_schema(builder: FrameBuilder) -> dict[str, Any]:
    return {
        "email_key": pl.String,
        "email": pl.String,
        "contact_id": pl.Int64,
        "status": pl.String,
        "fingerprint": pl.Int64,
        "opt_out_at": pl.Datetime("us", "UTC"),
        "consent_at": pl.Datetime("us", "UTC"),
        "from_provider": pl.Boolean,
        **{f"c{i}": pl.String for i in range(len(builder.columns))},
    }
