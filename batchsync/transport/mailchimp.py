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

A subscribed row goes with ``status_if_new`` alone: a new member is subscribed, an existing one keeps the status
Mailchimp holds (a pending member still confirms; an unsubscribed or cleaned one stays so, and its row is
reported refused, since the CRM has it subscribed). ``status`` is sent only as ``pending`` (Mailchimp's
confirmation mail: the export sends an address the provider opted out so, and only with consent given after the
opt-out) or ``unsubscribed``.

Inbound, ``list("members")`` and ``list("activity")`` ask what Mailchimp reports since the last collect
(``mailchimp_reports``: members changed, by status; campaign opens, clicks and bounces) as files for collect.

Sources: the Marketing API reference (https://mailchimp.com/developer/marketing/api/list-members/ ,
.../api/batch-operations/ , .../api/list-member-tags/ , .../docs/errors/), the batch guide
(https://mailchimp.com/developer/marketing/guides/run-async-requests-batch-endpoint/ : "a limit of 10 concurrent
connections"), the subscriber-hash guide, and Mailchimp's generated Python client (mailchimp-marketing-python,
api_client.py: the data centre is the key's suffix after "-", Basic auth with the key as password).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import ConfigError, TransportError
from batchsync.transport.api import ApiTransport, ExportRow, Finding, Rejected, Submission, export_rows
from batchsync.transport.http import ApiClient, ApiRefusal
from batchsync.transport.mailchimp_reports import MemberReports

log = logging.getLogger(__name__)
IN_FLIGHT = 8  # batches posted before the oldest is waited for
RESULTS_BYTES = 512 * 1024 * 1024  # a batch's results archive, unpacked, at most
NOT_SUBSCRIBED = "a subscription is sent as pending, with consent given after Mailchimp's opt-out"
SENT_AS = {"subscribed": "subscribed", "pending": "pending", "unsubscribed": "unsubscribed", "cleaned": "unsubscribed"}


@dataclass(frozen=True)
class Posted:
    """A batch posted and not yet read: its id, its operations' ids, its rows (line -> address) and the lines
    sent to be subscribed."""

    id: str
    operations: frozenset[str]
    emails: dict[int, str]
    subscribed: frozenset[int]


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
        auth, connections = ("batchsync", api_key), config.max_connections
        self.api = api = ApiClient.of(
            config, clock, api_url(api_key), "Mailchimp", auth=auth, max_connections=connections
        )
        self.reports = MemberReports(profile, clock, api, self.inbox)

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
        """Post a batch per ``batch_size`` rows, up to IN_FLIGHT of them before the oldest is waited for (Mailchimp
        runs them meanwhile), and read each one's results."""
        list_id = self.profile.lists[list_code].id
        submission, posted = Submission(), deque[Posted]()
        for path in files:
            for rows in _chunks(export_rows(self.profile, path), self.profile.transport.batch_size):
                operations = [op for row in rows for op in self._operations(list_id, list_code, row)]
                batch = self.api.call("POST", "/batches", json_body={"operations": operations}).body
                ids = frozenset(str(op["operation_id"]) for op in operations)
                emails = {row.line: row.email for row in rows}
                wanted = frozenset(row.line for row in rows if SENT_AS.get(row.status) == "subscribed")
                posted.append(Posted(str(batch["id"]), ids, emails, wanted))
                if len(posted) >= IN_FLIGHT:
                    self._verdict(posted.popleft(), submission)
        while posted:
            self._verdict(posted.popleft(), submission)
        return submission

    def _verdict(self, batch: Posted, submission: Submission) -> None:
        """Wait for a batch and add its rows to the submission: refused (with Mailchimp's reason) or accepted."""
        finished = self._wait(batch.id)
        results = list(_results(self.api, self.api.link(str(finished.get("response_body_url") or ""))))
        answered = {str(result.get("operation_id")) for result in results}
        if answered != batch.operations:
            missing = len(batch.operations - answered)
            raise TransportError(f"Mailchimp batch {batch.id}: its results miss {missing} of its operations")
        refused: dict[int, str] = {}
        for result in results:
            operation = str(result["operation_id"])
            line = int(operation.split(":")[0])
            if int(result.get("status_code", 500)) >= 400:
                refused.setdefault(line, _reason(result))
            elif line in batch.subscribed and ":" not in operation and (held := _held_as(result)):
                refused.setdefault(line, f"Mailchimp holds the address {held}: {NOT_SUBSCRIBED}")
        for line, reason in sorted(refused.items()):
            submission.rejected.append(Rejected(line, batch.emails[line], reason))
        submission.accepted += len(batch.emails) - len(refused)

    def _operations(self, list_id: str, list_code: str, row: ExportRow) -> list[dict[str, Any]]:
        status = SENT_AS.get(row.status, "unsubscribed")
        path = f"/lists/{list_id}/members/{subscriber_hash(row.email)}"
        body: dict[str, Any] = {"email_address": row.email, "status_if_new": status}
        if status != "subscribed":  # never "subscribed" over what Mailchimp holds: pending or unsubscribed only
            body["status"] = status
        if status != "unsubscribed":
            body["merge_fields"] = {header: cell for header, kind, cell in row.others if kind != "groups"}
        operations = [{"method": "PUT", "path": path, "operation_id": str(row.line), "body": json.dumps(body)}]
        groups = self.profile.lists[list_code].groups
        if groups and status != "unsubscribed":
            separator = self.profile.export.group_separator
            held = {name.strip() for _, kind, cell in row.others if kind == "groups" for name in cell.split(separator)}
            tags = [{"name": tag, "status": "active" if tag in held else "inactive"} for tag in groups.values()]
            tagged = {"method": "POST", "path": path + "/tags", "body": json.dumps({"tags": tags})}
            operations.append({**tagged, "operation_id": f"{row.line}:tags"})
        return operations

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

    def fetch_reports(self, folder: str) -> None:
        self.reports.fetch(folder)


def _chunks(rows: Iterator[ExportRow], size: int) -> Iterator[list[ExportRow]]:
    chunk: list[ExportRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _results(api: ApiClient, url: str) -> Iterator[dict[str, Any]]:
    """The operations' results from a finished batch's archive (no API key goes to its storage host), at most
    RESULTS_BYTES unpacked."""
    if not url:
        raise TransportError("a finished Mailchimp batch gave no results archive")
    archive = api.call("GET", url, anonymous=True).body
    left = RESULTS_BYTES
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is None:
                continue
            data = handle.read(left + 1)
            left -= len(data)
            if left < 0:
                raise TransportError(f"a Mailchimp batch's results unpack to more than {RESULTS_BYTES} bytes")
            yield from json.loads(data)


def _held_as(result: dict[str, Any]) -> str | None:
    """The status Mailchimp answered an upsert with, where it is one a subscription does not override."""
    try:
        status = json.loads(result.get("response") or "{}").get("status")
    except (ValueError, AttributeError):
        return None
    return str(status) if status in ("unsubscribed", "cleaned") else None


def _reason(result: dict[str, Any]) -> str:
    """Mailchimp's reason for a refused operation: the problem document's title, detail and field errors."""
    try:
        body = json.loads(result.get("response") or "{}")
    except ValueError:
        return f"HTTP {result.get('status_code')}: {str(result.get('response'))[:200]}"
    parts = [str(body[key]) for key in ("title", "detail") if body.get(key)]
    parts += [f"{e.get('field', '')}: {e.get('message', '')}" for e in body.get("errors") or [] if isinstance(e, dict)]
    return "; ".join(parts) or f"HTTP {result.get('status_code')}"
