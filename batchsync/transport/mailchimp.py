"""Mailchimp through its Marketing API 3.0: an export's rows as batch operations, its members' changes as reports.

    transport = MailchimpTransport(profile, clock, api_key)   # "<32 hex>-us19": the key names its data centre
    transport.submit([export_csv], "newsletter")              # batches posted, polled, their results read
    transport.list("members")                                 # who changed since the last collect, as CSVs

Outbound, each row of an export file becomes ``PUT /lists/{list_id}/members/{subscriber_hash}`` (an upsert by the
MD5 of the lower-cased address) with ``status_if_new`` and ``status`` and the row's merge fields (every column
but the address, status and groups is a merge tag, its header the tag), then, where the list maps groups, a
``POST .../tags`` marking each of the list's group tags active or inactive. A tombstone or opt-out goes as
``unsubscribed`` (Mailchimp's ``cleaned`` is its own verdict, not one to send). Rows go in batches of
``transport.batch_size`` (``POST /batches``); each batch is polled until ``finished`` and its results archive
(a gzipped tar of JSON arrays of ``{status_code, operation_id, response}``) says which rows were refused and why.
An operation id is the row's line in the file.

Mailchimp refuses ``subscribed`` for a member it holds as unsubscribed or cleaned ("Member In Compliance
State"); batchsync never asks it to: the export sends an address the provider opted out only as ``pending``
(Mailchimp's confirmation email), and only with consent given after the opt-out.

Inbound, ``list("members")`` asks each audience for the members whose ``last_changed`` is after the last collect
(``since_last_changed``), one file per report stream the profile's inbound kinds take (``subscribed``,
``subscribes``, ``unsubscribed``, ``cleaned``), named and headed as Mailchimp's audience export is
(``unsubscribed_email_audience_export_<list id>_<stamp>.csv``): ``Email Address``, the merge tags,
``OPTIN_TIME`` (``timestamp_opt``, else ``timestamp_signup``, else ``last_changed``), ``LAST_CHANGED``,
``UNSUB_TIME``, ``UNSUB_REASON``, ``CLEAN_TIME``, ``TAGS``, ``LIST_ID``, ``REPORT`` (the stream).

Where a kind of the profile reads the folder ``activity``, the opens, clicks and bounces of each audience's
campaigns sent in the last 30 days, since the last collect (``GET /campaigns``, then
``GET /reports/{id}/email-activity`` with ``since``), become ``email_activity_<list id>_<stamp>.csv``
(``Email Address``, ``CAMPAIGN_ID``, ``ACTION``: open, click, bounce_hard or bounce_soft, ``TIMESTAMP``, ``URL``).

Sources: the Marketing API reference (https://mailchimp.com/developer/marketing/api/list-members/ ,
.../api/batch-operations/ , .../api/list-member-tags/ , .../docs/errors/), the batch guide
(https://mailchimp.com/developer/marketing/guides/run-async-requests-batch-endpoint/ : "a limit of 10 concurrent
connections"), the subscriber-hash guide, and Mailchimp's generated Python client (mailchimp-marketing-python,
api_client.py: the data centre is the key's suffix after "-", Basic auth with the key as password).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import ConfigError, TransportError
from batchsync.transport.api import ApiTransport, Finding, Rejected, Submission
from batchsync.transport.http import ApiClient, ApiRefusal

log = logging.getLogger(__name__)
MEMBER_PAGE = 1000  # the largest ``count`` GET members takes
# Report streams: the file name's first word, and the member status it lists. "subscribes" lists the subscribed
# members who opted in within the window, for a kind whose event is a subscribe (sign-ups: create_contacts).
REPORTS = (
    ("subscribed", "subscribed"),
    ("subscribes", "subscribed"),
    ("unsubscribed", "unsubscribed"),
    ("cleaned", "cleaned"),
)
TIME = "%Y-%m-%d %H:%M:%S"  # the audience export's times, UTC
OVERLAP = timedelta(minutes=5)
ACTIVITY_DAYS = timedelta(days=30)  # a campaign's opens and clicks are read for this long after it is sent
ACTIVITY_HEADER = [
    "Email Address",
    "CAMPAIGN_ID",
    "ACTION",
    "TIMESTAMP",
    "URL",
]  # a window starts this long before the last one ended: late writes are not missed
SENT_AS = {"subscribed": "subscribed", "pending": "pending", "unsubscribed": "unsubscribed", "cleaned": "unsubscribed"}


@dataclass
class Row:
    """One row of an export file: its line, address, status (batchsync's word), groups and merge fields."""

    line: int
    email: str = ""
    status: str = "subscribed"
    groups: set[str] = field(default_factory=set)
    merge: dict[str, str] = field(default_factory=dict)


def subscriber_hash(email: str) -> str:
    """Mailchimp's id of a member: the MD5 of the lower-cased address."""
    return hashlib.md5(email.strip().lower().encode("utf-8"), usedforsecurity=False).hexdigest()


def api_url(api_key: str) -> str:
    """The API's base URL for a key ``<key>-<dc>``."""
    _, _, centre = api_key.rpartition("-")
    if not centre.isalnum():
        raise ConfigError('the Mailchimp API key does not end in its data centre ("...-us19")')
    return f"https://{centre}.api.mailchimp.com/3.0"


class MailchimpTransport(ApiTransport):
    report_folders = ("members", "activity")

    def __init__(self, profile: Profile, clock: Clock, api_key: str) -> None:
        super().__init__(profile, clock)
        if not api_key:
            raise ConfigError(f"profile {profile.name}: the Mailchimp transport needs api_key_env or api_key_file")
        config = profile.transport
        self.api = ApiClient(
            config.url or api_url(api_key),
            clock,
            retries=config.retries,
            timeout=config.timeout_seconds,
            auth=("batchsync", api_key),
            max_connections=config.max_connections,
            name="Mailchimp",
        )

    @property
    def calls(self) -> int:
        return self.api.calls

    def connect(self) -> None:
        self.api.call("GET", "/ping")

    def close(self) -> None:
        self.api.close()

    def check(self) -> Iterator[Finding]:
        where = f"Mailchimp API {self.api.base_url}"
        try:
            self.api.call("GET", "/ping")
        except TransportError as exc:
            yield Finding(where, False, f"{exc}: check the API key (api_key_env or api_key_file)")
            return
        yield Finding(where, True, "answers; API key accepted")
        mapped = [c.header for c in self.profile.export.columns if c.field not in ("email", "status", "groups")]
        for code, config in self.profile.lists.items():
            name = f"audience {config.id} (lists.{code})"
            try:
                audience = self.api.call("GET", f"/lists/{config.id}").body
                fields = self.api.call("GET", f"/lists/{config.id}/merge-fields", params={"count": 1000}).body
            except ApiRefusal as exc:
                yield Finding(name, False, f"{exc.reason}: check lists.{code}.id (Audience > Settings)")
                continue
            yield Finding(name, True, f"exists: {audience.get('name', '')}")
            tags = {str(field.get("tag")) for field in fields.get("merge_fields") or []}
            missing = [tag for tag in mapped if tag not in tags]
            if missing:
                advice = "add them (Audience > Settings > Audience fields and merge tags) or drop the columns"
                yield Finding(f"merge fields of {config.id}", False, f"missing: {', '.join(missing)}: {advice}")
            else:
                yield Finding(f"merge fields of {config.id}", True, f"every mapped tag there ({', '.join(mapped)})")

    # --- out: an export's rows -----------------------------------------------------------------------------

    def submit(self, files: list[Path], list_code: str) -> Submission:
        list_id = self.profile.lists[list_code].id
        submission = Submission()
        for path in files:
            for rows in _chunks(self._rows(path), self.profile.transport.batch_size):
                operations = [op for row in rows for op in self._operations(list_id, list_code, row)]
                refused = self._run_batch(operations)
                emails = {row.line: row.email for row in rows}
                for line, reason in sorted(refused.items()):
                    submission.rejected.append(Rejected(line, emails[line], reason))
                submission.accepted += len(rows) - len(refused)
        return submission

    def _rows(self, path: Path) -> Iterator[Row]:
        """The rows of an export file, each with its line number (the header is line 1)."""
        export = self.profile.export
        fields = {column.header: column.field for column in export.columns}
        values = {value: status for status, value in export.status_values.items()}
        with path.open(encoding=export.encoding, newline="") as handle:
            reader = csv.reader(handle, delimiter=export.delimiter, quotechar=export.quote)
            header = next(reader)
            for line, cells in enumerate(reader, start=2):
                row = Row(line)
                for name, cell in zip(header, cells, strict=False):
                    field = fields.get(name, name)
                    if field == "email":
                        row.email = cell
                    elif field == "groups":
                        row.groups = {part.strip() for part in cell.split(export.group_separator) if part.strip()}
                    elif field == "status":
                        row.status = values.get(cell, cell)
                    else:
                        row.merge[name] = cell
                yield row

    def _operations(self, list_id: str, list_code: str, row: Row) -> list[dict[str, Any]]:
        status = SENT_AS.get(row.status, "unsubscribed")
        path = f"/lists/{list_id}/members/{subscriber_hash(row.email)}"
        body: dict[str, Any] = {"email_address": row.email, "status_if_new": status, "status": status}
        if status != "unsubscribed":
            body["merge_fields"] = row.merge
        operations = [{"method": "PUT", "path": path, "operation_id": str(row.line), "body": json.dumps(body)}]
        groups = self.profile.lists[list_code].groups
        if groups and status != "unsubscribed":
            tags = [{"name": tag, "status": "active" if tag in row.groups else "inactive"} for tag in groups.values()]
            tagged = {"method": "POST", "path": path + "/tags", "body": json.dumps({"tags": tags})}
            operations.append({**tagged, "operation_id": f"{row.line}:tags"})
        return operations

    def _run_batch(self, operations: list[dict[str, Any]]) -> dict[int, str]:
        """Post one batch, wait for it, and return the refused rows: line -> Mailchimp's reason."""
        batch = self.api.call("POST", "/batches", json_body={"operations": operations}).body
        finished = self._wait(str(batch["id"]))
        refused: dict[int, str] = {}
        for result in _results(self.api, str(finished.get("response_body_url") or "")):
            if int(result.get("status_code", 500)) >= 400:
                line = int(str(result.get("operation_id", "0")).split(":")[0])
                refused.setdefault(line, _reason(result))
        if finished.get("errored_operations") and not refused:
            raise TransportError(f"Mailchimp batch {batch['id']}: errors counted but no results read")
        return refused

    def _wait(self, batch_id: str) -> dict[str, Any]:
        config = self.profile.transport
        deadline = self.clock.monotonic() + config.job_timeout_seconds
        delay = config.poll_seconds
        while True:
            batch: dict[str, Any] = self.api.call("GET", f"/batches/{batch_id}").body
            if batch.get("status") == "finished":
                return batch
            if self.clock.monotonic() >= deadline:
                raise TransportError(
                    f"Mailchimp batch {batch_id} not finished after {config.job_timeout_seconds:.0f} s "
                    f"({batch.get('finished_operations', 0)} of {batch.get('total_operations', '?')} operations)"
                )
            self.clock.sleep(delay)
            delay = min(delay * 2, 60.0)

    # --- in: members changed since the last collect ----------------------------------------------------------

    def fetch_reports(self, folder: str) -> None:
        if folder == "activity":
            for config in self.profile.lists.values():
                self._fetch_activity(folder, config.id)
            return
        wanted = [(word, status) for word, status in REPORTS if self._taken(folder, word)]
        for code, config in self.profile.lists.items():
            for word, status in wanted:
                self._fetch(folder, code, config.id, word, status)

    def _taken(self, folder: str, word: str) -> bool:
        """Some inbound kind of the folder takes this stream's files (the others are not asked for)."""
        name = report_name(word, "x", datetime(2000, 1, 1, tzinfo=UTC))
        return any(kind.remote_dir == folder and kind.matches(name) for kind in self.profile.inbound)

    def _fetch(self, folder: str, code: str, list_id: str, word: str, status: str) -> None:
        stream = f"{list_id}.{word}"
        since = self.inbox.cursor(folder, stream)
        upto = self.clock.now()
        start = since - OVERLAP if since else None
        members = list(self._members(list_id, status, start))
        if word == "subscribes" and start is not None:  # a sign-up is an opt-in in the window, not any change
            members = [member for member in members if _opted_in(member) > start]
        if not members:
            self.inbox.advance(folder, stream, upto)  # nothing changed in the window: nothing to apply
            return
        name = report_name(word, list_id, upto)
        self.inbox.add(folder, name, stream, upto, lambda part: _write_members(part, members, list_id, word))
        log.info("Mailchimp audience %s (%s): %d %s members since %s", list_id, code, len(members), status, since)

    def _members(self, list_id: str, status: str, since: datetime | None) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            params: dict[str, Any] = {"status": status, "count": MEMBER_PAGE, "offset": offset}
            if since is not None:
                params["since_last_changed"] = since.astimezone(UTC).isoformat(timespec="seconds")
            page = self.api.call("GET", f"/lists/{list_id}/members", params=params).body
            members = page.get("members") or []
            yield from members
            offset += len(members)
            if not members or offset >= int(page.get("total_items", 0)):
                return

    # --- in: campaign email activity ---------------------------------------------------------------------------

    def _fetch_activity(self, folder: str, list_id: str) -> None:
        """Opens, clicks and bounces in the audience's campaigns sent in the last ACTIVITY_DAYS, since the last
        collect (GET /campaigns, then GET /reports/{id}/email-activity)."""
        stream = f"{list_id}.activity"
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

    def _pages(self, path: str, key: str, **params: str) -> list[dict[str, Any]]:
        """Every item of a paged collection."""
        found: list[dict[str, Any]] = []
        while True:
            page = self.api.call("GET", path, params={**params, "count": MEMBER_PAGE, "offset": len(found)}).body
            items = page.get(key) or []
            found += items
            if not items or len(found) >= int(page.get("total_items", 0)):
                return found


def _opted_in(member: dict[str, Any]) -> datetime:
    """When the member opted in (``timestamp_opt``, else ``timestamp_signup``, else ``last_changed``)."""
    value = member.get("timestamp_opt") or member.get("timestamp_signup") or member.get("last_changed")
    return datetime.fromisoformat(str(value)).astimezone(UTC) if value else datetime.min.replace(tzinfo=UTC)


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
                    _time(member.get("timestamp_opt") or member.get("timestamp_signup")) or changed,
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


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _results(api: ApiClient, url: str) -> Iterator[dict[str, Any]]:
    """The operations' results from a finished batch's archive (no API key goes to its storage host)."""
    if not url:
        raise TransportError("a finished Mailchimp batch gave no results archive")
    archive = api.call("GET", url, anonymous=True).body
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                yield from json.load(handle)


def _reason(result: dict[str, Any]) -> str:
    """Mailchimp's reason for a refused operation: the problem document's title, detail and field errors."""
    try:
        body = json.loads(result.get("response") or "{}")
    except ValueError:
        return f"HTTP {result.get('status_code')}: {str(result.get('response'))[:200]}"
    parts = [str(body[key]) for key in ("title", "detail") if body.get(key)]
    parts += [f"{e.get('field', '')}: {e.get('message', '')}" for e in body.get("errors") or [] if isinstance(e, dict)]
    return "; ".join(parts) or f"HTTP {result.get('status_code')}"
