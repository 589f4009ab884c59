"""The fake Mailchimp Marketing API (tests/mailchimp_server.py) over real HTTP on loopback, with urllib."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from .mailchimp_server import MailchimpServer, MergeField, subscriber_hash

LIST_ID = "a1b2c3d4e5"
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


class Clock:
    """Time the fake stamps last_changed with, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 9, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: int) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> Iterator[MailchimpServer]:
    with MailchimpServer() as running:
        running.api.clock = clock
        running.add_audience(
            LIST_ID,
            "Newsletter",
            [MergeField("FNAME", "First Name"), MergeField("AGE", "Age", type="number")],
        )
        yield running


def call(
    server: MailchimpServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = None,
    query: dict[str, str] | None = None,
) -> Answer:
    """One request with Basic auth (any user name, the key as password), as Mailchimp's clients send it."""
    url = server.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    credentials = base64.b64encode(f"anystring:{server.api_key if key is None else key}".encode()).decode()
    request.add_header("Authorization", f"Basic {credentials}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers), decode(response.read()))
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), decode(error.read()))


def decode(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


def member_path(email: str) -> str:
    return f"/lists/{LIST_ID}/members/{subscriber_hash(email)}"


def upsert(server: MailchimpServer, email: str, **fields: Any) -> Answer:
    return call(server, "PUT", member_path(email), {"email_address": email, **fields})


def assert_problem(answer: Answer, status: int, title: str) -> None:
    assert answer.status == status
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert set(answer.body) - {"errors"} == PROBLEM_KEYS
    assert (answer.body["status"], answer.body["title"]) == (status, title)


def test_ping_with_the_key_answers_health_status(server: MailchimpServer) -> None:
    answer = call(server, "GET", "/ping")
    assert (answer.status, answer.body) == (200, {"health_status": "Everything's Chimpy!"})
    assert server.api_key.endswith("-us19") and len(server.api_key.split("-")[0]) == 32


def test_wrong_or_missing_key_is_refused_with_problem_json(server: MailchimpServer) -> None:
    wrong = call(server, "GET", f"/lists/{LIST_ID}", key="0" * 32 + "-us19")
    assert_problem(wrong, 401, "API Key Invalid")
    request = urllib.request.Request(server.url + "/ping")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=10)
    assert missing.value.code == 401
    assert json.loads(missing.value.read())["title"] == "API Key Missing"


def test_unknown_list_is_404_and_known_list_reports_counts(server: MailchimpServer) -> None:
    assert_problem(call(server, "GET", "/lists/nosuchlist"), 404, "Resource Not Found")
    server.add_member(LIST_ID, "gone@example.com", "unsubscribed")
    upsert(server, "ann@example.com", status_if_new="subscribed")
    answer = call(server, "GET", f"/lists/{LIST_ID}")
    assert answer.body["id"] == LIST_ID
    assert answer.body["stats"]["member_count"] == 1
    assert answer.body["stats"]["unsubscribe_count"] == 1
    fields = call(server, "GET", f"/lists/{LIST_ID}/merge-fields").body
    assert [(mf["tag"], mf["type"]) for mf in fields["merge_fields"]] == [("FNAME", "text"), ("AGE", "number")]
    assert fields["total_items"] == 2


def test_upsert_creates_a_member_then_updates_it_and_it_reads_back(server: MailchimpServer, clock: Clock) -> None:
    created = upsert(server, "Ann@Example.com", status_if_new="subscribed", merge_fields={"FNAME": "Ann"})
    assert created.status == 200
    assert created.body["id"] == subscriber_hash("ann@example.com")
    assert created.body["status"] == "subscribed"
    assert created.body["merge_fields"] == {"FNAME": "Ann", "AGE": ""}
    clock.advance(60)
    # status_if_new only applies to a new address: the existing member keeps "subscribed".
    updated = upsert(server, "Ann@Example.com", status_if_new="pending", merge_fields={"AGE": 41})
    assert (updated.status, updated.body["status"]) == (200, "subscribed")
    read = call(server, "GET", member_path("ann@example.com"))
    assert read.body["merge_fields"] == {"FNAME": "Ann", "AGE": 41}
    assert read.body["last_changed"] == "2024-05-01T09:01:00+00:00"
    stored = server.member(LIST_ID, "ann@example.com")
    assert stored is not None and stored.merge_fields == {"FNAME": "Ann", "AGE": 41}


def test_tags_are_set_through_the_member_tags_endpoint(server: MailchimpServer) -> None:
    upsert(server, "ann@example.com", status_if_new="subscribed")
    tags = {"tags": [{"name": "vip", "status": "active"}, {"name": "trial", "status": "active"}]}
    assert call(server, "POST", member_path("ann@example.com") + "/tags", tags).status == 204
    call(server, "POST", member_path("ann@example.com") + "/tags", {"tags": [{"name": "trial", "status": "inactive"}]})
    read = call(server, "GET", member_path("ann@example.com")).body
    assert [tag["name"] for tag in read["tags"]] == ["vip"]
    assert read["tags_count"] == 1


def test_unknown_member_is_404(server: MailchimpServer) -> None:
    assert_problem(call(server, "GET", member_path("nobody@example.com")), 404, "Resource Not Found")


@pytest.mark.parametrize(
    ("email", "merge_fields", "field"),
    [
        ("not-an-address", {}, None),
        ("ann@example.com", {"NICKNAME": "Annie"}, "NICKNAME"),
        ("ann@example.com", {"AGE": "forty"}, "AGE"),
    ],
)
def test_invalid_address_or_merge_field_is_refused_and_nothing_stored(
    server: MailchimpServer, email: str, merge_fields: dict[str, str], field: str | None
) -> None:
    answer = upsert(server, email, status_if_new="subscribed", merge_fields=merge_fields)
    assert_problem(answer, 400, "Invalid Resource")
    if field is None:
        assert "looks fake or invalid" in answer.body["detail"]
    else:
        assert [error["field"] for error in answer.body["errors"]] == [field]
    assert server.audiences[LIST_ID].members == {}


def test_since_last_changed_returns_only_members_changed_after_it(server: MailchimpServer, clock: Clock) -> None:
    upsert(server, "early@example.com", status_if_new="subscribed")
    cutoff = clock.advance(30)
    clock.advance(30)
    upsert(server, "late@example.com", status_if_new="subscribed")
    upsert(server, "gone@example.com", status_if_new="unsubscribed")
    since = cutoff.isoformat()  # 2024-05-01T09:00:30+00:00: the "+" must travel percent-encoded
    changed = call(server, "GET", f"/lists/{LIST_ID}/members", query={"since_last_changed": since}).body
    assert [member["email_address"] for member in changed["members"]] == ["late@example.com", "gone@example.com"]
    assert changed["total_items"] == 2
    unsubscribed = {"since_last_changed": since, "status": "unsubscribed"}
    only = call(server, "GET", f"/lists/{LIST_ID}/members", query=unsubscribed).body
    assert [member["email_address"] for member in only["members"]] == ["gone@example.com"]


def test_count_and_offset_page_through_members(server: MailchimpServer) -> None:
    for number in range(5):
        upsert(server, f"m{number}@example.com", status_if_new="subscribed")
    page = call(server, "GET", f"/lists/{LIST_ID}/members", query={"count": "2", "offset": "2"}).body
    assert [member["email_address"] for member in page["members"]] == ["m2@example.com", "m3@example.com"]
    assert page["total_items"] == 5
    default = call(server, "GET", f"/lists/{LIST_ID}/members").body
    assert len(default["members"]) == 5


def test_resubscribing_an_unsubscribed_member_is_refused_but_pending_is_allowed(server: MailchimpServer) -> None:
    server.add_member(LIST_ID, "gone@example.com", "unsubscribed", unsubscribe_reason="Too many emails")
    read = call(server, "GET", member_path("gone@example.com")).body
    assert (read["status"], read["unsubscribe_reason"]) == ("unsubscribed", "Too many emails")
    refused = upsert(server, "gone@example.com", status="subscribed", status_if_new="subscribed")
    assert_problem(refused, 400, "Member In Compliance State")
    assert "gone@example.com is in a compliance state" in refused.body["detail"]
    stored = server.member(LIST_ID, "gone@example.com")
    assert stored is not None and stored.status == "unsubscribed"
    pending = upsert(server, "gone@example.com", status="pending")
    assert (pending.status, pending.body["status"]) == (200, "pending")
    assert "unsubscribe_reason" not in pending.body


def test_cleaned_member_cannot_be_subscribed(server: MailchimpServer) -> None:
    server.add_member(LIST_ID, "bounced@example.com", "cleaned")
    assert_problem(upsert(server, "bounced@example.com", status="subscribed"), 400, "Member In Compliance State")


def test_permanently_deleted_address_cannot_be_reimported(server: MailchimpServer) -> None:
    server.audiences[LIST_ID].forgotten.add(subscriber_hash("erased@example.com"))
    answer = upsert(server, "erased@example.com", status_if_new="subscribed")
    assert_problem(answer, 400, "Forgotten Email Not Subscribed")
    assert server.member(LIST_ID, "erased@example.com") is None


def read_archive(raw: bytes) -> dict[str, dict[str, Any]]:
    """Every result of a batch archive by operation_id, from all its JSON files."""
    results: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        for entry in archive.getmembers():
            extracted = archive.extractfile(entry)
            if extracted is not None:
                results.update({row["operation_id"]: row for row in json.load(extracted)})
    return results


def batch_operations() -> list[dict[str, Any]]:
    def put(email: str, **fields: Any) -> dict[str, Any]:
        body = json.dumps({"email_address": email, **fields})
        return {"method": "PUT", "path": member_path(email), "body": body, "operation_id": email}

    return [
        put("ann@example.com", status_if_new="subscribed", merge_fields={"FNAME": "Ann"}),
        put("bob@example.com", status_if_new="subscribed"),
        put("bad-address", status_if_new="subscribed"),
        put("gone@example.com", status="subscribed"),
        {"method": "GET", "path": member_path("bob@example.com"), "operation_id": "read-bob"},
    ]


def poll_until_finished(server: MailchimpServer, batch_id: str) -> tuple[list[str], dict[str, Any]]:
    statuses: list[str] = []
    for _ in range(10):
        batch = call(server, "GET", f"/batches/{batch_id}").body
        statuses.append(batch["status"])
        if batch["status"] == "finished":
            return statuses, batch
    raise AssertionError(f"the batch never finished: {statuses}")


def test_batch_finishes_after_polls_with_per_operation_results_in_the_archive(server: MailchimpServer) -> None:
    server.add_member(LIST_ID, "gone@example.com", "unsubscribed")
    server.batch_started_polls = 3
    server.api.results_per_file = 2  # the results span three files of the archive
    submitted = call(server, "POST", "/batches", {"operations": batch_operations()})
    assert (submitted.status, submitted.body["status"], submitted.body["total_operations"]) == (200, "pending", 5)
    assert submitted.body["response_body_url"] == ""
    statuses, batch = poll_until_finished(server, submitted.body["id"])
    assert statuses == ["started", "started", "started", "finished"]
    assert (batch["finished_operations"], batch["errored_operations"]) == (5, 2)
    with urllib.request.urlopen(batch["response_body_url"], timeout=10) as download:
        results = read_archive(download.read())
    assert {op_id: row["status_code"] for op_id, row in results.items()} == {
        "ann@example.com": 200,
        "bob@example.com": 200,
        "bad-address": 400,
        "gone@example.com": 400,
        "read-bob": 200,
    }
    rejected = json.loads(results["bad-address"]["response"])
    assert (rejected["title"], rejected["detail"]) == (
        "Invalid Resource",
        "bad-address looks fake or invalid, please enter a real email address.",
    )
    assert json.loads(results["gone@example.com"]["response"])["title"] == "Member In Compliance State"
    assert json.loads(results["read-bob"]["response"])["status"] == "subscribed"
    ann = server.member(LIST_ID, "ann@example.com")
    assert ann is not None and ann.merge_fields == {"FNAME": "Ann"}


def test_malformed_batch_is_refused_whole(server: MailchimpServer) -> None:
    answer = call(server, "POST", "/batches", {"operations": [{"method": "FETCH", "path": "/ping"}]})
    assert_problem(answer, 400, "Invalid Resource")
    assert answer.body["errors"][0]["field"] == "operations.0.method"
    assert server.api.batches == {}


def retry(send: Callable[[], Answer], attempts: int) -> list[int]:
    """A client's retry loop reduced to its outcome: the statuses it saw."""
    seen: list[int] = []
    for _ in range(attempts):
        answer = send()
        seen.append(answer.status)
        if answer.status < 429:
            break
    return seen


def test_injected_429s_then_success_and_every_request_counted(server: MailchimpServer) -> None:
    server.fail_next(2, status=429)
    first = call(server, "GET", "/ping")
    assert_problem(first, 429, "Too Many Requests")
    assert retry(lambda: call(server, "GET", "/ping"), attempts=5) == [429, 200]
    assert server.request_count == 3
    assert server.requests == ["GET /3.0/ping"] * 3


def test_injected_server_error_then_success(server: MailchimpServer) -> None:
    server.fail_next(1, status=502)
    assert_problem(call(server, "GET", "/ping"), 502, "Bad Gateway")
    server.fail_next(1, status=502)
    assert retry(lambda: upsert(server, "ann@example.com", status_if_new="subscribed"), attempts=3) == [502, 200]
    assert server.member(LIST_ID, "ann@example.com") is not None


def test_an_eleventh_simultaneous_connection_gets_429(server: MailchimpServer) -> None:
    server.response_delay = 1.5  # each request stays open long enough for all eleven to overlap
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = call(server, "GET", "/ping").status
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 10 + [429]
    server.response_delay = 0.0
    assert call(server, "GET", "/ping").status == 200
