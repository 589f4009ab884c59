"""The fake Flexmail REST API (tests/flexmail_server.py) over real HTTP on loopback, with urllib."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from .flexmail_server import WEBHOOK_EVENTS, FlexmailServer

PROBLEM_KEYS = {"type", "title", "status", "detail"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


class Clock:
    """Time the fake counts limits and stamps events with, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 31, 23, 58, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: int) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class Receiver:
    """A webhook target on loopback that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/flexmail"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[FlexmailServer]:
    with FlexmailServer() as running:
        running.clock = clock
        running.add_source("CRM sync", source_id=4)
        running.add_custom_field("company", "Company")
        running.add_custom_field("age", "Age", type="numeric")
        yield running


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    target = Receiver()
    yield target
    target.close()


def call(
    server: FlexmailServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    auth: tuple[str, str] | None = None,
    query: dict[str, Any] | None = None,
) -> Answer:
    """One request with Basic auth (account id : personal access token), as Flexmail's clients send it."""
    url = server.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    user, password = auth or (server.account_id, server.token)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    request.add_header("Accept", "application/hal+json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    return send(request)


def send(request: urllib.request.Request) -> Answer:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers), decode(response.read()))
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), decode(error.read()))


def decode(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


def assert_problem(answer: Answer, status: int, detail_part: str = "") -> None:
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert set(answer.body) == PROBLEM_KEYS
    assert answer.body["status"] == status
    assert detail_part in answer.body["detail"]


def new_contact(email: str, **fields: Any) -> dict[str, Any]:
    return {"email": email, "language": "nl", "source": 4, **fields}


def items(answer: Answer) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = answer.body.get("_embedded", {}).get("item", [])
    return rows


def test_the_account_id_and_token_are_accepted_and_root_answers_the_user(server: FlexmailServer) -> None:
    answer = call(server, "GET", "/")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("application/hal+json")
    assert set(answer.body["user"]) == {"first_name", "name", "email", "company"}
    assert call(server, "GET", "/account-contact-languages").body == {"languages": ["nl", "fr", "en"]}


def test_a_wrong_or_missing_token_is_refused_401_with_a_problem_and_a_basic_challenge(server: FlexmailServer) -> None:
    wrong = call(server, "GET", "/contacts", auth=(server.account_id, "not-the-token"))
    assert_problem(wrong, 401, "personal access token")
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    assert_problem(call(server, "GET", "/contacts", auth=("999", server.token)), 401)
    missing = send(urllib.request.Request(server.url + "/contacts"))
    assert_problem(missing, 401)


def test_create_then_find_then_update_a_contact_with_a_custom_field(server: FlexmailServer) -> None:
    created = call(
        server, "POST", "/contacts", new_contact("ann@example.com", first_name="Ann", custom_fields={"company": "Acme"})
    )
    assert created.status == 201
    contact_id = created.body["id"]
    assert created.headers["Location"] == f"/contacts/{contact_id}"
    found = call(server, "GET", "/contacts", query={"email": "ann@example.com"})
    assert (found.body["total"], [row["id"] for row in items(found)]) == (1, [contact_id])
    row = items(found)[0]
    assert (row["first_name"], row["name"], row["language"]) == ("Ann", None, "nl")
    assert row["custom_fields"] == {"company": "Acme"}
    assert row["_links"]["self"]["href"] == f"/contacts/{contact_id}"
    patch = {"name": "Smith", "custom_fields": {"age": 41, "company": None}}
    assert call(server, "PATCH", f"/contacts/{contact_id}", patch).status == 204
    read = call(server, "GET", f"/contacts/{contact_id}").body
    assert (read["first_name"], read["name"], read["custom_fields"]) == ("Ann", "Smith", {"age": 41})
    stored = server.contact("ann@example.com")
    assert stored is not None and stored.sources == [4] and stored.custom_fields == {"age": 41}


def test_put_replaces_the_whole_contact_and_needs_every_documented_member(server: FlexmailServer) -> None:
    contact = server.add_contact("bob@example.com", first_name="Bob", custom_fields={"company": "Acme"})
    incomplete = call(server, "PUT", f"/contacts/{contact.id}", {"email": "bob@example.com", "language": "fr"})
    assert_problem(incomplete, 422, "first_name")
    whole = {"email": "robert@example.com", "first_name": "Robert", "name": "Jones", "language": "fr"}
    assert call(server, "PUT", f"/contacts/{contact.id}", whole).status == 204
    read = call(server, "GET", f"/contacts/{contact.id}").body
    assert (read["email"], read["language"], read["custom_fields"]) == ("robert@example.com", "fr", {})


def test_an_unknown_address_finds_nothing_and_the_empty_page_has_no_embedded(server: FlexmailServer) -> None:
    server.add_contact("ann@example.com")
    answer = call(server, "GET", "/contacts", query={"email": "nobody@example.com"})
    assert answer.status == 200
    assert answer.body["total"] == 0 and "_embedded" not in answer.body
    capitals = call(server, "GET", "/contacts", query={"email": "Ann@Example.com"})
    assert capitals.body["total"] == 0


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (new_contact("not-an-address"), "not a valid email address"),
        (new_contact("Ann@Example.com"), "not a valid email address"),
        (new_contact("ann@example.com", custom_fields={"nickname": "Annie"}), "Unknown custom field 'nickname'"),
        (new_contact("ann@example.com", custom_fields={"age": "forty"}), "Custom field 'age'"),
        ({"email": "ann@example.com", "language": "nl"}, "source is required"),
        ({"email": "ann@example.com", "source": 4}, "language"),
        (new_contact("ann@example.com", source=99), "source 99"),
    ],
)
def test_an_invalid_contact_is_refused_with_a_problem_and_nothing_is_stored(
    server: FlexmailServer, body: dict[str, Any], detail: str
) -> None:
    assert_problem(call(server, "POST", "/contacts", body), 422, detail)
    assert server.api.contacts == {}


def test_an_existing_or_blacklisted_address_cannot_be_created_again(server: FlexmailServer) -> None:
    server.add_contact("ann@example.com")
    assert_problem(call(server, "POST", "/contacts", new_contact("ann@example.com")), 409, "already exists")
    server.add_contact("gone@example.com")
    server.unsubscribe_at_flexmail("gone@example.com", reason="Not interested")
    assert_problem(call(server, "POST", "/contacts", new_contact("gone@example.com")), 409, "blacklisted")


def test_an_explicit_unsubscribe_takes_the_contact_out_of_the_contacts(server: FlexmailServer, clock: Clock) -> None:
    contact = server.add_contact("ann@example.com")
    answer = call(server, "POST", f"/contacts/{contact.id}/unsubscribe")
    assert (answer.status, answer.body) == (204, None)
    stored = server.contact("ann@example.com")
    assert stored is not None and (stored.status, stored.left_at) == ("unsubscribed", clock.now)
    assert call(server, "GET", "/contacts", query={"email": "ann@example.com"}).body["total"] == 0
    assert_problem(call(server, "GET", f"/contacts/{contact.id}"), 404)
    assert_problem(call(server, "POST", f"/contacts/{contact.id}/unsubscribe"), 404)


def register(server: FlexmailServer, event_name: str, url: str) -> dict[str, Any]:
    body = {"event_name": event_name, "target_url": url, "verification_token": "s3cret"}
    answer = call(server, "POST", "/webhooks", body)
    assert answer.status == 201
    webhook: dict[str, Any] = answer.body
    return webhook


def test_unsubscribes_and_bounces_since_a_time_reach_the_registered_webhooks(
    server: FlexmailServer, clock: Clock, receiver: Receiver
) -> None:
    assert call(server, "GET", "/webhook-events").body["events"] == list(WEBHOOK_EVENTS)
    for event_name in WEBHOOK_EVENTS:
        register(server, event_name, receiver.url)
    for email in ("early@example.com", "gone@example.com", "bounced@example.com", "stays@example.com"):
        server.add_contact(email)
    server.unsubscribe_at_flexmail("early@example.com", clock.now, "Before the last run")
    last_run = clock.advance(60)
    server.unsubscribe_at_flexmail("gone@example.com", clock.advance(30), "Too many emails")
    server.bounce("bounced@example.com", clock.advance(30))
    since = [
        (body["event_name"], body["contact"]["email"], body["occurred_at"], body["reason"])
        for body in receiver.bodies
        if datetime.fromisoformat(body["occurred_at"]) > last_run
    ]
    assert since == [
        ("contact.unsubscribed", "gone@example.com", "2024-05-31T23:59:30+00:00", "Too many emails"),
        ("contact.bounced_out", "bounced@example.com", "2024-06-01T00:00:00+00:00", "hard bounce"),
    ]
    assert {body["verification_token"] for body in receiver.bodies} == {"s3cret"}
    assert [delivery.status for delivery in server.deliveries] == [200, 200, 200]
    listed = items(call(server, "GET", "/contacts"))
    assert [row["email"] for row in listed] == ["stays@example.com"]


def test_a_webhook_is_told_only_its_own_event_and_can_be_deleted(server: FlexmailServer, receiver: Receiver) -> None:
    hook = register(server, "contact.bounced_out", receiver.url)
    assert_problem(
        call(server, "POST", "/webhooks", {"event_name": "contact.exploded", "target_url": receiver.url}), 422
    )
    server.add_contact("ann@example.com")
    server.unsubscribe_at_flexmail("ann@example.com")
    assert receiver.bodies == []
    assert call(server, "DELETE", f"/webhooks/{hook['id']}").status == 204
    assert call(server, "GET", "/webhooks").body["total"] == 0


def test_limit_and_offset_page_through_contacts_with_total_and_a_next_link(server: FlexmailServer) -> None:
    for number in range(5):
        server.add_contact(f"m{number}@example.com")
    page = call(server, "GET", "/contacts", query={"limit": 2, "offset": 2}).body
    assert [row["email"] for row in page["_embedded"]["item"]] == ["m2@example.com", "m3@example.com"]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
    emails, path = [], "/contacts?limit=2&offset=0"
    while path:
        answer = call(server, "GET", path).body
        emails += [row["email"] for row in answer["_embedded"]["item"]]
        path = answer["_links"].get("next", {}).get("href")
    assert emails == [f"m{number}@example.com" for number in range(5)]
    assert_problem(call(server, "GET", "/contacts", query={"limit": 501}), 400)
    assert_problem(call(server, "GET", "/contacts", query={"limit": 0}), 400)


def test_custom_fields_and_sources_are_listed_in_their_documented_shapes(server: FlexmailServer) -> None:
    fields = call(server, "GET", "/custom-fields").body
    assert [(f["placeholder"], f["name"], f["type"]) for f in fields["_embedded"]["item"]] == [
        ("company", "Company", "free_text"),
        ("age", "Age", "numeric"),
    ]
    assert "total" not in fields  # one unpaged response
    numeric = call(server, "GET", "/custom-fields", query={"type": "numeric"}).body["_embedded"]["item"]
    assert [f["placeholder"] for f in numeric] == ["age"]
    sources = call(server, "GET", "/sources").body
    assert (sources["total"], sources["_embedded"]["item"][0]["id"], sources["_embedded"]["item"][0]["name"]) == (
        1,
        4,
        "CRM sync",
    )


def test_the_monthly_limit_is_answered_429_until_the_month_turns(server: FlexmailServer, clock: Clock) -> None:
    server.monthly_limit = 10
    server.calls_this_month = 8
    assert [call(server, "GET", "/sources").status for _ in range(3)] == [200, 200, 429]
    assert server.calls_this_month == 10
    refused = call(server, "GET", "/sources")
    assert_problem(refused, 429, "monthly limit of 10")
    assert "Retry-After" not in refused.headers
    clock.advance(180)  # 2024-06-01: a new month
    assert call(server, "GET", "/sources").status == 200
    assert server.calls_this_month == 1


def test_sixty_requests_a_minute_then_429_until_the_next_minute(server: FlexmailServer, clock: Clock) -> None:
    server.retry_after = 30
    statuses = [call(server, "GET", "/sources").status for _ in range(61)]
    assert statuses == [200] * 60 + [429]
    refused = call(server, "GET", "/sources")
    assert_problem(refused, 429, "60 API requests a minute")
    assert refused.headers["Retry-After"] == "30"
    clock.advance(60)
    assert call(server, "GET", "/sources").status == 200


def test_injected_429_and_500_then_service_resumes_and_every_request_is_counted(server: FlexmailServer) -> None:
    server.fail_next(2, status=429)
    server.fail_next(1, status=500)
    statuses = [call(server, "GET", "/sources").status for _ in range(4)]
    assert statuses == [429, 429, 500, 200]
    assert server.request_count == 4
    assert server.requests == ["GET /sources"] * 4
    server.fail_next(1, status=500)
    assert_problem(call(server, "POST", "/contacts", new_contact("ann@example.com")), 500)
    assert server.contact("ann@example.com") is None
