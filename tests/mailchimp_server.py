"""A fake Mailchimp Marketing API 3.0 on loopback, written from Mailchimp's published specification.

It is the peer a ``mailchimp`` transport is tested against: real HTTP on ``127.0.0.1``, HTTP Basic auth with
the API key, Mailchimp's problem-JSON errors, member upserts, batches with a results archive, and the
connection limit. State lives in memory, and tests read and set it directly.

Usage::

    server = MailchimpServer().start()
    audience = server.add_audience("a1b2c3d4e5", "Newsletter", [MergeField("FNAME", "First Name")])
    server.add_member("a1b2c3d4e5", "gone@example.com", "unsubscribed", unsubscribe_reason="Too many emails")
    # ... a client talks to server.url ("http://127.0.0.1:PORT/3.0") with server.api_key ("<32 hex>-us19")
    assert audience.members[subscriber_hash("new@example.com")].status == "subscribed"
    server.fail_next(2, status=429)  # the next two requests are answered 429, then service resumes
    server.batch_started_polls = 3  # a batch answers "started" to three polls before it finishes
    server.stop()

Endpoints (paths under ``/3.0``): ``GET /ping``; ``GET /lists/{list_id}``; ``GET /lists/{list_id}/merge-fields``;
``GET /lists/{list_id}/members``; ``GET`` and ``PUT /lists/{list_id}/members/{subscriber_hash}``;
``POST /lists/{list_id}/members/{subscriber_hash}/tags``; ``POST /batches``; ``GET /batches/{batch_id}``;
``GET /campaigns``; ``GET /reports/{campaign_id}/email-activity``; and the batch results archive at
``/batch-results/{batch_id}.tar.gz`` (outside ``/3.0``, like Mailchimp's own link to storage, so it takes no API
key).

Sources, cited below by tag:

[SPEC]   Mailchimp's OpenAPI (Swagger 2.0) document of the Marketing API, published as
         https://github.com/mailchimp/mailchimp-client-lib-codegen/blob/main/spec/marketing.json (also served at
         https://api.mailchimp.com/schema/3.0/Swagger.json?expand). The stored copy of that file was too large to
         read here, so it was read in its per-tag split, version 3.0.55, whose ``x-permalink`` names that file:
         github.com/api-evangelist/mailchimp, openapi/mailchimp-members-api-openapi.yml (PUT/GET member, GET
         members, member tags), openapi/mailchimp-merge-api-openapi.yml, openapi/mailchimp-batches-api-openapi.yml,
         openapi/mailchimp-pings-api-openapi.yml, openapi/mailchimp-lists-api-openapi.yml (list object fields).
[REPORTS] The same document's reports tag, openapi/mailchimp-reports-api-openapi.yml (operation
         getReportsIdEmailActivity: count, offset, since; emails[campaign_id, list_id, list_is_active, email_id,
         email_address, activity[action "open", "click" or "bounce"; type "hard" or "soft"; timestamp; url; ip]],
         campaign_id, total_items).
[CAMPAIGNS] ... its campaigns tag, openapi/mailchimp-campaigns-api-openapi.yml (GET /campaigns: status enum with
         "sent", list_id, since_send_time; campaigns[id, type, status, send_time, recipients.list_id]).
[CLIENT] Mailchimp's generated Python client, github.com/mailchimp/mailchimp-marketing-python v3.0.80:
         mailchimp_marketing/api/lists_api.py (get_list, get_list_merge_fields, get_list_members_info,
         get_list_member, set_list_member), api/batches_api.py, api/ping_api.py, and api_client.py (lines 38-64:
         the data centre is the API key's suffix after ``-``; lines 124-125: Basic auth as ``('user', api_key)``).
[ERRORS] https://mailchimp.com/developer/marketing/docs/errors/ : the problem-JSON body (type, title, status,
         detail, instance), ``Content-Type: application/problem+json; charset=utf-8``, ``X-Request-Id``, and the
         error glossary (400 InvalidResource, JSONParseError; 401 APIKeyMissing, APIKeyInvalid; 404
         ResourceNotFound; 405 MethodNotAllowed; 429 TooManyRequests "You have exceeded the limit of 10
         simultaneous connections."; 500 InternalServerError). The stored copy of the page was readable only to
         its format section; the glossary wording was checked against copies of it in public code (found by
         the code index, e.g. a mirror of the glossary in a Schneider Electric API guide).
[BATCH]  https://mailchimp.com/developer/marketing/guides/run-async-requests-batch-endpoint/ ("a limit of 10
         concurrent connections for your API key") and its earlier version
         https://developer.mailchimp.com/documentation/mailchimp/guides/how-to-use-batch-operations/ (request
         and batch shapes, statuses). Its "get the results" section was cut off in the stored copies; the archive
         layout (a gzipped tar of JSON files, each an array of ``{status_code, operation_id, response}``) is from
         [SPEC] ("The URL of the gzipped archive of the results of all the operations") and
         github.com/api-evangelist/mailchimp skills/mailchimp-bulk-sync-with-batches.md; that ``response`` is the
         body as a JSON *string* is from public client code that reads the archive with
         ``json.loads(result["response"])``.
[SUBS]   https://developer.mailchimp.com/documentation/mailchimp/guides/manage-subscribers-with-the-mailchimp-api/
         (subscriber hash = MD5 of the lower-cased address; a 404 means "not on your list").
[SEEN]   Error bodies Mailchimp returns that the reference does not list, as quoted from real responses:
         "Member In Compliance State" (https://stackoverflow.com/questions/42159327, whose answer gives status
         "pending" as the re-subscribe path: Mailchimp sends a confirmation email; and
         https://coderapp.vercel.app/answer/46285397); "Forgotten Email Not Subscribed"
         (https://konfy.io/config/mailchimp-handling-mailchimp-api-400-error-when-resubscribing-deleted-members);
         "Invalid Resource" with "... looks fake or invalid, please enter a real email address." (logged
         responses in public code), and "Your merge fields were invalid." with ``errors: [{field, message:
         "Please enter a number"}]`` and members carrying every merge field ("" when unset) in the recorded
         responses of github.com/grouparoo/grouparoo, plugins/@grouparoo/mailchimp/__tests__/fixtures/.

Where neither source says what Mailchimp does, a comment says "undocumented" and names the choice made.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import secrets
import tarfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import BasicAuth, hdrs, web
from aiohttp.typedefs import Handler

from .loopback_http import LoopbackHttp

Json = dict[str, Any]

ERROR_TYPE = "https://mailchimp.com/developer/marketing/docs/errors/"  # [ERRORS] example body
MAX_CONNECTIONS = 10  # [BATCH], [ERRORS] 429: "the limit of 10 simultaneous connections"
DATA_CENTRE = "us19"  # [CLIENT] README's example server prefix; the key's suffix names it
# [SPEC] PUT member body: status and status_if_new enums.
MEMBER_STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional")
# [SPEC] GET members ``status`` filter enum (adds "archived", which this fake never produces).
STATUS_FILTERS = (*MEMBER_STATUSES, "archived")
# [SPEC] merge field ``type`` enum.
MERGE_FIELD_TYPES = (
    "text",
    "number",
    "address",
    "phone",
    "date",
    "url",
    "imageurl",
    "radio",
    "dropdown",
    "birthday",
    "zip",
)
BATCH_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # [SPEC] POST /batches operations[].method enum
COMPLIANCE_STATES = ("unsubscribed", "cleaned")
# Undocumented: how strict Mailchimp's address check is. This accepts one "@" and a dot in the domain.
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
GLOSSARY = {  # [ERRORS] glossary: status -> (title, detail) for the errors this fake raises without context
    401: ("API Key Invalid", "Your API key may be invalid, or you've attempted to access the wrong datacenter."),
    404: ("Resource Not Found", "The requested resource could not be found."),
    405: ("Method Not Allowed", "The requested method and resource are not compatible."),
    # The glossary names it TooManyRequests; the spaced title follows the other titles seen in real bodies.
    429: ("Too Many Requests", "You have exceeded the limit of 10 simultaneous connections."),
    500: (
        "Internal Server Error",
        "An unexpected internal error has occurred. Please contact Support for more information.",
    ),
}


def subscriber_hash(email: str) -> str:
    """[SUBS], [SPEC] subscriber_hash: the MD5 hash of the lowercase version of the address."""
    return hashlib.md5(email.lower().encode(), usedforsecurity=False).hexdigest()


def iso(moment: datetime) -> str:
    """[SPEC] timestamps are ISO 8601 like 2015-10-21T15:41:36+00:00 (whole seconds, UTC offset)."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat()


class ApiError(Exception):
    """An error answered as [ERRORS]' problem-JSON document."""

    def __init__(self, status: int, title: str = "", detail: str = "", errors: list[Json] | None = None) -> None:
        # Statuses outside the glossary (an injected 502, say) take the HTTP reason phrase as their title.
        default_title, default_detail = GLOSSARY.get(status, (HTTPStatus(status).phrase, ""))
        super().__init__(f"{status} {title or default_title}")
        self.status, self.title, self.detail = status, title or default_title, detail or default_detail
        self.errors = errors

    def body(self, instance: str) -> Json:
        document: Json = {
            "type": ERROR_TYPE,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        if self.errors is not None:  # [SEEN] field-level details ride in an "errors" array
            document["errors"] = self.errors
        return document


def invalid_resource(detail: str, errors: list[Json] | None = None) -> ApiError:
    """[ERRORS] 400 InvalidResource: the submitted object did not validate."""
    return ApiError(400, "Invalid Resource", detail, errors)


def field_errors(errors: list[Json]) -> ApiError:
    # [ERRORS] InvalidResource's glossary text, as real bodies carry it with an "errors" array ([SEEN]).
    return invalid_resource(
        "The resource submitted could not be validated. For field-specific details, see the 'errors' array.", errors
    )


@dataclass
class Reply:
    status: int
    body: Json | None  # None: an empty body (204)


@dataclass
class MergeField:
    """[SPEC] GET /lists/{list_id}/merge-fields item (merge_id, tag, name, type, required, default_value, public,
    display_order). ``merge_id`` and ``display_order`` are set by :meth:`MailchimpServer.add_audience`."""

    tag: str
    name: str
    type: str = "text"
    required: bool = False
    default_value: str = ""
    public: bool = True
    merge_id: int = 0
    display_order: int = 0

    def to_json(self, list_id: str) -> Json:
        return {
            "merge_id": self.merge_id,
            "tag": self.tag,
            "name": self.name,
            "type": self.type,
            "required": self.required,
            "default_value": self.default_value,
            "public": self.public,
            "display_order": self.display_order,
            "list_id": list_id,
        }


@dataclass
class Member:
    """A list member: the subset of [SPEC]'s member fields a sync reads and writes."""

    email_address: str
    status: str
    last_changed: datetime
    merge_fields: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    # [SPEC] "A subscriber's reason for unsubscribing." Undocumented what an API unsubscribe records: this fake
    # leaves it unset then, and a test sets it in the state for a contact who unsubscribed themselves.
    unsubscribe_reason: str | None = None
    email_type: str = "html"
    # [SPEC] timestamp_opt: "The date and time the subscriber confirmed their opt-in status". Set when a member
    # is made subscribed; undocumented whether an API upsert sets it: this fake does.
    timestamp_opt: datetime | None = None

    @property
    def id(self) -> str:
        return subscriber_hash(self.email_address)


@dataclass
class Audience:
    """A list ("audience"), its merge fields, members by subscriber hash, and permanently deleted hashes."""

    id: str
    name: str
    merge_fields: list[MergeField]
    date_created: datetime
    members: dict[str, Member] = field(default_factory=dict)
    # Hashes of addresses deleted with delete-permanent ([SPEC] .../actions/delete-permanent): [SEEN] they
    # cannot be re-imported. Tests add to it directly; this fake has no delete endpoint.
    forgotten: set[str] = field(default_factory=set)
    tag_ids: dict[str, int] = field(default_factory=dict)

    def merge_field(self, tag: str) -> MergeField | None:
        # Undocumented whether tags match case-insensitively; this fake matches them exactly.
        return next((candidate for candidate in self.merge_fields if candidate.tag == tag), None)

    def member_json(self, member: Member) -> Json:
        """[SPEC] member fields; [SEEN] merge_fields lists every field of the audience, "" when unset."""
        document: Json = {
            "id": member.id,
            "email_address": member.email_address,
            "unique_email_id": member.id[:10],  # [SPEC] "an identifier for the address across all of Mailchimp"
            "email_type": member.email_type,
            "status": member.status,
            "merge_fields": {mf.tag: member.merge_fields.get(mf.tag, "") for mf in self.merge_fields},
            "last_changed": iso(member.last_changed),
            "tags_count": len(member.tags),
            "tags": [{"id": self.tag_id(name), "name": name} for name in member.tags],
            "list_id": self.id,
        }
        if member.unsubscribe_reason is not None:
            document["unsubscribe_reason"] = member.unsubscribe_reason
        document["timestamp_opt"] = iso(member.timestamp_opt) if member.timestamp_opt else ""
        return document

    def tag_id(self, name: str) -> int:
        return self.tag_ids.setdefault(name, len(self.tag_ids) + 1)


@dataclass
class Batch:
    """[SPEC] the Batch object; ``operations`` as posted, ``results`` filled when it finishes."""

    id: str
    operations: list[Json]
    submitted_at: datetime
    started_polls_left: int
    status: str = "pending"
    results: list[Json] = field(default_factory=list)
    completed_at: datetime | None = None
    archive: bytes = b""

    def to_json(self, results_url: str) -> Json:
        """[SPEC] Batch fields. Undocumented what completed_at and response_body_url hold before the batch
        finishes: empty strings here."""
        finished = self.status == "finished"
        return {
            "id": self.id,
            "status": self.status,
            "total_operations": len(self.operations),
            "finished_operations": len(self.results),
            "errored_operations": sum(1 for result in self.results if result["status_code"] >= 400),
            "submitted_at": iso(self.submitted_at),
            "completed_at": iso(self.completed_at) if self.completed_at else "",
            "response_body_url": f"{results_url}/{self.id}.tar.gz" if finished else "",
        }


@dataclass
class Activity:
    """[REPORTS] one member activity: action open, click or bounce; type hard or soft for a bounce; url for a
    click; its timestamp."""

    email_address: str
    action: str
    timestamp: datetime
    url: str = ""
    type: str = ""
    ip: str = "192.0.2.1"


@dataclass
class Campaign:
    """A sent campaign: [CAMPAIGNS] id, status, send_time, recipients.list_id; and its members' activity."""

    id: str
    list_id: str
    send_time: datetime
    status: str = "sent"
    activity: list[Activity] = field(default_factory=list)

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "type": "regular",
            "status": self.status,
            "send_time": iso(self.send_time),
            "recipients": {"list_id": self.list_id},
        }


Route = Callable[[Mapping[str, str], Mapping[str, str], Any], Reply]
LIST = r"/lists/(?P<list_id>[^/]+)"
MEMBER = LIST + r"/members/(?P<hash>[^/]+)"


class MailchimpApi:
    """The API's behaviour without HTTP: the routes, member rules and batches. Callers hold ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.audiences: dict[str, Audience] = {}
        self.batches: dict[str, Batch] = {}
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.batch_started_polls = 1  # polls a new batch answers "started" to before it finishes
        self.campaigns: dict[str, Campaign] = {}
        self.results_per_file = 500  # undocumented how Mailchimp splits results across the archive's files
        self.results_url = ""
        self.routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("GET", re.compile(r"/ping"), self.ping),
            ("GET", re.compile(LIST), self.get_list),
            ("GET", re.compile(LIST + r"/merge-fields"), self.get_merge_fields),
            ("GET", re.compile(LIST + r"/members"), self.list_members),
            ("GET", re.compile(MEMBER), self.get_member),
            ("PUT", re.compile(MEMBER), self.put_member),
            ("POST", re.compile(MEMBER + r"/tags"), self.post_member_tags),
            ("POST", re.compile(r"/batches"), self.post_batch),
            ("GET", re.compile(r"/batches/(?P<batch_id>[^/]+)"), self.get_batch),
            ("GET", re.compile(r"/campaigns"), self.list_campaigns),
            ("GET", re.compile(r"/reports/(?P<campaign_id>[^/]+)/email-activity"), self.email_activity),
        ]

    def dispatch(self, method: str, path: str, query: Mapping[str, str], text: str) -> Reply:
        """Answers one request (from HTTP or from a batch operation) with its status and JSON body."""
        try:
            route, params = self._route(method, path.rstrip("/") or "/")
            body = parse_body(text) if method in ("POST", "PUT", "PATCH") else None
            return route(params, query, body)
        except ApiError as error:
            return Reply(error.status, error.body(str(uuid.uuid4())))

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        matched = [(verb, pattern.fullmatch(path), route) for verb, pattern, route in self.routes]
        for verb, match, route in matched:
            if match and verb == method:
                return route, match.groupdict()
        if any(match for _, match, _ in matched):
            raise ApiError(405)  # [ERRORS] 405 MethodNotAllowed
        raise ApiError(404)  # [ERRORS] 404 ResourceNotFound; also every endpoint this fake lacks

    def audience(self, list_id: str) -> Audience:
        if list_id not in self.audiences:
            raise ApiError(404)
        return self.audiences[list_id]

    def ping(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        return Reply(200, {"health_status": "Everything's Chimpy!"})  # [SPEC] GET /ping: the constant string

    def get_list(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[SPEC] list object: id, name, date_created, double_optin and a subset of stats."""
        audience = self.audience(params["list_id"])
        statuses = [member.status for member in audience.members.values()]
        stats = {
            "member_count": statuses.count("subscribed"),
            "unsubscribe_count": statuses.count("unsubscribed"),
            "cleaned_count": statuses.count("cleaned"),
            "merge_field_count": len(audience.merge_fields),
        }
        document = {"id": audience.id, "name": audience.name, "date_created": iso(audience.date_created)}
        return Reply(200, {**document, "double_optin": False, "stats": stats})

    def get_merge_fields(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        audience = self.audience(params["list_id"])
        offset, count = paging(query)
        fields = [mf.to_json(audience.id) for mf in audience.merge_fields]
        page = fields[offset : offset + count]
        return Reply(200, {"merge_fields": page, "list_id": audience.id, "total_items": len(fields)})

    def list_members(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[SPEC] GET members: status, since_last_changed, before_last_changed, count, offset."""
        audience = self.audience(params["list_id"])
        offset, count = paging(query)
        status = query.get("status")
        if status is not None and status not in STATUS_FILTERS:
            raise field_errors([{"field": "status", "message": f"Value must be one of: {', '.join(STATUS_FILTERS)}"}])
        since, before = time_param(query, "since_last_changed"), time_param(query, "before_last_changed")
        # [SPEC] "changed after" / "changed before" the timeframe: read as strict comparisons (undocumented
        # whether an equal timestamp is in); the order is insertion order (undocumented without sort_field).
        rows = [
            member
            for member in audience.members.values()
            if (status is None or member.status == status)
            and (since is None or member.last_changed > since)
            and (before is None or member.last_changed < before)
        ]
        page = [audience.member_json(member) for member in rows[offset : offset + count]]
        return Reply(200, {"members": page, "list_id": audience.id, "total_items": len(rows)})

    def get_member(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        audience = self.audience(params["list_id"])
        member = audience.members.get(path_hash(params["hash"]))
        if member is None:
            raise ApiError(404)  # [SUBS] "If the call returns a 404 response, the subscriber isn't on your list."
        return Reply(200, audience.member_json(member))

    def put_member(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[SPEC] PUT /lists/{list_id}/members/{subscriber_hash}: "Add or update a list member"."""
        audience = self.audience(params["list_id"])
        document = require_object(body)
        key = path_hash(params["hash"])
        skip_required = query.get("skip_merge_validation", "false").lower() == "true"  # [SPEC] query parameter
        # [SPEC] The documented PUT body has no "tags" (only POST /members and .../tags do): ignored here, as
        # are the other documented fields this fake does not model (interests, language, vip, location, ...).
        member = audience.members.get(key)
        if member is None:
            member = self._create_member(audience, key, document, skip_required)
        else:
            self._update_member(audience, member, document)
        return Reply(200, audience.member_json(member))

    def _create_member(self, audience: Audience, key: str, document: Json, skip_required: bool) -> Member:
        # [SPEC] email_address and status_if_new are "required only if the email address is not already present".
        email = checked_email(document, key, required=True)
        # Undocumented which wins for a new member when both are given: status_if_new is used, status otherwise.
        status = document.get("status_if_new") or document.get("status")
        if status is None:
            raise field_errors([{"field": "", "message": "Required fields were not provided: status_if_new"}])
        check_status(status, "status_if_new" if "status_if_new" in document else "status")
        if key in audience.forgotten and status != "pending":
            raise forgotten_email(email)
        merge = checked_merge_fields(audience, document.get("merge_fields"), new=not skip_required)
        member = Member(email_address=email, status=status, last_changed=self.clock(), merge_fields=merge)
        member.timestamp_opt = member.last_changed if status == "subscribed" else None
        audience.members[key] = member
        return member

    def _update_member(self, audience: Audience, member: Member, document: Json) -> None:
        checked_email(document, member.id, required=False)
        status = document.get("status")  # [SPEC] status_if_new only applies to an address not on the list
        if status is not None:
            check_status(status, "status")
            check_transition(member, status)
        merge = checked_merge_fields(audience, document.get("merge_fields"), new=False)
        before = (member.status, dict(member.merge_fields))
        member.merge_fields.update(merge)
        if status is not None and status != member.status:
            member.status = status
            member.unsubscribe_reason = None  # an API status change is no self-unsubscribe with a reason
        # Undocumented whether an update that changes nothing moves last_changed: this fake leaves it.
        if (member.status, member.merge_fields) != before:
            member.last_changed = self.clock()

    def post_member_tags(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[SPEC] POST .../members/{subscriber_hash}/tags: {"tags": [{"name", "status": active|inactive}]}, 204."""
        audience = self.audience(params["list_id"])
        member = audience.members.get(path_hash(params["hash"]))
        if member is None:
            raise ApiError(404)
        tags = require_object(body).get("tags")
        if not isinstance(tags, list) or not all(valid_tag(tag) for tag in tags):
            raise field_errors(
                [{"field": "tags", "message": "Each tag needs a name and a status of active or inactive"}]
            )
        before = list(member.tags)
        for tag in tags:
            if tag["status"] == "active" and tag["name"] not in member.tags:
                member.tags.append(tag["name"])
            elif tag["status"] == "inactive" and tag["name"] in member.tags:
                member.tags.remove(tag["name"])
        if member.tags != before:  # undocumented whether tags move last_changed: they do here, for syncs
            member.last_changed = self.clock()
        return Reply(204, None)

    def post_batch(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[SPEC] POST /batches: {"operations": [{method, path, params, body (a JSON string), operation_id}]}."""
        operations = require_object(body).get("operations")
        if not isinstance(operations, list):
            raise field_errors([{"field": "", "message": "Required fields were not provided: operations"}])
        errors = [error for index, op in enumerate(operations) for error in operation_errors(index, op)]
        if errors:
            raise field_errors(errors)
        batch = Batch(secrets.token_hex(5), operations, self.clock(), self.batch_started_polls)
        self.batches[batch.id] = batch
        return Reply(200, batch.to_json(self.results_url))  # [BATCH] "you'll receive a 200 response"

    def get_batch(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[SPEC] GET /batches/{batch_id}. Each poll moves the batch on: ``started`` for ``batch_started_polls``
        polls, then it runs its operations and answers ``finished`` (Mailchimp's preprocessing and finalizing
        steps are not shown)."""
        batch = self.batches.get(params["batch_id"])
        if batch is None:
            raise ApiError(404)
        if batch.status != "finished":
            if batch.started_polls_left > 0:
                batch.started_polls_left -= 1
                batch.status = "started"
            else:
                self._run_batch(batch)
        return Reply(200, batch.to_json(self.results_url))

    def list_campaigns(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[CAMPAIGNS] GET /campaigns: status, list_id, since_send_time ("campaigns sent after the set time"),
        count, offset. Undocumented: the order (send time here)."""
        offset, count = paging(query)
        since = time_param(query, "since_send_time")
        rows = sorted(
            (
                campaign
                for campaign in self.campaigns.values()
                if query.get("status") in (None, campaign.status)
                and query.get("list_id") in (None, campaign.list_id)
                and (since is None or campaign.send_time > since)
            ),
            key=lambda campaign: campaign.send_time,
        )
        page = [campaign.to_json() for campaign in rows[offset : offset + count]]
        return Reply(200, {"campaigns": page, "total_items": len(rows)})

    def email_activity(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REPORTS] GET /reports/{campaign_id}/email-activity: ``emails``, each with campaign_id, list_id,
        email_id (the subscriber hash), email_address and ``activity`` [{action, type, timestamp, url, ip}];
        ``since`` keeps the events after that time. Undocumented: a member with no event after ``since`` is
        left out (here), and the members' order (first activity)."""
        campaign = self.campaigns.get(params["campaign_id"])
        if campaign is None:
            raise ApiError(404)
        offset, count = paging(query)
        since = time_param(query, "since")
        by_member: dict[str, list[Json]] = {}
        for event in campaign.activity:
            if since is None or event.timestamp > since:
                item = {"action": event.action, "type": event.type, "timestamp": iso(event.timestamp)}
                by_member.setdefault(event.email_address, []).append({**item, "url": event.url, "ip": event.ip})
        emails = [
            {
                "campaign_id": campaign.id,
                "list_id": campaign.list_id,
                "list_is_active": True,
                "email_id": subscriber_hash(email),
                "email_address": email,
                "activity": events,
            }
            for email, events in by_member.items()
        ]
        page = emails[offset : offset + count]
        return Reply(200, {"emails": page, "campaign_id": campaign.id, "total_items": len(emails)})

    def _run_batch(self, batch: Batch) -> None:
        """Applies every operation through the same routes as HTTP and keeps one result per operation."""
        for operation in batch.operations:
            params = {str(name): str(value) for name, value in (operation.get("params") or {}).items()}
            reply = self.dispatch(operation["method"], operation["path"], params, operation.get("body") or "")
            # [BATCH] one {status_code, operation_id, response} per operation, the response body as a JSON
            # string; undocumented what an empty (204) body becomes: an empty string here.
            response = json.dumps(reply.body) if reply.body is not None else ""
            batch.results.append(
                {"status_code": reply.status, "operation_id": operation.get("operation_id"), "response": response}
            )
        batch.status, batch.completed_at = "finished", self.clock()
        batch.archive = results_archive(batch.results, self.results_per_file)


def parse_body(text: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:  # [ERRORS] 400 JSONParseError
        raise ApiError(400, "JSON Parse Error", "We encountered an unspecified JSON parsing error.") from error


def require_object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise field_errors([{"field": "", "message": "Schema describes object, but the body is not one"}])
    return body


def path_hash(value: str) -> str:
    """[SPEC] subscriber_hash: "This endpoint also accepts a list member's email address" (contact_id is not
    modelled)."""
    return subscriber_hash(value) if "@" in value else value.lower()


def checked_email(document: Json, key: str, *, required: bool) -> str:
    email = document.get("email_address")
    if email is None and not required:
        return ""
    if not isinstance(email, str) or not email:
        raise field_errors([{"field": "", "message": "Required fields were not provided: email_address"}])
    if not EMAIL_PATTERN.fullmatch(email):  # [SEEN] the wording of Mailchimp's answer to a fake address
        raise invalid_resource(f"{email} looks fake or invalid, please enter a real email address.")
    if subscriber_hash(email) != key:
        # Undocumented: an address whose hash is not the path's. Refused, so a client's hashing bug shows.
        raise invalid_resource(f"The email address {email} does not match the subscriber hash in the path.")
    return email


def check_status(status: Any, name: str) -> None:
    if status not in MEMBER_STATUSES:  # [SPEC] enum
        raise field_errors([{"field": name, "message": f"Value must be one of: {', '.join(MEMBER_STATUSES)}"}])


def check_transition(member: Member, status: str) -> None:
    """[SEEN] An unsubscribed or cleaned member cannot be set to subscribed; the documented way back for an
    unsubscribed one is status "pending" (a confirmation email). Undocumented for cleaned (bounced) members:
    this fake refuses "pending" for them too."""
    refused = status == "subscribed" or (status == "pending" and member.status == "cleaned")
    if member.status in COMPLIANCE_STATES and refused:
        raise ApiError(
            400,
            "Member In Compliance State",
            f"{member.email_address} is in a compliance state due to unsubscribe, bounce, or compliance review "
            "and cannot be subscribed.",
        )


def forgotten_email(email: str) -> ApiError:
    return ApiError(  # [SEEN]; undocumented whether "pending" gets through: this fake lets it (a re-subscribe)
        400,
        "Forgotten Email Not Subscribed",
        f"{email} was permanently deleted and cannot be re-imported. The contact must re-subscribe to get back "
        "on the list.",
    )


def checked_merge_fields(audience: Audience, values: Any, *, new: bool) -> dict[str, Any]:
    """Unknown tags, non-numbers in number fields, and (for a new member without skip_merge_validation) empty
    required fields are refused with [SEEN]'s "Your merge fields were invalid." The per-field messages other
    than "Please enter a number" are undocumented wording."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise field_errors([{"field": "merge_fields", "message": "Schema describes object"}])
    errors: list[Json] = []
    for tag, value in values.items():
        merge_field = audience.merge_field(tag)
        if merge_field is None:
            errors.append({"field": tag, "message": "This merge field does not exist in the audience"})
        elif merge_field.type == "number" and not is_number(value):
            errors.append({"field": tag, "message": "Please enter a number"})
    if new:
        missing = [mf.tag for mf in audience.merge_fields if mf.required and values.get(mf.tag) in (None, "")]
        errors.extend({"field": tag, "message": "Please enter a value"} for tag in missing)
    if errors:
        raise invalid_resource("Your merge fields were invalid.", errors)
    return dict(values)


def is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float) or value == "":
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def valid_tag(tag: Any) -> bool:
    return isinstance(tag, dict) and isinstance(tag.get("name"), str) and tag.get("status") in ("active", "inactive")


def operation_errors(index: int, operation: Any) -> list[Json]:
    """[SPEC] each operation needs method (enum) and path; body, when given, is a string."""
    where = f"operations.{index}"
    if not isinstance(operation, dict):
        return [{"field": where, "message": "Schema describes object"}]
    errors = []
    if operation.get("method") not in BATCH_METHODS:
        errors.append({"field": f"{where}.method", "message": f"Value must be one of: {', '.join(BATCH_METHODS)}"})
    if not isinstance(operation.get("path"), str):
        errors.append({"field": f"{where}.path", "message": "Required fields were not provided: path"})
    if not isinstance(operation.get("body", ""), str):
        errors.append({"field": f"{where}.body", "message": "Schema describes string"})
    if not isinstance(operation.get("params", {}), dict):
        errors.append({"field": f"{where}.params", "message": "Schema describes object"})
    return errors


def paging(query: Mapping[str, str]) -> tuple[int, int]:
    """[SPEC] count (default 10, maximum 1000) and offset (default 0). Undocumented what a count over 1000 gets:
    capped here."""
    try:
        count, offset = int(query.get("count", "10")), int(query.get("offset", "0"))
    except ValueError as error:
        raise field_errors([{"field": "count", "message": "count and offset must be integers"}]) from error
    return max(offset, 0), min(max(count, 0), 1000)


def time_param(query: Mapping[str, str], name: str) -> datetime | None:
    """[SPEC] "Uses ISO 8601 time format: 2015-10-21T15:41:36+00:00". A time without an offset is read as UTC
    (undocumented)."""
    text = query.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise field_errors([{"field": name, "message": "Uses ISO 8601 time format"}]) from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def results_archive(results: list[Json], per_file: int) -> bytes:
    """[BATCH] a gzipped tar of JSON files, each an array of results (file names are undocumented)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for number, start in enumerate(range(0, len(results), max(per_file, 1))):
            data = json.dumps(results[start : start + per_file]).encode()
            info = tarfile.TarInfo(f"{number}.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def problem_response(error: ApiError) -> web.Response:
    """[ERRORS] problem JSON, its content type, and the X-Request-Id that repeats ``instance``."""
    instance = str(uuid.uuid4())
    return web.json_response(
        error.body(instance),
        status=error.status,
        content_type="application/problem+json",
        headers={"X-Request-Id": instance},
    )


class MailchimpServer(LoopbackHttp):
    """The fake on ``127.0.0.1`` in a background thread: auth, the connection limit, injected failures, and
    every request counted. ``api`` holds the state (``audiences``, ``batches``, ``clock``)."""

    label = "the fake Mailchimp API"

    def __init__(self) -> None:
        super().__init__()
        self.api = MailchimpApi()
        self.api_key = f"{secrets.token_hex(16)}-{DATA_CENTRE}"  # [CLIENT] api_client.py: "<key>-<dc>"
        self.data_centre = DATA_CENTRE
        self.request_count = 0  # every request received, refused ones included
        self.requests: list[str] = []  # "METHOD /path" of each, in order
        self.response_delay = 0.0  # seconds each /3.0 request is held open (to test the connection limit)
        self._failures: deque[int] = deque()
        self._in_flight: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/3.0"

    @property
    def audiences(self) -> dict[str, Audience]:
        return self.api.audiences

    @property
    def batch_started_polls(self) -> int:
        return self.api.batch_started_polls

    @batch_started_polls.setter
    def batch_started_polls(self, polls: int) -> None:
        self.api.batch_started_polls = polls

    def add_audience(self, list_id: str, name: str, merge_fields: list[MergeField] | None = None) -> Audience:
        fields = list(merge_fields or [])
        unknown = [mf.type for mf in fields if mf.type not in MERGE_FIELD_TYPES]
        if unknown:
            raise ValueError(f"merge field types not in the spec's enum: {unknown}")
        for number, merge_field in enumerate(fields, start=1):  # merge_id 0 is the address itself
            merge_field.merge_id = merge_field.merge_id or number
            merge_field.display_order = merge_field.display_order or number + 1
        audience = Audience(list_id, name, fields, self.api.clock())
        with self.api.lock:
            self.api.audiences[list_id] = audience
        return audience

    def add_member(self, list_id: str, email: str, status: str, **fields: Any) -> Member:
        """Puts a member straight into the state (no validation), e.g. one who unsubscribed themselves."""
        member = Member(email_address=email, status=status, last_changed=self.api.clock(), **fields)
        with self.api.lock:
            self.api.audiences[list_id].members[member.id] = member
        return member

    def member(self, list_id: str, email: str) -> Member | None:
        with self.api.lock:
            return self.api.audiences[list_id].members.get(subscriber_hash(email))

    def add_campaign(self, campaign_id: str, list_id: str, send_time: datetime) -> Campaign:
        campaign = Campaign(campaign_id, list_id, send_time)
        with self.api.lock:
            self.api.campaigns[campaign_id] = campaign
        return campaign

    def add_activity(self, campaign_id: str, email: str, action: str, at: datetime, **details: str) -> None:
        """A member opened, clicked (``url=``) or bounced (``type="hard"``) in a sent campaign."""
        with self.api.lock:
            self.api.campaigns[campaign_id].activity.append(Activity(email, action, at, **details))

    def fail_next(self, count: int, status: int = 429) -> None:
        """Answers the next ``count`` API requests with ``status`` (429, or a 5xx) and a problem body."""
        self._failures.extend([status] * count)

    def bound(self) -> None:
        self.api.results_url = f"http://127.0.0.1:{self.port}/batch-results"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_route("*", "/3.0/{tail:.*}", self._handle_api)
        app.router.add_get("/batch-results/{name}", self._handle_results)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts the request, then for the API: the connection limit, injected failures, and auth."""
        self.request_count += 1
        self.requests.append(f"{request.method} {request.path}")
        if not request.path.startswith("/3.0/"):
            return await handler(request)
        key = presented_key(request)
        if self._in_flight.get(key, 0) >= MAX_CONNECTIONS:  # [BATCH] 10 concurrent connections per API key
            return problem_response(ApiError(429))
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            if self.response_delay:
                await asyncio.sleep(self.response_delay)
            if self._failures:
                return problem_response(ApiError(self._failures.popleft()))
            if not key:  # [ERRORS] 401 APIKeyMissing
                return problem_response(ApiError(401, "API Key Missing", "Your request did not include an API key."))
            if key != self.api_key:  # [ERRORS] 401 APIKeyInvalid
                return problem_response(ApiError(401))
            return await handler(request)
        finally:
            self._in_flight[key] -= 1

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        text = await request.text()
        with self.api.lock:
            reply = self.api.dispatch(request.method, "/" + request.match_info["tail"], request.query, text)
        if reply.body is None:
            return web.Response(status=reply.status)
        if reply.status >= 400:
            return web.json_response(
                reply.body,
                status=reply.status,
                content_type="application/problem+json",
                headers={"X-Request-Id": reply.body["instance"]},
            )
        return web.json_response(reply.body, status=reply.status)

    async def _handle_results(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["name"].removesuffix(".tar.gz")
        with self.api.lock:
            batch = self.api.batches.get(batch_id)
            archive = batch.archive if batch is not None else b""
        if not archive:
            return web.Response(status=404)
        return web.Response(body=archive, content_type="application/gzip")


def presented_key(request: web.Request) -> str:
    """[CLIENT] Basic auth with any user name and the API key as the password ("" when none is presented).
    Mailchimp's OAuth bearer tokens are not modelled."""
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    try:
        return BasicAuth.decode(header).password if header else ""
    except ValueError:
        return ""
