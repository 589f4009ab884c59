"""The sync rules as pure functions, and properties that hold for any sequence of events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from batchsync.rules import (
    OptOut,
    Subscription,
    decide_opt_out,
    email_key,
    email_problem,
    export_status,
    merge_statuses,
    suppresses,
    target_lists,
)

T = datetime(2026, 1, 5, tzinfo=UTC)
LISTS = ["newsletter", "offers", "events"]


def test_email_key_trims_and_lowercases() -> None:
    assert email_key("  Eve@Example.COM ") == "eve@example.com"


def test_email_problems_are_named() -> None:
    assert email_problem("eve@example.com") is None
    assert email_problem(" Eve@Example.com ") is None
    for bad in ("", "eve@", "eve.example.com", "eve@@example.com", "e ve@example.com", "eve@example"):
        assert email_problem(bad) is not None


def test_opt_out_newer_than_crm_state_wins() -> None:
    decision = decide_opt_out(Subscription("subscribed", T - timedelta(days=1), "crm"), OptOut("unsubscribe", T, "x"))
    assert decision.new_status == "unsubscribed"


def test_newer_resubscription_with_consent_stands_and_without_consent_loses() -> None:
    later = T + timedelta(days=1)
    with_consent = Subscription("subscribed", later, "crm", later, "web-form")
    assert decide_opt_out(with_consent, OptOut("unsubscribe", T, "x")).new_status is None
    without = Subscription("subscribed", later, "crm")
    assert decide_opt_out(without, OptOut("unsubscribe", T, "x")).new_status == "unsubscribed"


def test_hard_bounce_cleans_and_complaint_unsubscribes() -> None:
    current = Subscription("subscribed", T - timedelta(days=1), "crm")
    assert decide_opt_out(current, OptOut("hard_bounce", T, "8")).new_status == "cleaned"
    assert decide_opt_out(current, OptOut("complaint", T, "16")).new_status == "unsubscribed"
    assert decide_opt_out(None, OptOut("unsubscribe", T, "2")).new_status == "unsubscribed"


def test_bounces_and_complaints_reach_every_list_and_suppress() -> None:
    assert target_lists("hard_bounce", "offers", LISTS, False) == LISTS
    assert target_lists("complaint", "offers", LISTS, False) == LISTS
    assert target_lists("unsubscribe", "offers", LISTS, False) == ["offers"]
    assert target_lists("unsubscribe", "offers", LISTS, True) == LISTS
    assert suppresses("complaint", False) and suppresses("hard_bounce", True)
    assert not suppresses("hard_bounce", False) and not suppresses("unsubscribe", True)


def test_duplicates_merge_to_the_opt_out() -> None:
    assert merge_statuses(["subscribed", "unsubscribed"]) == "unsubscribed"
    assert merge_statuses(["pending", "subscribed"]) == "pending"


statuses = st.sampled_from(["subscribed", "unsubscribed", "pending", "cleaned"])
kinds = st.sampled_from(["unsubscribe", "hard_bounce", "complaint", "clean"])
offsets = st.integers(min_value=-1000, max_value=1000)
crm_changes = st.tuples(statuses, offsets, st.booleans())
provider_events = st.tuples(kinds, offsets)


@given(st.lists(st.one_of(crm_changes, provider_events), min_size=1, max_size=30))
def test_no_opt_out_is_lost(steps: list[tuple[object, ...]]) -> None:
    """After any mix of CRM changes and provider opt-outs, the CRM is opted out unless a consented
    re-subscription newer than the latest opt-out stands."""
    current: Subscription | None = None
    latest_opt_out: datetime | None = None
    for step in steps:
        if len(step) == 3:
            status, offset, consent = step
            at = T + timedelta(minutes=int(offset))  # type: ignore[call-overload]
            current = Subscription(status, at, "crm", at if consent else None, "who" if consent else None)  # type: ignore[arg-type]
        else:
            kind, offset = step
            at = T + timedelta(minutes=int(offset))  # type: ignore[call-overload]
            decision = decide_opt_out(current, OptOut(kind, at, "r"))  # type: ignore[arg-type]
            if decision.new_status is not None:
                current = Subscription(decision.new_status, at, "provider")
            latest_opt_out = at if latest_opt_out is None else max(latest_opt_out, at)
            assert current is not None
            if current.status not in ("unsubscribed", "cleaned"):
                assert current.status_at > at and current.consent_at is not None and current.consent_at > at


@given(statuses, st.booleans())
def test_a_suppressed_address_is_never_exported_as_subscribed(status: str, suppressed: bool) -> None:
    exported = export_status(status, suppressed)  # type: ignore[arg-type]
    if suppressed:
        assert exported in ("unsubscribed", "cleaned")
    else:
        assert exported == status


def test_the_safety_stop_needs_both_the_share_and_the_minimum() -> None:
    from batchsync.rules import safety_stop

    assert safety_stop({"news": 30}, {"news": 100}, 0.2, 10) is not None  # 30%, 30 addresses
    assert safety_stop({"news": 20}, {"news": 100}, 0.2, 10) is None  # exactly the share is allowed
    assert safety_stop({"news": 9}, {"news": 10}, 0.2, 10) is None  # under the minimum count
    assert "list news" in (safety_stop({"news": 50}, {"news": 60}, 0.2, 10) or "")
