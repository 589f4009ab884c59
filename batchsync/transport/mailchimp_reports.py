"""What Mailchimp reports, asked for through its API and written as files for collect (see ``mailchimp``).

    reports = MemberReports(profile, clock, api, inbox)
    reports.fetch("members")      # members changed since the last collect, a file per report stream
    reports.fetch("activity")     # opens, clicks and bounces of recent campaigns since the last collect

Members: ``GET /lists/{id}/members?status=&since_last_changed=`` per stream (``subscribed``, ``subscribes``: those
who opted in within the window, ``unsubscribed``, ``cleaned``), written as Mailchimp's audience export is named and
headed. Activity: ``GET /campaigns`` (sent, the audience, ``since_send_time``), then each campaign's
``GET /reports/{id}/email-activity?since=``. A stream's window starts a few minutes into the last one (clocks
differ); it moves on only when collect has applied the file (``ReportInbox``).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.transport.api import ReportInbox
from batchsync.transport.http import ApiClient

log = logging.getLogger(__name__)
PAGE = 1000  # the largest ``count`` a collection takes
# Report streams: the file name's first word, and the member status it lists. "subscribes" lists the subscribed
# members who opted in within the window, for a kind whose event is a subscribe (sign-ups: create_contacts).
REPORTS = (
    ("subscribed", "subscribed"),
    ("subscribes", "subscribed"),
    ("unsubscribed", "unsubscribed"),
    ("cleaned", "cleaned"),
)
TIME = "%Y-%m-%d %H:%M:%S"  # the audience export's times, UTC
OVERLAP = timedelta(minutes=5)  # a window starts this long before the last one ended: late writes are not missed
ACTIVITY_DAYS = timedelta(days=30)  # a campaign's opens and clicks are read for this long after it is sent
ACTIVITY_HEADER = ["Email Address", "CAMPAIGN_ID", "ACTION", "TIMESTAMP", "URL", "LIST_ID"]


@dataclass
class MemberReports:
    profile: Profile
    clock: Clock
    api: ApiClient
    inbox: ReportInbox

    def fetch(self, folder: str) -> None:
        if folder == "activity":
            for config in self.profile.lists.values():
                self._fetch_activity(folder, config.id)
            return
        for code, config in self.profile.lists.items():
            for word, status in REPORTS:
                if self._taken(folder, word, config.id):
                    self._fetch(folder, code, config.id, word, status)

    def _taken(self, folder: str, word: str, list_id: str) -> bool:
        """Some inbound kind of the folder takes this stream's files (the others are not asked for)."""
        name = report_name(word, list_id, self.clock.now())
        return any(kind.remote_dir == folder and kind.matches(name) for kind in self.profile.inbound)

    def _fetch(self, folder: str, code: str, list_id: str, word: str, status: str) -> None:
        stream = f"{list_id}.{word}"
        if self.inbox.waiting(folder, stream):
            return
        since = self.inbox.cursor(folder, stream)
        upto = self.clock.now()
        start = since - OVERLAP if since else None
        changed = {"since_last_changed": _iso(start)} if start is not None else {}
        members = self._pages(f"/lists/{list_id}/members", "members", status=status, **changed)
        if word == "subscribes":  # a sign-up is an opt-in (in the window), not any change; none without its time
            members = [m for m in members if (opted := _opted_in(m)) is not None and (start is None or opted > start)]
        if not members:
            self.inbox.advance(folder, stream, upto)  # nothing changed in the window: nothing to apply
            return
        name = report_name(word, list_id, upto)
        self.inbox.add(folder, name, stream, upto, lambda part: _write_members(part, members, list_id, word))
        log.info("Mailchimp audience %s (%s): %d %s members since %s", list_id, code, len(members), status, since)

    def _pages(self, path: str, key: str, **params: str) -> list[dict[str, Any]]:
        """Every item of a paged collection."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.api.call("GET", path, params={**params, "count": PAGE, "offset": len(found)}).body
            items = page.get(key) or []
            found += items
            if not items or len(found) >= int(page.get("total_items", 0)):
                return found

    # --- campaign email activity ---------------------------------------------------------------------------

    def _fetch_activity(self, folder: str, list_id: str) -> None:
        """Opens, clicks and bounces in the audience's campaigns sent in the last ACTIVITY_DAYS, since the last
        collect (GET /campaigns, then GET /reports/{id}/email-activity)."""
        stream = f"{list_id}.activity"
        if self.inbox.waiting(folder, stream):
            return
        since, upto = self.inbox.cursor(folder, stream), self.clock.now()
        sent_since = (since or upto) - ACTIVITY_DAYS
        campaigns = self._pages(
            "/campaigns", "campaigns", status="sent", list_id=list_id, since_send_time=_iso(sent_since)
        )
        rows = [
            [
                email["email_address"],
                campaign["id"],
                _action(event),
                _time(event.get("timestamp")),
                event.get("url", ""),
                list_id,
            ]
            for campaign in campaigns
            for email in self._pages(f"/reports/{campaign['id']}/email-activity", "emails", **_since(since))
            for event in email.get("activity") or []
        ]
        if not rows:
            self.inbox.advance(folder, stream, upto)
            return
        name = f"email_activity_{list_id}_{upto.astimezone(UTC):%Y%m%dT%H%M%SZ}.csv"
        self.inbox.add(folder, name, stream, upto, lambda part: _write_rows(part, ACTIVITY_HEADER, rows))
        log.info(
            "Mailchimp audience %s: %d activities in %d campaigns since %s", list_id, len(rows), len(campaigns), since
        )


def _opted_in(member: dict[str, Any]) -> datetime | None:
    """When the member opted in (``timestamp_opt``, else ``timestamp_signup``); None where Mailchimp does not say."""
    value = member.get("timestamp_opt") or member.get("timestamp_signup")
    return datetime.fromisoformat(str(value)).astimezone(UTC) if value else None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _since(since: datetime | None) -> dict[str, str]:
    return {"since": _iso(since - OVERLAP)} if since is not None else {}


def _action(event: dict[str, Any]) -> str:
    """open, click, or bounce_hard / bounce_soft (the kind's codes make them events)."""
    action = str(event.get("action", ""))
    return f"bounce_{event.get('type') or 'soft'}" if action == "bounce" else action


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def report_name(word: str, list_id: str, upto: datetime) -> str:
    return f"{word}_email_audience_export_{list_id}_{upto.astimezone(UTC):%Y%m%dT%H%M%SZ}.csv"


def _write_members(path: Path, members: list[dict[str, Any]], list_id: str, word: str) -> None:
    """The members as an audience export has them, and the stream's word in ``REPORT`` (two streams of the same
    members are two reports, not one file twice)."""
    tags = sorted({tag for member in members for tag in (member.get("merge_fields") or {})})
    header = ["Email Address", *tags, "OPTIN_TIME", "LAST_CHANGED", "UNSUB_TIME", "UNSUB_REASON", "CLEAN_TIME"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "TAGS", "LIST_ID", "REPORT"])
        for member in members:
            merge = member.get("merge_fields") or {}
            changed = _time(member.get("last_changed"))
            status = member.get("status")
            writer.writerow(
                [
                    member.get("email_address", ""),
                    *(_cell(merge.get(tag)) for tag in tags),
                    _time(member.get("timestamp_opt") or member.get("timestamp_signup")),
                    changed,
                    changed if status == "unsubscribed" else "",
                    member.get("unsubscribe_reason") or "",
                    changed if status == "cleaned" else "",
                    ",".join(str(tag.get("name", "")) for tag in member.get("tags") or []),
                    list_id,
                    word,
                ]
            )


def _time(value: Any) -> str:
    """An API time (ISO 8601 with offset) as the audience export writes it (UTC, seconds)."""
    if not value:
        return ""
    return datetime.fromisoformat(str(value)).astimezone(UTC).strftime(TIME)


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else "" if value is None else str(value)
