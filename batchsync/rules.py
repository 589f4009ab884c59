"""The sync rules (docs/architecture.md, "Sync rules"), as pure functions: (current state, event) -> decision.

Nothing here touches a database, a file or the clock, so every rule can be checked in isolation::

    decide_opt_out(Subscription("subscribed", t0, "crm"), OptOut("unsubscribe", t1, "link"))
    # -> Decision(new_status="unsubscribed", rule="opt-out newer than CRM state")

The surprising parts, written down: an opt-out for a list the contact has no row for still creates an
unsubscribed row (an opt-out is never dropped); a CRM re-subscription only stands against an older opt-out
when it carries consent given after that opt-out; and an address the provider reported opted out is never
exported as subscribed again (:func:`export_decision`), whatever the CRM says, until the provider itself
reports a re-subscription.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

Status = Literal["subscribed", "unsubscribed", "pending", "cleaned"]
# Every event an inbound row can be; the opt-outs among them (OPT_OUT_KINDS) are the ones the rules below weigh.
EventKind = Literal[
    "unsubscribe",
    "subscribe",
    "hard_bounce",
    "soft_bounce",
    "complaint",
    "clean",
    "email_change",
    "open",
    "click",
    "update",
    "ignore",
]
OPTED_OUT: frozenset[str] = frozenset({"unsubscribed", "cleaned"})
OPT_OUT_KINDS: frozenset[str] = frozenset({"unsubscribe", "hard_bounce", "complaint", "clean"})
# Which status wins when several CRM contacts share one email: any opt-out beats any opt-in.
PRECEDENCE: tuple[Status, ...] = ("cleaned", "unsubscribed", "pending", "subscribed")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 and C1 control characters, NUL included
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
    if _CONTROL.search(key):
        return f"email with a control character {email.strip()!r}"
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
    reason: str | None = None  # kept so that a revert can put it back; no rule reads it


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


def decide_later_in_file(current: Subscription, event: OptOut) -> Decision:
    """A second opt-out for one contact and list in one file (``current`` is what the file's earlier row left):
    the latest event in time stands, whatever the order of the rows, so the CRM keeps the time of the last
    opt-out (a later consent is weighed against it); cleaned stays cleaned."""
    if event.at > current.status_at:
        stronger: Status = "cleaned" if "cleaned" in (current.status, opt_out_status(event.kind)) else "unsubscribed"
        return Decision(stronger, "a later opt-out in the same file")  # a bounce is not undone by an unsubscribe
    return Decision(None, "an earlier opt-out than one this file already applied")


def _has_consent_after(current: Subscription, moment: datetime) -> bool:
    return bool(current.consent_by) and current.consent_at is not None and current.consent_at > moment


def export_decision(
    status: Status, provider_opt_out: datetime | None, consent_at: datetime | None, pending_supported: bool
) -> Status | None:
    """What to send for an address's CRM status on a list, given the provider's last opt-out of it (remembered
    for good) and the consent the CRM holds (the earliest of its contacts', None without): an address the
    provider opted out is never sent as subscribed. With consent given after that opt-out it goes out as
    pending (double opt-in) where the provider has a pending status; otherwise it is not sent at all."""
    if provider_opt_out is None or status not in ("subscribed", "pending"):
        return status
    if consent_at is not None and consent_at > provider_opt_out and pending_supported:
        return "pending"
    return None


TOMBSTONE = "tombstone"  # the ledger's status of an address that left the list
LIVE: frozenset[str] = frozenset({"subscribed", "pending"})  # the provider has the address from us on the list


class Exported(NamedTuple):
    """The export ledger's row of an address on a list: what the provider has from us."""

    status: str  # a Status, or TOMBSTONE
    fingerprint: int | None  # of the row's content, status aside (None: not comparable, say after an upgrade)
    origin: str  # "export": what we sent; "provider": what it reported; "consent": sent as pending


class CrmRow(NamedTuple):
    """An address's row on a list as the CRM has it now, built for the provider."""

    status: Status  # merged over its contacts, suppression applied
    decided: Status | None  # what export_decision lets go out (None: nothing)
    fingerprint: int
    provider_opt_out: bool  # the provider's opt-out of the address is remembered
    from_provider: bool  # every contact's status was last set by the provider


class ExportStep(NamedTuple):
    write: bool  # a row goes into the file
    tombstone: bool  # that row is a tombstone: the address left the list
    takes_off: bool  # it takes an address the provider has from us as subscribed off the list
    ledger: Exported | None  # the ledger's row after the upload (None: no row)


def export_step(row: CrmRow | None, known: Exported | None, full: bool, tombstones: bool) -> ExportStep:
    """What an export does with one address on one list, given the ledger's row: a full export writes every row
    it may send, a diff the changed ones (another fingerprint or status, or none in the ledger) that the
    provider does not know already (an opt-out it reported itself, for an address it does not have from us as
    subscribed: an echo would be harmless, but a missing opt-out where it has one is not); an address that
    left the list gets a tombstone where the provider has it from us as subscribed and the format can say so."""
    if row is None:
        if known is None or known.status == TOMBSTONE:
            return ExportStep(False, False, False, known)
        stone = known.status in LIVE and tombstones
        return ExportStep(stone, stone, stone, Exported(TOMBSTONE, 0, "export"))
    if row.decided is None:
        return ExportStep(False, False, False, known)
    live = known is not None and known.status in LIVE
    changed = known is None or known.fingerprint != row.fingerprint or known.status != row.decided
    opted = row.decided in OPTED_OUT
    reported = row.provider_opt_out or (known is None and row.from_provider)
    write = full or (changed and not (opted and not live and reported))
    if not changed:
        return ExportStep(write, False, write and opted and live, known)
    if row.decided == "pending" and row.status == "subscribed":
        origin = "consent"  # a re-subscription sent as pending: it stays so until the provider confirms
    elif known is not None and known.origin == "provider" and opted:
        origin = "provider"
    else:
        origin = "export"
    return ExportStep(write, False, write and opted and live, Exported(row.decided, row.fingerprint, origin))


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


def safety_stop(
    opted_out: Mapping[str, int], subscribed: Mapping[str, int], max_share: float, minimum: int
) -> str | None:
    """Why a file may not be applied unasked: it opts out too large a share of a list's subscribed addresses
    (``opted_out`` per list, against ``subscribed`` before the file), or None."""
    for code, count in opted_out.items():
        if over_share(count, subscribed.get(code, 0), max_share, minimum):
            base = subscribed.get(code, 0)
            return (
                f"safety stop: the file would opt out {count} of the {base} subscribed addresses of list {code} "
                f"({count / max(base, 1):.0%}, over the profile's {max_share:.0%}); nothing applied. Check the "
                "file, then import it with --force"
            )
    return None


def export_safety_stop(code: str, opted_out: int, subscribed: int, max_share: float, minimum: int) -> str | None:
    """Why an export may not be uploaded unasked: it would take off (opt-outs and tombstones) too large a share of
    the ``subscribed`` addresses a list has at the provider from us, or None. The provider may never undo it."""
    if not over_share(opted_out, subscribed, max_share, minimum):
        return None
    return (
        f"safety stop: the export would take {opted_out} of the {subscribed} addresses list {code} has at the "
        f"provider off it ({opted_out / max(subscribed, 1):.0%}, over the profile's {max_share:.0%}); nothing "
        "uploaded. Check the CRM (a table emptied, a list cleared?), then export with --force"
    )


def over_share(count: int, base: int, max_share: float, minimum: int) -> bool:
    return count >= minimum and count / max(base, 1) > max_share
