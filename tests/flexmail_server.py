"""A fake Flexmail REST API (https://api.flexmail.eu, HAL+JSON) on loopback, written from what Flexmail publishes.

It is the peer a ``flexmail`` transport is tested against: real HTTP on ``127.0.0.1``, HTTP Basic auth with the
account id and a personal access token, contacts found by email, created, replaced, updated and unsubscribed,
custom fields and sources listed, webhooks registered and delivered, and the rate limits. State lives in
memory, and tests read and set it directly.

Usage::

    server = FlexmailServer().start()
    source = server.add_source("CRM sync")
    server.add_custom_field("company", "Company")
    server.add_contact("ann@example.com", source=source.id, custom_fields={"company": "Acme"})
    # ... a client talks to server.url ("http://127.0.0.1:PORT") as server.account_id / server.token
    server.unsubscribe_at_flexmail("ann@example.com", at, "Too many emails")  # delivered to registered webhooks
    assert server.contact("ann@example.com").status == "unsubscribed"
    server.fail_next(2, status=429)  # the next two requests are answered 429, then service resumes
    server.monthly_limit = 1000  # requests this calendar month (server clock) beyond it are answered 429
    server.stop()

Endpoints (at the root, as on api.flexmail.eu): ``GET /``; ``GET /account-contact-languages``; ``GET`` and ``POST
/contacts`` (``?email=``, ``limit``, ``offset``); ``GET``, ``PUT`` and ``PATCH /contacts/{id}``; ``POST
/contacts/{id}/unsubscribe``; ``GET /contacts/{id}/sources``; ``GET /custom-fields``; ``GET /sources`` and
``/sources/{id}``; ``GET /webhook-events``; ``GET`` and ``POST /webhooks``; ``GET`` and ``DELETE /webhooks/{id}``.
Documented but NOT done (404, or 405 for another verb on a modelled path): interests and interest
subscriptions, preferences, segments, opt-in forms and ``POST /opt-ins``, contact imports, ``PATCH /webhooks/{id}``.

Which API: the current REST API (api.flexmail.eu, documented at https://api.flexmail.eu/documentation/, an
OpenAPI document at https://api.flexmail.eu/documentation/openapi.json). The older SOAP API (soap.flexmail.eu,
user id + user token headers, GetUnsubscriptions/GetBounces with timestampSince) is not modelled: Flexmail's
integrations of today use the REST API, and the SOAP one is what they migrated away from ([APTECO] uses both).

Sources, cited below by tag. Flexmail's own reference page and its openapi.json were not in the stores this was
written from; every fact below comes from material that quotes or calls it, and says so.

[REF]     "Flexmail: Native API Reference", a digest of the official reference (a markdown file found by the code
          index; its repository is not named there): auth "account ID as username and your personal access token
          as password"; pagination "limit ... (accepted range 1-500)", "offset ... numbering starts at 0"; the 24
          documented operations with their anchors in https://api.flexmail.eu/documentation/ , among them
          POST /contacts (email, language, source required; first_name, name, custom_fields optional),
          PUT /contacts/{id} "Replace Contact" (email, first_name, name, language required; custom_fields),
          PATCH /contacts/{id} "Update Contact" (first_name, name, language, custom_fields, all optional),
          GET /contacts ("email: An email address to filter on"), GET /contacts/{id},
          POST /contacts/{id}/unsubscribe, GET /custom-fields, GET /sources, GET/POST /webhooks,
          GET/PATCH/DELETE /webhooks/{id} (POST body: event_name, target_url required, verification_token).
[AIRBYTE] github.com/airbytehq/airbyte airbyte-integrations/connectors/source-flexmail/manifest.yaml: base
          https://api.flexmail.eu, BasicHttpAuthenticator(username=account_id, password=personal_access_token),
          records at _embedded.item, offset/limit paging (page 500) of /contacts and /sources, GET /webhook-events
          answering {events: [string], _links: {self: {href}}}; record schemas: contact {id (number), email,
          first_name, name, language, custom_fields (object), _links.self.href, _links.sources.href}; custom field
          {id (string), type, name, placeholder}; source {id (number), name, _links.self.href}.
[POSTHOG] github.com/PostHog/posthog products/warehouse_sources/.../sources/flexmail/ (flexmail.py, settings.py,
          canonical_descriptions.py, tests/test_flexmail.py): "collection rows live under _embedded.item
          (omitted entirely for an empty collection)"; "List endpoints paginate with limit/offset and carry a
          top-level total"; envelope {total, limit, offset, _embedded: {item}}; "List endpoints accept a limit of
          up to 500"; "the 60 requests/minute rate limit" ("per-account"); "no list endpoint exposes a server-side
          timestamp filter (contacts only filter on email/interest, custom fields on type/language)"; segments,
          opt-in forms and custom fields "return their whole result set in one response" ({_embedded: {item}});
          custom field type "free_text, multiple_choice, numeric, or date"; placeholder "used to reference the
          custom field in ... contact payloads"; contact custom_fields "keyed by custom field placeholder";
          name is "The contact's last name"; 401/403 are the credential errors, 429/5xx are retried.
[PIPEDREAM] github.com/PipedreamHQ/pipedream components/flexmail/: flexmail.app.mjs (auth account_id /
          personal_access_token; PATCH /contacts/{id}; POST /contacts/{id}/unsubscribe with no body; GET
          /account-contact-languages answering {languages}); actions/create-update-contact (find with
          GET /contacts?email=, create with POST answering a body with id, "nothing to return on update");
          sources/new-contact/test-event.mjs (a contact: id 42, email, first_name, name, language "nl",
          custom_fields {placeholder: value}); sources/new-unsubscribe (an unsubscribed contact is one that
          drops out of GET /contacts); custom field types "numeric" (a number) and "date" ("YYYY-MM-DD").
[FORMIE]  github.com/digitalpulsebe/craft-formie-flexmail src/integrations/emailmarketing/Flexmail.php: paging by
          limit/offset against top-level total; POST /contacts body {source (int), email, first_name, name,
          language, custom_fields {placeholder: value}}, the answer's id; PUT /contacts/{id} for an existing one;
          custom field values: multiple_choice an array, numeric a float, date Y-m-d; GET / answering {user}.
[STATIK]  github.com/statikbe/craft-flexmail src/services/Api.php and Contact.php: GET /contacts?email= answers no
          _embedded when nobody has that address; the contact's _links.self.href is a path ("/contacts/123")
          joined to the base URL; 409 Conflict for a subscription that exists; commit 559ddc4: "flexmail api does
          not accept upercase letters in email address" (the plugin lowercases first).
[TS]      A TypeScript provider for Flexmail found by the code index (its repository is not named there):
          created resources are read from the Location header ("readCreatedId(location)"); error bodies are read
          for detail and title; Accept "application/hal+json, application/json"; GET / answers {user: {first_name,
          name, email, company}}; POST .../unsubscribe is read without a body (or 204).
[OPTIN]   A sign-up handler found by the code index (api.flexmail.eu with FLEXMAIL_ACCOUNT_ID / FLEXMAIL_TOKEN):
          "409 = this address is already subscribed or already has a pending confirmation" for POST /contacts
          and POST /opt-ins.
[APTECO]  github.com/Apteco/AptecoCustomChannels Flexmail/: REST calls with Accept and Content-Type
          "application/hal+json"; sources paged with limit=500&offset; the SOAP states "unsubscribed",
          "bounced-out", "blacklisted".
[SUPPORT] Flexmail's help centre: https://en.support.flexmail.eu/article/1188-about-the-flexmail-subscriptions
          ("a contact at least has an email address, a language, and a source"; contact limit);
          .../article/294-about-blacklisted-contacts and .../article/308-manage-blacklisted-contacts (unsubscribed,
          spam-complaint, bounced and manually blacklisted contacts leave the active contacts, with a date and a
          reason; "Email addresses on the blacklist cannot be imported or added manually to the database
          anymore"; an unsubscriber may give a reason on the unsubscribe page); .../article/436-configure-bounces
          (after 3 soft or hard bounces by default a contact gets the status "bounced out");
          .../article/1373-transactional-email-troubleshooting ("API returns a 401 Unauthorized error: Your account
          ID or personal access token is wrong"; "The username is your numeric account ID").
[SOAP]    https://flexmail.be/api-getting-started (the SOAP API): "rate limiting is effected to 60 calls/minute".

What changed at Flexmail since the last run: [POSTHOG] found no list endpoint with a time filter, and the contact
resource has no status or date ([AIRBYTE]); an unsubscribed or bounced contact simply leaves GET /contacts
([PIPEDREAM], [SUPPORT]). The documented way to hear of them is a webhook ([REF] POST /webhooks with event_name,
target_url, verification_token; [AIRBYTE] GET /webhook-events lists the event names). The event names and the
delivered payload were not in any source read: see WEBHOOK_EVENTS and delivery_payload, both undocumented choices.

Limits: 60 requests a minute per account ([POSTHOG], [SOAP]); answered 429 ([POSTHOG] retries 429). Nothing read
documents a monthly request limit, X-RateLimit-* headers or Retry-After: the monthly limit is off unless a test
sets one, no X-RateLimit-* header is sent, and Retry-After only when a test sets ``retry_after``.

Where no source says what Flexmail does, a comment says "undocumented" and names the choice made.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import BasicAuth, hdrs, web
from aiohttp.typedefs import Handler

from .loopback_http import LoopbackHttp

Json = dict[str, Any]

HAL_JSON = "application/hal+json"  # [APTECO], [TS] the media type the clients send and accept
PROBLEM_JSON = "application/problem+json"  # undocumented: errors are read for title/detail/status ([TS], [FORMIE])
# [REF] limit's accepted range 1-500; [POSTHOG] "accept a limit of up to 500". Undocumented default: 20.
MAX_LIMIT, DEFAULT_LIMIT = 500, 20
PER_MINUTE_LIMIT = 60  # [POSTHOG] "60 requests/minute" per account; [SOAP] "60 calls/minute"
CUSTOM_FIELD_TYPES = ("free_text", "multiple_choice", "numeric", "date")  # [POSTHOG] canonical_descriptions.py
# [PIPEDREAM]/[TS] language codes Flexmail accounts use; an account has its own subset ([PIPEDREAM]
# /account-contact-languages). Undocumented which a fresh account has: nl, fr, en here.
ACCOUNT_LANGUAGES = ("nl", "fr", "en")
# Undocumented: the names GET /webhook-events lists ([AIRBYTE] only says they are strings). Chosen after [SUPPORT]'s
# and [APTECO]'s words for the two states a sync must hear of: unsubscribed, bounced out.
WEBHOOK_EVENTS = ("contact.unsubscribed", "contact.bounced_out")
# Undocumented how strict the address check is: one "@", a dot in the domain, and ([STATIK] 559ddc4) no capitals.
EMAIL_PATTERN = re.compile(r"[^@\sA-Z]+@[^@\sA-Z]+\.[^@\s.A-Z]+")
DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")  # [FORMIE] date('Y-m-d'); [PIPEDREAM] "YYYY-MM-DD"


def iso(moment: datetime) -> str:
    """Undocumented: the time format of a webhook payload. ISO 8601 in UTC with an offset, whole seconds."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat()


class ApiError(Exception):
    """An error answered as a problem document. Undocumented: Flexmail's error bodies beyond the title, detail and
    status its clients read ([TS], [FORMIE]); RFC 7807's "about:blank" type with the HTTP phrase as title here."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"{status} {detail}")
        self.status, self.detail = status, detail or HTTPStatus(status).description

    def body(self) -> Json:
        return {
            "type": "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }


def invalid(detail: str) -> ApiError:
    """Undocumented: the status of a refused contact payload. 422 (the body parsed, its content did not validate)."""
    return ApiError(422, detail)


@dataclass
class Reply:
    status: int
    body: Json | None  # None: an empty body (201 bodies always have one; 204 never)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Source:
    """[AIRBYTE] a source {id (number), name}; [SUPPORT] every contact has one."""

    id: int
    name: str

    def to_json(self) -> Json:
        return {"id": self.id, "name": self.name, "_links": {"self": {"href": f"/sources/{self.id}"}}}


@dataclass
class CustomField:
    """[AIRBYTE], [POSTHOG] a custom field {id (string), type, name, placeholder}."""

    id: str
    placeholder: str
    name: str
    type: str = "free_text"

    def to_json(self) -> Json:
        document = {"id": self.id, "type": self.type, "name": self.name, "placeholder": self.placeholder}
        return {**document, "_links": {"self": {"href": f"/custom-fields/{self.id}"}}}


@dataclass
class Contact:
    """A contact: [AIRBYTE]'s fields, plus what the API does not show: its sources, its status ("active",
    "unsubscribed" or "bounced_out", after [SUPPORT]/[APTECO]) and when and why it left."""

    id: int
    email: str
    language: str
    sources: list[int]
    first_name: str | None = None
    name: str | None = None
    custom_fields: dict[str, Any] = field(default_factory=dict)
    status: str = "active"
    left_at: datetime | None = None
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.status == "active"

    def to_json(self) -> Json:
        """[AIRBYTE] the contact record. Undocumented: unset names are null, and only custom fields with a value
        appear (the [PIPEDREAM] sample shows set ones only)."""
        return {
            "id": self.id,
            "email": self.email,
            "first_name": self.first_name,
            "name": self.name,
            "language": self.language,
            "custom_fields": dict(self.custom_fields),
            "_links": {"self": {"href": f"/contacts/{self.id}"}, "sources": {"href": f"/contacts/{self.id}/sources"}},
        }


@dataclass
class Webhook:
    """[REF] POST /webhooks {event_name, target_url, verification_token}. Undocumented: ids are UUID strings ([REF]
    types the path id as a string)."""

    id: str
    event_name: str
    target_url: str
    verification_token: str | None = None

    def to_json(self) -> Json:
        document = {"id": self.id, "event_name": self.event_name, "target_url": self.target_url}
        return {**document, "_links": {"self": {"href": f"/webhooks/{self.id}"}}}


@dataclass
class Event:
    """A contact leaving the active contacts: what a webhook announces and what tests read back."""

    name: str
    contact_id: int
    email: str
    at: datetime
    reason: str


@dataclass
class Delivery:
    """One webhook POST: its target, payload, and the receiver's status (None if it could not be reached)."""

    event_name: str
    target_url: str
    payload: Json
    status: int | None
    error: str = ""


def delivery_payload(event: Event, webhook: Webhook) -> Json:
    """Undocumented: the body Flexmail POSTs to a webhook's target_url. Chosen: the event name, when it happened,
    the webhook's verification_token (so the receiver can tell the call is Flexmail's), the contact's id and
    address, and the reason (the unsubscriber's own words, or the bounce)."""
    return {
        "event_name": event.name,
        "occurred_at": iso(event.at),
        "verification_token": webhook.verification_token,
        "contact": {"id": event.contact_id, "email": event.email},
        "reason": event.reason,
    }


Route = Callable[[Mapping[str, str], Mapping[str, str], Any], Reply]
CONTACT = r"/contacts/(?P<id>\d+)"
WEBHOOK = r"/webhooks/(?P<id>[^/]+)"


class FlexmailApi:
    """The API's behaviour without HTTP: state, routes and contact rules. Callers hold ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.contacts: dict[int, Contact] = {}
        self.sources: dict[int, Source] = {}
        self.custom_fields: dict[str, CustomField] = {}  # by placeholder
        self.webhooks: dict[str, Webhook] = {}
        self.languages: list[str] = list(ACCOUNT_LANGUAGES)
        self.events: list[Event] = []  # every contact that left, in order
        self.outbox: list[Event] = []  # events not yet delivered to webhooks
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.user: Json = {"first_name": "Test", "name": "Account", "email": "owner@example.com", "company": "Test"}
        self._next_contact_id = 1
        self.routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("GET", re.compile(r"/"), self.get_root),
            ("GET", re.compile(r"/account-contact-languages"), self.get_languages),
            ("GET", re.compile(r"/contacts"), self.list_contacts),
            ("POST", re.compile(r"/contacts"), self.create_contact),
            ("GET", re.compile(CONTACT), self.get_contact),
            ("PUT", re.compile(CONTACT), self.replace_contact),
            ("PATCH", re.compile(CONTACT), self.update_contact),
            ("POST", re.compile(CONTACT + r"/unsubscribe"), self.unsubscribe_contact),
            ("GET", re.compile(CONTACT + r"/sources"), self.list_contact_sources),
            ("GET", re.compile(r"/custom-fields"), self.list_custom_fields),
            ("GET", re.compile(r"/sources"), self.list_sources),
            ("GET", re.compile(r"/sources/(?P<id>\d+)"), self.get_source),
            ("GET", re.compile(r"/webhook-events"), self.list_webhook_events),
            ("GET", re.compile(r"/webhooks"), self.list_webhooks),
            ("POST", re.compile(r"/webhooks"), self.create_webhook),
            ("GET", re.compile(WEBHOOK), self.get_webhook),
            ("DELETE", re.compile(WEBHOOK), self.delete_webhook),
        ]

    def dispatch(self, method: str, path: str, query: Mapping[str, str], text: str) -> Reply:
        try:
            route, params = self._route(method, path.rstrip("/") or "/")
            body = parse_body(text) if method in ("POST", "PUT", "PATCH") else None
            return route(params, query, body)
        except ApiError as error:
            return Reply(error.status, error.body())

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        matched = [(verb, pattern.fullmatch(path), route) for verb, pattern, route in self.routes]
        for verb, match, route in matched:
            if match and verb == method:
                return route, match.groupdict()
        if any(match for _, match, _ in matched):
            raise ApiError(405)
        raise ApiError(404)  # also every documented endpoint this fake does not model (interests, segments, ...)

    # --- state -------------------------------------------------------------------------------------------------

    def new_contact(self, email: str, language: str, source: int, **fields: Any) -> Contact:
        contact = Contact(id=self._next_contact_id, email=email, language=language, sources=[source], **fields)
        self._next_contact_id += 1
        self.contacts[contact.id] = contact
        return contact

    def by_email(self, email: str) -> Contact | None:
        """[STATIK] addresses are stored lower-case; undocumented whether a search ignores case: it matches
        exactly here, so a client that does not lower-case finds nobody (as [STATIK] found)."""
        return next((contact for contact in self.contacts.values() if contact.email == email), None)

    def active_contact(self, contact_id: str) -> Contact:
        contact = self.contacts.get(int(contact_id))
        if contact is None or not contact.active:
            # Undocumented: what a blacklisted contact's own URL answers. 404, as it left the contacts ([PIPEDREAM]).
            raise ApiError(404, f"Contact {contact_id} not found.")
        return contact

    def leave(self, contact: Contact, status: str, at: datetime, reason: str) -> Event:
        """[SUPPORT] an unsubscribed or bounced-out contact leaves the active contacts with a date and a reason."""
        contact.status, contact.left_at, contact.reason = status, at, reason
        name = "contact.unsubscribed" if status == "unsubscribed" else "contact.bounced_out"
        event = Event(name, contact.id, contact.email, at, reason)
        self.events.append(event)
        self.outbox.append(event)
        return event

    def take_outbox(self) -> list[Event]:
        events, self.outbox = self.outbox, []
        return events

    # --- routes --------------------------------------------------------------------------------------------------

    def get_root(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[FORMIE], [TS] GET / answers the token's user. Undocumented: the _links listed (those modelled here)."""
        links = {name: {"href": f"/{name}"} for name in ("contacts", "custom-fields", "sources", "webhooks")}
        return Reply(200, {"user": dict(self.user), "_links": {"self": {"href": "/"}, **links}})

    def get_languages(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        return Reply(200, {"languages": list(self.languages)})  # [PIPEDREAM], [FORMIE]: {languages: [...]}

    def list_contacts(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REF] GET /contacts, filtered by ``email``; active contacts only ([PIPEDREAM], [SUPPORT]). Undocumented:
        the order (by id here). The ``interest`` filter ([POSTHOG]) is not modelled: it answers 400."""
        if "interest" in query:
            raise ApiError(400, "The interest filter is not modelled by this fake.")
        rows = [contact for contact in self.contacts.values() if contact.active]
        if "email" in query:
            rows = [contact for contact in rows if contact.email == query["email"]]
        return Reply(200, collection("/contacts", query, [contact.to_json() for contact in rows]))

    def get_contact(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        return Reply(200, self.active_contact(params["id"]).to_json())

    def create_contact(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REF] POST /contacts: email, language and source required ([SUPPORT] "a contact at least has an email
        address, a language, and a source"); first_name, name, custom_fields optional. Answered 201 with the
        contact ([PIPEDREAM], [FORMIE] read its id) and a Location header ([TS] reads the id from it)."""
        document = require_object(body)
        email = self._new_email(document.get("email"), None)
        language = self._language(document.get("language"), required=True)
        source = self._source(document.get("source"))
        names = checked_names(document, required=False)
        custom = checked_custom_fields(self.custom_fields, document.get("custom_fields"))
        contact = self.new_contact(email, language, source, **names, custom_fields=drop_empty(custom))
        return Reply(201, contact.to_json(), {hdrs.LOCATION: f"/contacts/{contact.id}"})

    def replace_contact(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REF] PUT "Replace Contact": email, first_name, name and language required. Undocumented: what a
        replace does to custom fields left out. They are cleared (it replaces the whole contact, as [STATIK] sends
        it back whole); answered 204 (undocumented; [PIPEDREAM] "nothing to return on update")."""
        contact = self.active_contact(params["id"])
        document = require_object(body)
        email = self._new_email(document.get("email"), contact)
        language = self._language(document.get("language"), required=True)
        names = checked_names(document, required=True)
        custom = checked_custom_fields(self.custom_fields, document.get("custom_fields"))
        contact.email, contact.language, contact.custom_fields = email, language, drop_empty(custom)
        contact.first_name, contact.name = names["first_name"], names["name"]
        return Reply(204, None)

    def update_contact(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REF] PATCH "Update Contact": first_name, name, language, custom_fields, all optional. Undocumented:
        given custom fields are merged (null or "" clears one); other members (email among them) are ignored;
        answered 204 ([PIPEDREAM] "nothing to return on update")."""
        contact = self.active_contact(params["id"])
        document = require_object(body)
        language = self._language(document.get("language"), required=False)
        names = checked_names(document, required=False)
        custom = checked_custom_fields(self.custom_fields, document.get("custom_fields"))
        contact.language = language or contact.language
        for key in ("first_name", "name"):
            if key in document:
                setattr(contact, key, names[key])
        contact.custom_fields = drop_empty({**contact.custom_fields, **custom})
        return Reply(204, None)

    def unsubscribe_contact(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REF], [PIPEDREAM] POST /contacts/{id}/unsubscribe, no body. Undocumented: answered 204; the reason
        recorded; and that it is announced to webhooks like any unsubscribe (it is, here)."""
        contact = self.active_contact(params["id"])
        self.leave(contact, "unsubscribed", self.clock(), "unsubscribed through the API")
        return Reply(204, None)

    def list_contact_sources(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        contact = self.active_contact(params["id"])  # [AIRBYTE] _links.sources; [POSTHOG] paginated
        rows = [self.sources[source].to_json() for source in contact.sources if source in self.sources]
        return Reply(200, collection(f"/contacts/{contact.id}/sources", query, rows))

    def list_custom_fields(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[POSTHOG] the whole collection in one response, {_embedded: {item}}, filterable by ``type``. The
        ``language`` filter ([POSTHOG]) is accepted and ignored (undocumented what it selects)."""
        rows = [cf for cf in self.custom_fields.values() if query.get("type") in (None, cf.type)]
        return Reply(200, whole_collection("/custom-fields", [cf.to_json() for cf in rows]))

    def list_sources(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        rows = [source.to_json() for source in self.sources.values()]  # [AIRBYTE], [POSTHOG] paginated
        return Reply(200, collection("/sources", query, rows))

    def get_source(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        source = self.sources.get(int(params["id"]))
        if source is None:
            raise ApiError(404, f"Source {params['id']} not found.")
        return Reply(200, source.to_json())

    def list_webhook_events(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        return Reply(200, {"events": list(WEBHOOK_EVENTS), "_links": {"self": {"href": "/webhook-events"}}})

    def list_webhooks(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        rows = [webhook.to_json() for webhook in self.webhooks.values()]  # undocumented: paged like the others
        return Reply(200, collection("/webhooks", query, rows))

    def create_webhook(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        """[REF] POST /webhooks: event_name and target_url required, verification_token optional. Undocumented:
        answered 201 with the webhook and a Location header, like a contact."""
        document = require_object(body)
        event_name, target_url = document.get("event_name"), document.get("target_url")
        if event_name not in WEBHOOK_EVENTS:
            raise invalid(f"event_name must be one of: {', '.join(WEBHOOK_EVENTS)}.")
        if not isinstance(target_url, str) or not target_url.startswith(("http://", "https://")):
            raise invalid("target_url must be an http(s) URL.")
        token = document.get("verification_token")
        webhook = Webhook(str(uuid.uuid4()), event_name, target_url, token if isinstance(token, str) else None)
        self.webhooks[webhook.id] = webhook
        return Reply(201, webhook.to_json(), {hdrs.LOCATION: f"/webhooks/{webhook.id}"})

    def get_webhook(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        return Reply(200, self._webhook(params["id"]).to_json())

    def delete_webhook(self, params: Mapping[str, str], query: Mapping[str, str], body: Any) -> Reply:
        del self.webhooks[self._webhook(params["id"]).id]
        return Reply(204, None)  # undocumented: 204

    # --- checks --------------------------------------------------------------------------------------------------

    def _webhook(self, webhook_id: str) -> Webhook:
        if webhook_id not in self.webhooks:
            raise ApiError(404, f"Webhook {webhook_id} not found.")
        return self.webhooks[webhook_id]

    def _new_email(self, email: Any, contact: Contact | None) -> str:
        """A valid address no other contact has. [OPTIN] 409 for one that exists; [SUPPORT] a blacklisted
        address "cannot be ... added manually": 409 too (undocumented status)."""
        if email is None:
            raise invalid("email is required.")
        if not isinstance(email, str) or not EMAIL_PATTERN.fullmatch(email):
            raise invalid(f"{email!r} is not a valid email address.")
        holder = self.by_email(email)
        if holder is not None and holder is not contact:
            state = "is blacklisted" if not holder.active else "already exists"
            raise ApiError(409, f"A contact with email {email} {state}.")
        return email

    def _language(self, language: Any, *, required: bool) -> str:
        if language is None and not required:
            return ""
        if language not in self.languages:  # [PIPEDREAM] the account's own languages
            raise invalid(f"language must be one of the account's languages: {', '.join(self.languages)}.")
        return str(language)

    def _source(self, source: Any) -> int:
        if source is None:
            raise invalid("source is required.")
        if isinstance(source, bool) or not isinstance(source, int) or source not in self.sources:
            raise invalid(f"source {source!r} is not a source of this account.")  # undocumented wording and status
        return source


def parse_body(text: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(400, "The request body is not valid JSON.") from error  # undocumented: 400


def require_object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    return body


def checked_names(document: Json, *, required: bool) -> dict[str, str | None]:
    names: dict[str, str | None] = {}
    for key in ("first_name", "name"):
        value = document.get(key)
        if value is None and required and key not in document:
            raise invalid(f"{key} is required.")
        if value is not None and not isinstance(value, str):
            raise invalid(f"{key} must be a string.")
        names[key] = value
    return names


def checked_custom_fields(fields: Mapping[str, CustomField], values: Any) -> dict[str, Any]:
    """[POSTHOG] values keyed by placeholder; types after [FORMIE]/[PIPEDREAM]. Undocumented: an unknown placeholder
    is refused (not ignored), null or "" clears a value, and multiple_choice options are not checked."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise invalid("custom_fields must be an object keyed by custom field placeholder.")
    for placeholder, value in values.items():
        custom_field = fields.get(placeholder)
        if custom_field is None:
            raise invalid(f"Unknown custom field {placeholder!r}.")
        if value not in (None, "") and not value_fits(custom_field.type, value):
            raise invalid(f"Custom field {placeholder!r} of type {custom_field.type} cannot hold {value!r}.")
    return dict(values)


def value_fits(kind: str, value: Any) -> bool:
    if kind == "numeric":  # [FORMIE] floatval, [PIPEDREAM] integer: a JSON number
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "date":
        return isinstance(value, str) and DATE_PATTERN.fullmatch(value) is not None and is_date(value)
    if kind == "multiple_choice":  # [FORMIE] an array of the chosen options
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, str)


def is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def drop_empty(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value not in (None, "")}


def paging(query: Mapping[str, str]) -> tuple[int, int]:
    """[REF] limit 1-500 and offset from 0. Undocumented: what an out-of-range value gets: 400 here."""
    try:
        limit, offset = int(query.get("limit", DEFAULT_LIMIT)), int(query.get("offset", 0))
    except ValueError as error:
        raise ApiError(400, "limit and offset must be integers.") from error
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}, offset 0 or more.")
    return offset, limit


def collection(path: str, query: Mapping[str, str], rows: list[Json]) -> Json:
    """[POSTHOG] {total, limit, offset, _embedded: {item}} with _embedded left out when the page is empty ([STATIK]
    relies on that too). Undocumented: the _links. self always; next (HAL's convention) while rows remain. Clients
    ([POSTHOG], [FORMIE]) page by offset against total, and a transport should too."""
    offset, limit = paging(query)
    page = rows[offset : offset + limit]
    links = {"self": {"href": page_href(path, query, offset, limit)}}
    if offset + limit < len(rows):
        links["next"] = {"href": page_href(path, query, offset + limit, limit)}
    document: Json = {"total": len(rows), "limit": limit, "offset": offset, "_links": links}
    if page:
        document["_embedded"] = {"item": page}
    return document


def whole_collection(path: str, rows: list[Json]) -> Json:
    """[POSTHOG] an unpaged collection: {_embedded: {item}}; undocumented: its self link."""
    document: Json = {"_links": {"self": {"href": path}}}
    if rows:
        document["_embedded"] = {"item": rows}
    return document


def page_href(path: str, query: Mapping[str, str], offset: int, limit: int) -> str:
    return f"{path}?{urlencode({**query, 'limit': limit, 'offset': offset})}"


def problem_response(error: ApiError, retry_after: int | None = None) -> web.Response:
    headers = {}
    if error.status == 401:
        headers[hdrs.WWW_AUTHENTICATE] = 'Basic realm="Flexmail API"'  # RFC 9110 requires the challenge on a 401
    if error.status == 429 and retry_after is not None:
        headers[hdrs.RETRY_AFTER] = str(retry_after)
    return web.json_response(error.body(), status=error.status, content_type=PROBLEM_JSON, headers=headers)


def reply_response(reply: Reply) -> web.Response:
    if reply.body is None:
        return web.Response(status=reply.status, headers=reply.headers)
    content_type = PROBLEM_JSON if reply.status >= 400 else HAL_JSON
    return web.json_response(reply.body, status=reply.status, content_type=content_type, headers=reply.headers)


@dataclass
class Usage:
    """Requests counted per calendar month and per clock minute, on the server's clock."""

    month: tuple[int, int] = (0, 0)
    calls_this_month: int = 0
    minute: datetime | None = None
    calls_this_minute: int = 0

    def roll(self, now: datetime) -> None:
        if (now.year, now.month) != self.month:
            self.month, self.calls_this_month = (now.year, now.month), 0
        minute = now.replace(second=0, microsecond=0)
        if minute != self.minute:
            self.minute, self.calls_this_minute = minute, 0


class FlexmailServer(LoopbackHttp):
    """The fake on ``127.0.0.1`` in a background thread: auth, limits, injected failures, webhook delivery, and
    every request counted. ``api`` holds the state; the methods below set and read it."""

    label = "the fake Flexmail API"

    def __init__(self, account_id: str = "123456", token: str | None = None) -> None:
        super().__init__()
        self.api = FlexmailApi()
        self.account_id = account_id  # [SUPPORT] "your numeric account ID"
        self.token = token or secrets.token_hex(20)  # undocumented: a token's form
        self.request_count = 0  # every request received, refused ones included
        self.requests: list[str] = []  # "METHOD /path" of each, in order
        self.monthly_limit: int | None = None  # undocumented: no monthly request limit is documented
        self.per_minute_limit: int | None = PER_MINUTE_LIMIT
        self.retry_after: int | None = None  # undocumented: Retry-After on a 429, sent only when a test sets it
        self.usage = Usage()
        self.deliveries: list[Delivery] = []
        self._failures: deque[int] = deque()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.api.clock

    @clock.setter
    def clock(self, clock: Callable[[], datetime]) -> None:
        self.api.clock = clock

    @property
    def calls_this_month(self) -> int:
        with self.api.lock:
            self.usage.roll(self.api.clock())
            return self.usage.calls_this_month

    @calls_this_month.setter
    def calls_this_month(self, calls: int) -> None:
        with self.api.lock:
            self.usage.roll(self.api.clock())
            self.usage.calls_this_month = calls

    @property
    def events(self) -> list[Event]:
        return self.api.events

    # --- state API for tests -------------------------------------------------------------------------------------

    def add_source(self, name: str, source_id: int | None = None) -> Source:
        with self.api.lock:
            source = Source(source_id or max(self.api.sources, default=0) + 1, name)
            self.api.sources[source.id] = source
        return source

    def add_custom_field(self, placeholder: str, name: str = "", type: str = "free_text") -> CustomField:
        if type not in CUSTOM_FIELD_TYPES:
            raise ValueError(f"custom field types are {CUSTOM_FIELD_TYPES}, not {type!r}")
        custom_field = CustomField(str(uuid.uuid4()), placeholder, name or placeholder, type)
        with self.api.lock:
            self.api.custom_fields[placeholder] = custom_field
        return custom_field

    def add_contact(self, email: str, language: str = "nl", source: int | None = None, **fields: Any) -> Contact:
        """Puts a contact straight into the state (no validation); ``source`` defaults to the first source."""
        with self.api.lock:
            source_id = source if source is not None else min(self.api.sources, default=0)
            return self.api.new_contact(email, language, source_id, **fields)

    def contact(self, email: str) -> Contact | None:
        """The contact with this address, whatever its status."""
        with self.api.lock:
            return self.api.by_email(email)

    def unsubscribe_at_flexmail(self, email: str, at: datetime | None = None, reason: str = "") -> Event:
        """The contact unsubscribed at Flexmail (an unsubscribe link), giving ``reason``; webhooks are told."""
        return self._leave(email, "unsubscribed", at, reason)

    def bounce(self, email: str, at: datetime | None = None, reason: str = "hard bounce") -> Event:
        """The contact bounced out ([SUPPORT] after the configured number of bounces); webhooks are told."""
        return self._leave(email, "bounced_out", at, reason)

    def fail_next(self, count: int, status: int = 429) -> None:
        """Answers the next ``count`` requests with ``status`` (429, or a 5xx) and a problem body."""
        self._failures.extend([status] * count)

    def _leave(self, email: str, status: str, at: datetime | None, reason: str) -> Event:
        with self.api.lock:
            contact = self.api.by_email(email)
            if contact is None:
                raise KeyError(email)
            event = self.api.leave(contact, status, at or self.api.clock(), reason)
            events = self.api.take_outbox()
        if self._loop is not None and events:
            asyncio.run_coroutine_threadsafe(self._deliver(events), self._loop).result(30)
        return event

    # --- HTTP ----------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts the request, then injected failures, auth ([REF] Basic), and the limits."""
        self.request_count += 1
        self.requests.append(f"{request.method} {request.path}")
        if self._failures:
            return problem_response(ApiError(self._failures.popleft()), self.retry_after)
        if presented_credentials(request) != (self.account_id, self.token):
            # [SUPPORT] 401 for a wrong account id or token; undocumented detail wording. A missing one alike.
            return problem_response(ApiError(401, "Invalid account ID or personal access token."))
        refusal = self._over_limit()
        if refusal is not None:
            return problem_response(refusal, self.retry_after)
        return await handler(request)

    def _over_limit(self) -> ApiError | None:
        """Counts an authenticated request against the month and the minute; a refused one is not counted."""
        with self.api.lock:
            usage = self.usage
            usage.roll(self.api.clock())
            if self.monthly_limit is not None and usage.calls_this_month >= self.monthly_limit:
                return ApiError(429, f"The monthly limit of {self.monthly_limit} API requests is reached.")
            if self.per_minute_limit is not None and usage.calls_this_minute >= self.per_minute_limit:
                return ApiError(429, f"The limit of {self.per_minute_limit} API requests a minute is reached.")
            usage.calls_this_month += 1
            usage.calls_this_minute += 1
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        text = await request.text()
        with self.api.lock:
            reply = self.api.dispatch(request.method, request.path, request.query, text)
            events = self.api.take_outbox()
        await self._deliver(events)
        return reply_response(reply)

    async def _deliver(self, events: list[Event]) -> None:
        """POSTs each event to every webhook registered for it, one at a time. Undocumented: retries (none), the
        content type (JSON), and what a failed delivery does (it is recorded in ``deliveries``, nothing more)."""
        with self.api.lock:
            targets = [
                (event, hook)
                for event in events
                for hook in self.api.webhooks.values()
                if hook.event_name == event.name
            ]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for event, webhook in targets:
                self.deliveries.append(await post_event(session, event, webhook))


async def post_event(session: aiohttp.ClientSession, event: Event, webhook: Webhook) -> Delivery:
    payload = delivery_payload(event, webhook)
    try:
        async with session.post(webhook.target_url, json=payload) as response:
            return Delivery(event.name, webhook.target_url, payload, response.status)
    except (aiohttp.ClientError, TimeoutError) as error:
        return Delivery(event.name, webhook.target_url, payload, None, repr(error))


def presented_credentials(request: web.Request) -> tuple[str, str] | None:
    """[REF], [AIRBYTE] HTTP Basic: the account id as user name, the personal access token as password."""
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    try:
        auth = BasicAuth.decode(header) if header else None
    except ValueError:
        return None
    return (auth.login, auth.password) if auth is not None else None
