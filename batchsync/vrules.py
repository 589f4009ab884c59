"""The sync rules of ``rules.py`` over whole frames of rows (polars), for the set-based import.

``rules.py`` stays the specification: pure scalar functions, one state and one event at a time. Each function here
is the same rule over a column, or a whole sequence of events at once, and ``tests/test_vectorised_rules.py``
checks every one against its scalar twin, row by row, over random states and events (hypothesis)::

    decided = decide_opt_outs(pairs, status_source="provider")
    # one row per (event, contact, list) in file order, with the rule's decision of each

The texts of the decisions are ``rules.py``'s own (a changed wording there fails the property test here).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import polars as pl

from batchsync.rules import OPTED_OUT

CLEANING = ("hard_bounce", "clean")  # opt_out_status: these clean, every other opt-out unsubscribes
OPTED_IN = ("subscribed", "pending")  # a change from these counts towards the safety stop
LATER = "a later opt-out in the same file"  # decide_later_in_file's two rules
EARLIER = "an earlier opt-out than one this file already applied"
NO_ROW = "opt-out for a list without CRM row: recorded"  # decide_opt_out's four
ALREADY = "already opted out"
CONSENTED = "newer CRM re-subscription with consent stands"
NO_CONSENT = "opt-out wins: newer CRM state carries no consent"
NEWER = "opt-out newer than CRM state"
# rules._EMAIL, with the control characters also refused before the "@" (see email_valid)
_SHAPE = r"^[^@\s\"(),:;<>\[\\\]\x00-\x1F\x7F]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"


@cache
def python_whitespace() -> str:
    """What ``str.strip()`` strips: Python's whitespace differs from polars' (Rust's) by U+001C-U+001F."""
    return "".join(chr(code) for code in range(0x3001) if chr(code).isspace())  # none lies above U+3000


def email_key(email: pl.Expr) -> pl.Expr:
    """``rules.email_key``: trimmed and lower-cased. Exact for ASCII text (see :func:`ascii_only`): Python's and
    Rust's lower-casing of other scripts may differ, so such rows are read by the scalar rule."""
    return email.str.strip_chars(python_whitespace()).str.to_lowercase()


def ascii_only(text: pl.Expr) -> pl.Expr:
    return text.str.len_bytes() == text.str.len_chars()


def email_valid(key: pl.Expr) -> pl.Expr:
    """``rules.email_problem(...) is None`` for an ASCII key (already trimmed and lower-cased): not empty, at most
    254 characters, no control character, the shape of an address. Within ASCII, the control characters make
    up the whole of Python's whitespace but the space, so ``\\s`` means the same to both regex engines; and as
    the address's domain holds none, they are refused where its first part may hold anything else."""
    return (key.str.len_chars() <= 254) & key.str.contains(_SHAPE) & ~key.str.contains("..", literal=True)


def opt_out_status(kind: pl.Expr) -> pl.Expr:
    return pl.when(kind.is_in(CLEANING)).then(pl.lit("cleaned")).otherwise(pl.lit("unsubscribed"))


def suppresses(kind: pl.Expr, hard_bounce_suppresses: bool) -> pl.Expr:
    bounces = kind.is_in(CLEANING) if hard_bounce_suppresses else pl.lit(False)
    return (kind == "complaint") | bounces


def target_lists(kind: pl.Expr, event_list: pl.Expr, profile_lists: Sequence[str], every_list: bool) -> pl.Expr:
    """``rules.target_lists`` as a list column: bounces and complaints, and rows naming no list, reach them all."""
    every = pl.lit(list(profile_lists), dtype=pl.List(pl.String))
    if every_list:
        return every
    return pl.when(event_list.is_null() | (kind != "unsubscribe")).then(every).otherwise(pl.concat_list(event_list))


def soft_bounce_cleans(so_far: pl.Expr, threshold: int) -> pl.Expr:
    return so_far + 1 >= threshold


def consent_given(consent_by: pl.Expr, consent_at: pl.Expr) -> pl.Expr:
    """The consent time ``rules`` weighs: None unless someone is named as having given it."""
    return pl.when(consent_by.is_not_null() & (consent_by != "")).then(consent_at)


GROUP = ["contact_id", "list_id"]
_WORK = ("first_status", "first_rule", "from_start", "first", "later", "base_at", "base_status", "changed_later")


def decide_opt_outs(pairs: pl.DataFrame, status_source: str) -> pl.DataFrame:
    """Every opt-out of a file on every (contact, list) it reaches, decided as ``rules`` decides them one by one.

    ``pairs``: one row per (event, contact, list), in the order the file applies them, with the event (``kind``,
    ``at``, ``reason``), the subscription as stored (``status``, ``status_at``, ``source``, ``stored_reason``,
    ``consent_at`` from :func:`consent_given`; all null without a row) and ``touched`` (an earlier batch of the
    same file changed it). Adds ``new_status`` (null: left as it is), ``rule``, ``changed``, ``counted`` (an
    opt-in taken off: the safety stop counts it) and the state each change met (``old_status``,
    ``old_status_at``, ``old_source``, ``old_reason``; null where there was no row).

    In each (contact, list), until the first change every event meets the stored state (``decide_opt_out``);
    after it (or from the start, for a subscription an earlier batch of the file changed) ``decide_later_in_file``
    applies: an event changes it when it is later than every change before it, and cleaned stays cleaned.
    """
    status, rule = _first_decision(pl.col("kind"), pl.col("at"))
    from_start = (pl.col("touched") & pl.col("status").is_in(sorted(OPTED_OUT))).fill_null(False)
    frame = pairs.with_row_index("order").with_columns(first_status=status, first_rule=rule, from_start=from_start)
    # Most subscriptions meet one event of the file, and the first decision is theirs: the windows over each
    # subscription's events (costly over many small groups) are for the others.
    alone = ~frame.select(pl.struct(GROUP).is_duplicated()).to_series() & ~frame["from_start"]
    single = frame.filter(alone).with_columns(
        new_status=pl.col("first_status"),
        rule=pl.col("first_rule"),
        changed=pl.col("first_status").is_not_null(),
        old_status=pl.col("status"),
        old_status_at=pl.col("status_at"),
        old_source=pl.col("source"),
        old_reason=pl.col("stored_reason"),
    )
    single = single.with_columns(counted=pl.col("changed") & pl.col("status").is_in(OPTED_IN).fill_null(False))
    parts = [part.drop(*_WORK, strict=False) for part in (single, _in_sequence(frame.filter(~alone), status_source))]
    return pl.concat(parts, how="diagonal").sort("order").drop("order")


def _in_sequence(frame: pl.DataFrame, status_source: str) -> pl.DataFrame:
    """The events of subscriptions that meet several, or that an earlier batch changed, one after another."""
    changes = (~pl.col("from_start") & pl.col("first_status").is_not_null()).cast(pl.Int32)
    frame = frame.with_columns(changes=changes).with_columns(
        first=(pl.col("changes") == 1) & (pl.col("changes").cum_sum().over(GROUP) == 1),
        later=pl.col("from_start") | (pl.col("changes").cum_sum().over(GROUP) - pl.col("changes") > 0),
    )
    frame = frame.drop("changes").with_columns(_later_base()).with_columns(_later_change()).with_columns(_decided())
    return _with_state_before(frame, status_source)


def _first_decision(kind: pl.Expr, at: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """``decide_opt_out`` against the stored state: (new status or null, rule)."""
    target = opt_out_status(kind)
    newer_crm = pl.col("status_at") > at
    consented = newer_crm & pl.col("consent_at").is_not_null() & (pl.col("consent_at") > at)
    no_row, opted_out = pl.col("status").is_null(), pl.col("status").is_in(sorted(OPTED_OUT))
    status = pl.when(no_row).then(target).when(opted_out | consented).then(None).otherwise(target)
    rule = (
        pl.when(no_row)
        .then(pl.lit(NO_ROW))
        .when(opted_out)
        .then(pl.lit(ALREADY))
        .when(consented)
        .then(pl.lit(CONSENTED))
        .when(newer_crm)
        .then(pl.lit(NO_CONSENT))
        .otherwise(pl.lit(NEWER))
    )
    return status, rule


def _later_base() -> list[pl.Expr]:
    """The state the later events of a subscription start from: the stored one (changed by an earlier batch),
    or the one its first change left."""
    from_first = pl.col("first")
    return [
        pl.when(pl.col("from_start"))
        .then(pl.col("status_at"))
        .otherwise(pl.when(from_first).then(pl.col("at")).max().over(GROUP))
        .alias("base_at"),
        pl.when(pl.col("from_start"))
        .then(pl.col("status"))
        .otherwise(pl.when(from_first).then(pl.col("first_status")).max().over(GROUP))
        .alias("base_status"),
    ]


def _later_change() -> pl.Expr:
    """A later event changes the state when it is later than the state's time, which is the latest time seen
    since the base (an event either moves it forward or changes nothing)."""
    seen = pl.when(pl.col("later")).then(pl.col("at")).otherwise(pl.col("base_at"))
    before = seen.cum_max().shift(1).over(GROUP)
    state_at = pl.max_horizontal(pl.col("base_at"), before)
    return (pl.col("later") & (pl.col("at") > state_at)).fill_null(False).alias("changed_later")


def _decided() -> list[pl.Expr]:
    cleans = (pl.col("changed_later") & opt_out_status(pl.col("kind")).eq("cleaned")).cast(pl.Int32)
    cleaned = (pl.col("base_status") == "cleaned").fill_null(False) | (cleans.cum_sum().over(GROUP) > 0)
    later_status = pl.when(cleaned).then(pl.lit("cleaned")).otherwise(pl.lit("unsubscribed"))
    new_status = (
        pl.when(pl.col("later"))
        .then(pl.when(pl.col("changed_later")).then(later_status))
        .otherwise(pl.when(pl.col("first")).then(pl.col("first_status")))
    )
    rule = (
        pl.when(pl.col("later"))
        .then(pl.when(pl.col("changed_later")).then(pl.lit(LATER)).otherwise(pl.lit(EARLIER)))
        .otherwise(pl.col("first_rule"))
    )
    return [new_status.alias("new_status"), rule.alias("rule"), new_status.is_not_null().alias("changed")]


def _with_state_before(frame: pl.DataFrame, status_source: str) -> pl.DataFrame:
    """The state each change met: the change before it in the same subscription, or the stored row."""
    changed = pl.col("changed")
    previous = {
        "prev_at": pl.when(changed).then(pl.col("at")),
        "prev_status": pl.col("new_status"),
        "prev_reason": pl.when(changed).then(pl.col("reason")),
    }
    frame = frame.with_columns(**{name: expr.shift(1).forward_fill().over(GROUP) for name, expr in previous.items()})
    known = pl.col("prev_at").is_not_null()
    frame = frame.with_columns(
        old_status=pl.when(known).then(pl.col("prev_status")).otherwise(pl.col("status")),
        old_status_at=pl.when(known).then(pl.col("prev_at")).otherwise(pl.col("status_at")),
        old_source=pl.when(known).then(pl.lit(status_source)).otherwise(pl.col("source")),
        old_reason=pl.when(known).then(pl.col("prev_reason")).otherwise(pl.col("stored_reason")),
    )
    counted = changed & pl.col("old_status").is_in(OPTED_IN).fill_null(False)
    return frame.with_columns(counted=counted).drop("prev_at", "prev_status", "prev_reason")
