"""The vectorised rules (``vrules``) against the scalar specification (``rules``), row by row, over random states
and events: whatever a frame holds, each row's decision is the one ``rules`` makes for it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from batchsync import rules, vrules
from batchsync.rules import OPTED_OUT, Decision, OptOut, Subscription

T = datetime(2026, 1, 5, tzinfo=UTC)
STATUSES = ["subscribed", "unsubscribed", "pending", "cleaned"]
OPT_OUTS = ["unsubscribe", "hard_bounce", "complaint", "clean"]
KINDS = [*OPT_OUTS, "subscribe", "soft_bounce", "email_change", "open", "click", "update", "ignore"]
LISTS = ["newsletter", "offers", "events"]

offsets = st.integers(min_value=-5, max_value=5)  # few distinct times: ties are common
stored = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(STATUSES), offsets, st.sampled_from([None, "", "web form"]), st.none() | offsets),
)
groups = st.tuples(st.integers(1, 3), st.integers(1, 2))
events = st.lists(st.tuples(groups, st.sampled_from(OPT_OUTS), offsets), min_size=1, max_size=25)


def at(offset: int | None) -> datetime | None:
    return None if offset is None else T + timedelta(hours=offset)


def scalar_fold(
    state: Subscription | None, touched: bool, opt: OptOut, source: str
) -> tuple[Decision, Subscription | None, Subscription | None]:
    """One event on one subscription, as the import always applied it: (decision, state before, state after)."""
    if touched and state is not None and state.status in OPTED_OUT:
        decision = rules.decide_later_in_file(state, opt)
    else:
        decision = rules.decide_opt_out(state, opt)
    after = state
    if decision.new_status is not None:
        after = Subscription(decision.new_status, opt.at, source, reason=opt.reason)
    return decision, state, after


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(groups, st.tuples(stored, st.booleans()), min_size=6, max_size=6), events)
def test_decide_opt_outs_is_the_scalar_rule_row_by_row(
    states: dict[tuple[int, int], tuple[Any, bool]], steps: list[tuple[tuple[int, int], str, int]]
) -> None:
    scalar: dict[tuple[int, int], tuple[Subscription | None, bool]] = {}
    for key, (row, touched) in states.items():
        sub = None if row is None else Subscription(row[0], at(row[1]), "crm", at(row[3]), row[2], "why")  # type: ignore[arg-type]
        scalar[key] = (sub, touched)
    rows, expected = [], []
    for index, (key, kind, offset) in enumerate(steps):
        sub, touched = scalar.get(key, (None, False))
        opt = OptOut(kind, at(offset), f"reason {index}")  # type: ignore[arg-type]
        decision, before, after = scalar_fold(sub, touched, opt, "provider")
        changed = decision.new_status is not None
        scalar[key] = (after, touched or changed)
        counted = changed and before is not None and before.status in ("subscribed", "pending")
        was = before if changed else None
        expected.append(
            (
                decision.new_status,
                decision.rule,
                counted,
                *((was.status, was.status_at, was.source, was.reason) if was else (None,) * 4),
            )
        )
        first = states.get(key, (None, False))
        row = first[0]
        rows.append(
            {
                "contact_id": key[0],
                "list_id": key[1],
                "kind": kind,
                "at": opt.at,
                "reason": opt.reason,
                "status": row[0] if row else None,
                "status_at": at(row[1]) if row else None,
                "source": "crm" if row else None,
                "stored_reason": "why" if row else None,
                "consent_at": (at(row[3]) if row[2] else None) if row else None,
                "touched": first[1],
            }
        )
    frame = pl.DataFrame(rows, schema=PAIRS)
    decided = vrules.decide_opt_outs(frame, "provider")
    got = [
        (
            r["new_status"],
            r["rule"],
            r["counted"],
            *(r[n] for n in ("old_status", "old_status_at", "old_source", "old_reason")),
        )
        if r["changed"]
        else (None, r["rule"], False, None, None, None, None)
        for r in decided.iter_rows(named=True)
    ]
    assert got == expected


PAIRS = {
    "contact_id": pl.Int64,
    "list_id": pl.Int64,
    "kind": pl.String,
    "at": pl.Datetime("us", "UTC"),
    "reason": pl.String,
    "status": pl.String,
    "status_at": pl.Datetime("us", "UTC"),
    "source": pl.String,
    "stored_reason": pl.String,
    "consent_at": pl.Datetime("us", "UTC"),
    "touched": pl.Boolean,
}


address_text = st.text(
    alphabet=st.sampled_from([*"abz.@-_+'=\"();<>[]\\ \t\r\n\x00\x1c\x1f\x7f", "é", "İ", "ß", "\u00a0", "\u3000"]),
    max_size=12,
) | st.builds(
    lambda a, b: f"{a}@{b}",
    st.from_regex(r"[a-z.\-]{0,6}", fullmatch=True),
    st.sampled_from(["x.io", "a-b.c", "-x.y", "x..y"]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(address_text, min_size=1, max_size=20))
def test_email_key_and_shape_are_the_scalar_rules_for_ascii_addresses(addresses: list[str]) -> None:
    frame = pl.DataFrame({"email": addresses}, schema={"email": pl.String})
    got = frame.select(
        vrules.email_key(pl.col("email")).alias("key"),
        vrules.ascii_only(pl.col("email")).alias("ascii"),
        vrules.email_valid(vrules.email_key(pl.col("email"))).alias("valid"),
    )
    for email, row in zip(addresses, got.iter_rows(named=True), strict=True):
        assert row["ascii"] == email.isascii()
        if email.isascii():
            assert row["key"] == rules.email_key(email)
            assert row["valid"] == (rules.email_problem(email) is None), email


def test_python_s_whitespace_is_all_below_u3001() -> None:
    assert {c for c in map(chr, range(0x110000)) if c.isspace()} == set(vrules.python_whitespace())


@given(st.lists(st.text(alphabet=st.sampled_from([*" \t\r\n\x1c\x85\u3000'=+-@\x00ab"]), max_size=6), min_size=1))
def test_a_cell_s_value_is_the_scalar_reader_s(cells: list[str]) -> None:
    from batchsync.eventframe import value
    from batchsync.formats.csvfile import restored

    got = pl.DataFrame({"cell": cells}, schema={"cell": pl.String}).select(value(pl.col("cell")))["cell"].to_list()
    assert got == [restored(text.strip()) for text in cells]


@given(st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from([None, *LISTS])), min_size=1), st.booleans())
def test_target_lists_suppresses_and_opt_out_status_are_the_scalar_rules(
    rows: list[tuple[str, str | None]], every: bool
) -> None:
    frame = pl.DataFrame(rows, schema={"kind": pl.String, "list": pl.String}, orient="row")
    got = frame.select(
        vrules.target_lists(pl.col("kind"), pl.col("list"), LISTS, every).alias("lists"),
        vrules.suppresses(pl.col("kind"), every).alias("suppresses"),
        vrules.opt_out_status(pl.col("kind")).alias("status"),
    )
    for (kind, listed), row in zip(rows, got.iter_rows(named=True), strict=True):
        assert row["lists"] == rules.target_lists(kind, listed, LISTS, every)  # type: ignore[arg-type]
        assert row["suppresses"] == rules.suppresses(kind, every)  # type: ignore[arg-type]
        if kind in OPT_OUTS:
            assert row["status"] == rules.opt_out_status(kind)  # type: ignore[arg-type]


reports = st.lists(
    st.tuples(st.sampled_from(LISTS[:2]), st.sampled_from(["a@x.io", "b@x.io"]), st.sampled_from(OPT_OUTS), offsets),
    max_size=15,
)


@given(reports, st.dictionaries(st.tuples(st.sampled_from(LISTS[:2]), st.sampled_from(["a@x.io", "b@x.io"])), offsets))
def test_the_latest_reports_of_a_batch_are_what_remembering_them_one_by_one_leaves(
    rows: list[tuple[str, str, str, int]], stored: dict[tuple[str, str], int]
) -> None:
    """``sets.latest`` against ``ProviderOptOuts.remember``, its scalar twin: what is written, and how."""
    from batchsync.db.optouts import ProviderOptOuts, ProviderReport
    from batchsync.db.sets import latest

    memory = ProviderOptOuts(None, "p", set())  # type: ignore[arg-type]  # no keys: it reads nothing
    memory.known = {
        key: ProviderReport(key[1], "unsubscribe", at(offset), "old", "old:1") for key, offset in stored.items()
    }  # type: ignore[misc]
    memory.stored = set(memory.known)
    for line, (code, key, kind, offset) in enumerate(rows, start=2):
        memory.remember(code, key, key, kind, at(offset), f"reason {line}", f"file:{line}")  # type: ignore[arg-type]
    expected = {
        key: (report.kind, report.at, report.reason, report.source, key in memory.stored)
        for key, report in memory.known.items()
        if key in memory.dirty
    }
    frame = pl.DataFrame(
        [(c, k, k, kind, at(o), f"reason {n}", f"file:{n}") for n, (c, k, kind, o) in enumerate(rows, start=2)],
        schema={"list_code": pl.String, "email_key": pl.String, "email": pl.String, "kind": pl.String,
                "at": pl.Datetime("us", "UTC"), "reason": pl.String, "source": pl.String},
        orient="row",
    )  # fmt: skip
    before = pl.DataFrame(
        [(c, k, at(o)) for (c, k), o in stored.items()],
        schema={"list_code": pl.String, "email_key": pl.String, "stored_at": pl.Datetime("us", "UTC")},
        orient="row",
    )
    got = {
        (r["list_code"], r["email_key"]): (r["kind"], r["at"], r["reason"], r["source"], r["stored"])
        for r in latest(frame, before).iter_rows(named=True)
    }
    assert got == expected
