"""The sync rules of DESIGN section 3, as pure functions: (current state, event) -> decision.

Nothing here touches a database, a file or the clock, so every rule can be checked in isolation::

    decide_opt_out(Subscription("subscribed", t0, "crm"), OptOut("unsubscribe", t1, "link"))
    # -> Decision(new_status="unsubscribed", rule="opt-out newer than CRM state")

The surprising parts, written down: an opt-out for a list the contact has no row for still creates an
unsubscribed row (an opt-out is never dropped), and a CRM re-subscription only stands against an older opt-out
when it carries consent given after that opt-out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

Status = Literal["subscribed", "unsubscribed", "pending", "cleaned"]
EventKind = Literal["unsubscribe", "hard_bounce", "complaint", "clean"]
OPTED_OUT: frozenset[str] = frozenset({"unsubscribed", "cleaned"})
OPT_OUT_KINDS: frozenset[str] = frozenset({"unsubscribe", "hard_bounce", "complaint", "clean"})
# Which status wins when several CRM contacts share one email: any opt-out beats any opt-in.
PRECEDENCE: tuple[Status, ...] = ("cleaned", "unsubscribed", "pending", "subscribed")

_EMAIL = re.compile(r"^[^@\s\"(),:;<>\[\\\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")


def email_key(email: str) -> str:
    """The match key of an address: trimmed and lower-cased."""
    return email.strip().lower()


def email_problem(email: str) -> str | None:
    """Why an address cannot be sent to, or None when it looks deliverable."""
    key = email_key(email)
    if not key:
        return "empty email"
    if len(key) > 254:
        return "email longer than 254 characters"
    if not _EMAIL.match(key) or ".." in key:
        return f"invalid email {email.strip()!r}"
    return None


class Subscription(NamedTuple):
    """The CRM's state of one contact on one list (a tuple: an import reads hundreds of thousands)."""

    status: Status
    status_at: datetime
    source: str
    consent_at: datetime | None = None
    consent_by: str | None = None


@dataclass(frozen=True)
class OptOut:
    """An opt-out reported by the provider at ``at`` (UTC)."""

    kind: EventKind
    at: datetime
    reason: str


class Decision(NamedTuple):
    new_status: Status | None  # None: leave the subscription as it is
    rule: str


def opt_out_status(kind: EventKind) -> Status:
    return "cleaned" if kind in ("hard_bounce", "clean") else "unsubscribed"


def decide_opt_out(current: Subscription | None, event: OptOut) -> Decision:
    """Opt-outs move one way: they win over every CRM state older than the event."""
    target = opt_out_status(event.kind)
    if current is None:
        return Decision(target, "opt-out for a list without CRM row: recorded")
    if current.status in OPTED_OUT:
        return Decision(None, "already opted out")
    if current.status_at > event.at and _has_consent_after(current, event.at):
        return Decision(None, "newer CRM re-subscription with consent stands")
    if current.status_at > event.at:
        return Decision(target, "opt-out wins: newer CRM state carries no consent")
    return Decision(target, "opt-out newer than CRM state")


def _has_consent_after(current: Subscription, moment: datetime) -> bool:
    return bool(current.consent_by) and current.consent_at is not None and current.consent_at > moment


def suppresses(kind: EventKind, hard_bounce_suppresses: bool) -> bool:
    """Whether the event puts the address on the global do-not-mail list."""
    if kind == "complaint":
        return True
    return kind in ("hard_bounce", "clean") and hard_bounce_suppresses


def target_lists(
    kind: EventKind, event_list: str | None, profile_lists: Sequence[str], unsubscribe_all_lists: bool
) -> list[str]:
    """The CRM lists an event applies to. Bounces and complaints leave every list, as MailUp does."""
    if event_list is None or kind != "unsubscribe" or unsubscribe_all_lists:
        return list(profile_lists)
    return [event_list]


def export_status(status: Status, suppressed: bool) -> Status:
    """A suppressed address is never exported as subscribed (nor pending)."""
    if suppressed and status not in OPTED_OUT:
        return "unsubscribed"
    return status


def merge_statuses(statuses: Iterable[Status]) -> Status:
    """One status for several contacts sharing an email: unsubscribed wins."""
    present = set(statuses)
    for status in PRECEDENCE:
        if status in present:
            return status
    raise ValueError("merge_statuses needs at least one status")


def soft_bounce_cleans(soft_bounces_so_far: int, threshold: int) -> bool:
    """A soft bounce is counted; the one that reaches the profile's threshold cleans the address."""
    return soft_bounces_so_far + 1 >= threshold


def email_change_conflict(contact_ids: Sequence[int], owners_of_new: Sequence[int]) -> int | None:
    """The other contact that already owns the new address, if any: then the change is refused."""
    others = [owner for owner in owners_of_new if owner not in contact_ids]
    return others[0] if others else None


def consented_export(status: Status, known_to_provider: str | None, pending_supported: bool) -> Status | None:
    """What to send for a CRM status, given what the provider last had from us or told us.

    A re-subscription after an opt-out the provider knows goes out as pending (double opt-in) where the
    provider has that status, and is not sent at all where it has not: never as subscribed.
    """
    if status == "subscribed" and known_to_provider in OPTED_OUT:
        return "pending" if pending_supported else None
    if status == "subscribed" and known_to_provider == "pending":
        return "pending"  # sent as pending for consent: the provider's confirmation moves it, not the CRM
    return status


def safety_stop(
    opted_out: Mapping[str, int], subscribed: Mapping[str, int], max_share: float, minimum: int
) -> str | None:
    """Why a file may not be applied unasked: it opts out too large a share of a list's subscribed addresses
    (``opted_out`` per list, against ``subscribed`` before the file), or None."""
    for code, count in opted_out.items():
        base = subscribed.get(code, 0)
        share = count / max(base, 1)
        if count >= minimum and share > max_share:
            return (
                f"safety stop: the file would opt out {count} of the {base} subscribed addresses of list {code} "
                f"({share:.0%}, over the profile's {max_share:.0%}); nothing applied. Check the file, then import "
                "it with --force"
            )
    return None
