"""The fake Acoustic Campaign XML API and OAuth endpoint (tests/acoustic_server.py) over real HTTP, with urllib."""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from .acoustic_server import DATE, NUMERIC, STYLE_2017, AcousticServer, Column

LIST_ID = "1234567"
HEADER = ["Email", "Opt In Date", "Opted Out", "Opt In Details", "Email Type", "Opted Out Date", "Opt Out Details"]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def xml(self) -> ElementTree.Element:
        return ElementTree.fromstring(self.body)


class Clock:
    """Time the fake stamps contacts, jobs and tokens with, moved by the test."""

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
def server(tmp_path: Path, clock: Clock) -> Iterator[AcousticServer]:
    with AcousticServer(tmp_path / "sftp-home") as running:
        running.clock = clock
        running.add_list(
            LIST_ID,
            "Newsletter",
            [Column("First Name"), Column("Age", NUMERIC, default_value="0"), Column("Joined", DATE)],
        )
        yield running


def send(request: urllib.request.Request) -> Answer:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


def grant(server: AcousticServer, **overrides: str) -> Answer:
    """The documented token request: form-encoded grant_type, client_id, client_secret, refresh_token."""
    form = {
        "grant_type": "refresh_token",
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "refresh_token": server.refresh_token,
        **overrides,
    }
    return send(urllib.request.Request(server.token_url, data=urllib.parse.urlencode(form).encode(), method="POST"))


def post_xml(server: AcousticServer, text: str, token: str | None = None, *, as_form: bool = False) -> Answer:
    """An XML API request: the envelope as the body (text/xml), or as the form field ``xml``."""
    if as_form:
        data, content_type = urllib.parse.urlencode({"xml": text}).encode(), "application/x-www-form-urlencoded"
    else:
        data, content_type = text.encode(), "text/xml; charset=UTF-8"
    request = urllib.request.Request(server.xml_url, data=data, method="POST")
    request.add_header("Content-Type", content_type)
    if token != "":
        request.add_header("Authorization", f"Bearer {token or server.access_token()}")
    return send(request)


def envelope(operation: str, **elements: str | list[str]) -> str:
    """``<Envelope><Body><Operation>`` with one child per element; a list becomes ``<X><COLUMN>..</X>``."""
    root = ElementTree.Element("Envelope")
    node = ElementTree.SubElement(ElementTree.SubElement(root, "Body"), operation)
    for tag, value in elements.items():
        child = ElementTree.SubElement(node, tag)
        if isinstance(value, list):
            for item in value:
                ElementTree.SubElement(child, "COLUMN").text = item
        else:
            child.text = value
    return ElementTree.tostring(root, encoding="unicode")


def call(server: AcousticServer, operation: str, **elements: str | list[str]) -> ElementTree.Element:
    """One operation that must succeed; its RESULT."""
    answer = post_xml(server, envelope(operation, **elements))
    assert answer.status == 200
    result = answer.xml().find("Body/RESULT")
    assert result is not None and result.findtext("SUCCESS") == "TRUE", answer.body
    return result


def fault(answer: Answer) -> tuple[str, int, str]:
    """A fault's FaultString, errorid and class, after checking the documented layout around them."""
    assert answer.status == 200
    body = answer.xml().find("Body")
    assert body is not None and body.findtext("RESULT/SUCCESS") == "false"
    error = body.find("Fault/detail/error")
    assert error is not None and body.find("Fault/Request") is not None
    return body.findtext("Fault/FaultString") or "", int(error.findtext("errorid") or 0), error.findtext("class") or ""


def parameters(result: ElementTree.Element) -> dict[str, str]:
    return {p.findtext("NAME") or "": p.findtext("VALUE") or "" for p in result.iterfind("PARAMETERS/PARAMETER")}


def poll(server: AcousticServer, job_id: str) -> tuple[list[str], ElementTree.Element]:
    statuses: list[str] = []
    for _ in range(10):
        result = call(server, "GetJobStatus", JOB_ID=job_id)
        assert result.findtext("JOB_ID") == job_id
        statuses.append(result.findtext("JOB_STATUS") or "")
        if statuses[-1] in ("COMPLETE", "ERROR"):
            return statuses, result
    raise AssertionError(f"the job never finished: {statuses}")


def write_map(server: AcousticServer, name: str, action: str, mapping: list[str], required: str = "") -> None:
    """A LIST_IMPORT map as the documentation lays it out: CSV with a header row, synced on EMAIL."""
    columns = "".join(
        f"<COLUMN><INDEX>{index}</INDEX><NAME>{column}</NAME><INCLUDE>true</INCLUDE></COLUMN>"
        for index, column in enumerate(mapping, start=1)
    )
    required_column = (
        f"<COLUMNS><COLUMN><NAME>{required}</NAME><TYPE>0</TYPE><IS_REQUIRED>true</IS_REQUIRED>"
        "<KEY_COLUMN>false</KEY_COLUMN></COLUMN></COLUMNS>"
        if required
        else ""
    )
    (server.upload / name).write_text(
        f'<?xml version="1.0" encoding="UTF-8"?><LIST_IMPORT><LIST_INFO><ACTION>{action}</ACTION>'
        f"<LIST_ID>{LIST_ID}</LIST_ID><FILE_TYPE>0</FILE_TYPE><HASHEADERS>true</HASHEADERS></LIST_INFO>"
        f"<SYNC_FIELDS><SYNC_FIELD><NAME>EMAIL</NAME></SYNC_FIELD></SYNC_FIELDS>{required_column}"
        f"<MAPPING>{columns}</MAPPING></LIST_IMPORT>",
        encoding="utf-8",
    )


def start_import(server: AcousticServer, rows: list[str], action: str = "ADD_AND_UPDATE", **map_options: Any) -> str:
    (server.upload / "contacts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_map(server, "contacts.xml", action, rows[0].split(","), **map_options)
    return call(server, "ImportList", MAP_FILE="contacts.xml", SOURCE_FILE="contacts.csv").findtext("JOB_ID") or ""


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))


# ------------------------------------------------------------------------------------------------------ OAuth


def test_token_grant_answers_a_bearer_token_reused_for_three_hours(server: AcousticServer, clock: Clock) -> None:
    first = grant(server)
    assert first.status == 200 and first.headers["Content-Type"].startswith("application/json")
    body = first.json()
    assert set(body) == {"access_token", "token_type", "refresh_token", "expires_in"}
    assert (body["token_type"], body["expires_in"], body["refresh_token"]) == ("bearer", 14400, server.refresh_token)
    clock.advance(3600)
    again = grant(server).json()
    assert (again["access_token"], again["expires_in"]) == (body["access_token"], 10800)
    clock.advance(2 * 3600)  # three hours after the first: a new token, and the old one has an hour left
    renewed = grant(server).json()
    assert renewed["access_token"] != body["access_token"] and renewed["expires_in"] == 14400
    assert post_xml(server, envelope("GetListMetaData", LIST_ID=LIST_ID), body["access_token"]).status == 200
    clock.advance(3600)
    assert post_xml(server, envelope("GetListMetaData", LIST_ID=LIST_ID), body["access_token"]).status == 401
    assert post_xml(server, envelope("GetListMetaData", LIST_ID=LIST_ID), renewed["access_token"]).status == 200


@pytest.mark.parametrize(
    ("overrides", "status", "error"),
    [
        ({"client_secret": "0" * 36}, 401, "invalid_client"),
        ({"client_id": "someone-else"}, 401, "invalid_client"),
        ({"refresh_token": "r-revoked"}, 400, "invalid_grant"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
    ],
)
def test_token_request_with_wrong_credentials_is_refused(
    server: AcousticServer, overrides: dict[str, str], status: int, error: str
) -> None:
    answer = grant(server, **overrides)
    assert (answer.status, answer.json()["error"]) == (status, error)
    assert "access_token" not in answer.json()
    assert server.tokens.issued == {}


def test_xml_api_needs_a_valid_unexpired_bearer_token(server: AcousticServer, clock: Clock) -> None:
    request = envelope("GetListMetaData", LIST_ID=LIST_ID)
    missing = post_xml(server, request, token="")
    assert missing.status == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    unknown = post_xml(server, request, token="not-a-token")
    assert (unknown.status, unknown.json()["error"]) == (401, "invalid_token")
    server.token_lifetime = 60
    token = grant(server).json()
    assert token["expires_in"] == 60
    assert post_xml(server, request, token["access_token"]).status == 200
    clock.advance(60)
    assert post_xml(server, request, token["access_token"]).status == 401
    fresh = grant(server).json()["access_token"]
    assert fresh != token["access_token"] and post_xml(server, request, fresh).status == 200
    assert server.api.operations == ["GetListMetaData", "GetListMetaData"]  # refused requests reach no operation


# ------------------------------------------------------------------------------------------------- ImportList


IMPORT_ROWS = [
    "EMAIL,First Name,Age",
    "ann@example.com,Annie,41",
    "bob@example.com,Bob,30",
    "not-an-address,Nope,1",
    ",Nobody,2",
    "carl@example.com,Carl,old",
    "bob@example.com,Bobby,31",
]


def test_add_and_update_import_runs_as_a_job_and_reports_bad_rows(server: AcousticServer, clock: Clock) -> None:
    server.add_contact(LIST_ID, "ann@example.com", **{"First Name": "Ann", "Age": "40"})
    server.job_polls = 2
    clock.advance(60)
    job_id = start_import(server, IMPORT_ROWS)
    first = call(server, "GetJobStatus", JOB_ID=job_id)
    assert first.findtext("JOB_STATUS") == "WAITING"
    assert parameters(first)["LIST_NAME"] == "Newsletter" and parameters(first)["SQL_ADDED"] == "0"
    ann = server.contact(LIST_ID, "ann@example.com")
    assert ann is not None and ann.fields["First Name"] == "Ann"  # nothing applied before the job runs
    statuses, done = poll(server, job_id)
    assert statuses == ["RUNNING", "COMPLETE"]
    counts = parameters(done)
    assert {name: counts[name] for name in ("TOTAL_ROWS", "TOTAL_VALID", "SQL_ADDED", "SQL_UPDATED")} == {
        "TOTAL_ROWS": "6",
        "TOTAL_VALID": "2",
        "SQL_ADDED": "1",
        "SQL_UPDATED": "1",
    }
    assert (counts["BAD_ADDRESSES"], counts["BAD_RECORDS"], counts["DUPLICATES"]) == ("1", "2", "1")
    assert (counts["LIST_ID"], counts["LIST_NAME"]) == (LIST_ID, "Newsletter")
    assert ann.fields == {"First Name": "Annie", "Age": "41"} and ann.last_modified == clock.now
    bob = server.contact(LIST_ID, "bob@example.com")
    assert bob is not None and bob.fields == {"First Name": "Bob", "Age": "30"}  # the first of two rows wins
    assert bob.opt_in_details == "User Name: api-user@example.com. IP Address: 127.0.0.1"
    assert server.contact(LIST_ID, "carl@example.com") is None
    assert re.fullmatch(r"\d+\.err", counts["ERROR_FILE_NAME"]) and counts["ERROR_FILE_NAME"] != f"{job_id}.err"
    rejected = read_csv(server.download / counts["ERROR_FILE_NAME"])
    assert rejected[0] == ["LINE_NUMBER", "ERROR", "EMAIL", "First Name", "Age"]
    assert [(row[0], row[1], row[2]) for row in rejected[1:]] == [
        ("4", "The email address is invalid.", "not-an-address"),
        ("5", "Unable to complete the request. Required unique key column values were not provided.", ""),
        ("6", "Invalid numeric value for column Age.", "carl@example.com"),
    ]
    assert "TOTAL_ROWS=6" in (server.download / counts["RESULTS_FILE_NAME"]).read_text().splitlines()


def test_required_column_and_update_only_rules(server: AcousticServer) -> None:
    server.add_contact(LIST_ID, "ann@example.com", **{"First Name": "Ann"})
    server.job_polls = 0
    rows = ["EMAIL,First Name", "ann@example.com,", "ann@example.com,Annie", "new@example.com,New"]
    statuses, done = poll(server, start_import(server, rows, "UPDATE_ONLY", required="First Name"))
    counts = parameters(done)
    assert statuses == ["COMPLETE"]
    assert (counts["BAD_RECORDS"], counts["TOTAL_VALID"], counts["SQL_UPDATED"], counts["SQL_ADDED"]) == (
        "1",
        "2",
        "1",
        "0",
    )
    ann = server.contact(LIST_ID, "ann@example.com")
    assert ann is not None and ann.fields["First Name"] == "Annie"
    assert server.contact(LIST_ID, "new@example.com") is None  # UPDATE_ONLY ignores addresses not in the list


def test_opt_out_import_opts_out_addresses_already_in_the_list(server: AcousticServer, clock: Clock) -> None:
    server.add_contact(LIST_ID, "ann@example.com")
    server.job_polls = 0
    moment = clock.advance(3600)
    statuses, done = poll(server, start_import(server, ["EMAIL", "ann@example.com", "stranger@example.com"], "OPT_OUT"))
    assert statuses == ["COMPLETE"]
    assert (parameters(done)["SQL_UPDATED"], parameters(done)["SQL_ADDED"]) == ("1", "0")
    ann = server.contact(LIST_ID, "ann@example.com")
    assert ann is not None and (ann.opted_out, ann.opted_out_date, ann.last_modified) == (True, moment, moment)
    assert server.contact(LIST_ID, "stranger@example.com") is None


WIKIMEDIA_STYLE_MAP = f"""<LIST_IMPORT>
  <LIST_INFO>
    <ACTION>ADD_AND_UPDATE</ACTION><LIST_ID>{LIST_ID}</LIST_ID><FILE_TYPE>2</FILE_TYPE>
    <HASHEADERS>false</HASHEADERS><LIST_DATE_FORMAT>dd.MM.yyyy</LIST_DATE_FORMAT>
  </LIST_INFO>
  <COLUMNS>
    <COLUMN><NAME>EMAIL</NAME><TYPE>9</TYPE><IS_REQUIRED>true</IS_REQUIRED><KEY_COLUMN>true</KEY_COLUMN></COLUMN>
  </COLUMNS>
  <MAPPING>
    <COLUMN><INDEX>1</INDEX><NAME>Email</NAME><INCLUDE>true</INCLUDE></COLUMN>
    <COLUMN><INDEX>3</INDEX><NAME>Joined</NAME><INCLUDE>true</INCLUDE></COLUMN>
    <COLUMN><INDEX>2</INDEX><NAME>First Name</NAME><INCLUDE>false</INCLUDE></COLUMN>
  </MAPPING>
</LIST_IMPORT>"""


def test_import_reads_a_headerless_pipe_file_with_dates_and_no_sync_fields(server: AcousticServer) -> None:
    """The layout of Wikimedia's map (EMAIL as a required system column, no SYNC_FIELDS, LIST_DATE_FORMAT)."""
    server.job_polls = 0
    (server.upload / "map.xml").write_text(WIKIMEDIA_STYLE_MAP, encoding="utf-8")
    (server.upload / "rows.psv").write_text("ann@example.com|Ann|05.03.2024\nbob@example.com|Bob|2024-03-05\n")
    job_id = call(server, "ImportList", MAP_FILE="map.xml", SOURCE_FILE="rows.psv").findtext("JOB_ID") or ""
    counts = parameters(poll(server, job_id)[1])
    assert (counts["TOTAL_ROWS"], counts["SQL_ADDED"], counts["BAD_RECORDS"]) == ("2", "1", "1")
    ann = server.contact(LIST_ID, "ann@example.com")
    assert ann is not None and ann.fields == {"Joined": date(2024, 3, 5)}  # INCLUDE false: First Name not taken
    rejected = read_csv(server.download / counts["ERROR_FILE_NAME"])
    assert rejected[0] == ["LINE_NUMBER", "ERROR", "COLUMN_1", "COLUMN_2", "COLUMN_3"]
    assert rejected[1][:3] == ["2", "Invalid date for column Joined; expected dd.MM.yyyy.", "bob@example.com"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda upload: (upload / "contacts.xml").write_text("<LIST_IMPORT><LIST_INFO>", encoding="utf-8"),
        lambda upload: (upload / "contacts.csv").unlink(),
        lambda upload: (upload / "contacts.xml").write_text(
            (upload / "contacts.xml").read_text().replace("First Name", "Nickname")
        ),
    ],
    ids=["unreadable map", "missing source file", "unknown column"],
)
def test_import_the_job_cannot_read_ends_in_error(server: AcousticServer, damage: Callable[[Path], Any]) -> None:
    server.add_contact(LIST_ID, "ann@example.com", **{"First Name": "Ann"})
    server.job_polls = 1
    (server.upload / "contacts.csv").write_text("EMAIL,First Name\nann@example.com,Annie\n", encoding="utf-8")
    write_map(server, "contacts.xml", "ADD_AND_UPDATE", ["EMAIL", "First Name"])
    damage(server.upload)
    job_id = call(server, "ImportList", MAP_FILE="contacts.xml", SOURCE_FILE="contacts.csv").findtext("JOB_ID") or ""
    assert poll(server, job_id)[0] == ["WAITING", "ERROR"]
    ann = server.contact(LIST_ID, "ann@example.com")
    assert ann is not None and ann.fields["First Name"] == "Ann"


# ------------------------------------------------------------------------------------------------- ExportList


def test_opt_out_export_since_a_date_writes_the_documented_csv(server: AcousticServer, clock: Clock) -> None:
    server.add_contact(LIST_ID, "ann@example.com", **{"First Name": "Ann"})
    server.opt_out(LIST_ID, "early@example.com", at=clock.now)
    cutoff = clock.advance(3600)
    server.opt_out(LIST_ID, "late@example.com", at=cutoff + timedelta(minutes=30))
    clock.advance(7200)
    result = call(
        server,
        "ExportList",
        LIST_ID=LIST_ID,
        EXPORT_TYPE="OPT_OUT",
        EXPORT_FORMAT="CSV",
        DATE_START=f"{cutoff:%m/%d/%Y %H:%M:%S}",
        ADD_TO_STORED_FILES="",
    )
    assert result.findtext("FILE_PATH") == "/download/Newsletter - Opt Out - May 1 2024 12-00-00 PM.csv"
    exported = server.download / "Newsletter - Opt Out - May 1 2024 12-00-00 PM.csv"
    statuses, done = poll(server, result.findtext("JOB_ID") or "")
    assert statuses == ["WAITING", "COMPLETE"]
    assert parameters(done)["NUM_PROCESSED"] == "1" and parameters(done)["KEEP_IN_STORED_FILES"] == "true"
    rows = read_csv(exported)
    assert rows[0] == [*HEADER, "First Name", "Age", "Joined"]
    opt_in = ["late@example.com", "05/01/2024 10:00 AM", "T", "Added by WebForms", "0"]  # added when it opted out
    assert rows[1:] == [[*opt_in, "05/01/2024 10:30 AM", "Opt out via email opt out.", "", "", ""]]
    assert exported.read_text().startswith('"Email","Opt In Date"')  # every field quoted, as Acoustic writes now


def test_export_file_appears_only_when_the_job_completes(server: AcousticServer) -> None:
    server.add_contact(LIST_ID, "ann@example.com")
    result = call(server, "ExportList", LIST_ID=LIST_ID, EXPORT_TYPE="ALL", EXPORT_FORMAT="CSV")
    exported = server.download / (result.findtext("FILE_PATH") or "").removeprefix("/download/")
    assert exported.name.startswith("Newsletter - All - May 1 2024 09-00-00 AM") and not exported.exists()
    call(server, "GetJobStatus", JOB_ID=result.findtext("JOB_ID") or "")
    assert not exported.exists()
    poll(server, result.findtext("JOB_ID") or "")
    assert [row[0] for row in read_csv(exported)] == ["Email", "ann@example.com"]


def test_export_columns_in_the_2017_style(server: AcousticServer) -> None:
    server.api.export_style = STYLE_2017
    server.add_contact(LIST_ID, "ann@example.com", Joined=date(2024, 3, 5))
    columns = ["Email", "Opt in Date", "RECIPIENT_ID", "Last Modified Date", "Joined"]
    result = call(
        server, "ExportList", LIST_ID=LIST_ID, EXPORT_TYPE="OPT_IN", EXPORT_FORMAT="CSV", EXPORT_COLUMNS=columns
    )
    server.run_jobs()
    text = (server.download / (result.findtext("FILE_PATH") or "").removeprefix("/download/")).read_text()
    assert text.splitlines() == [
        "Email,Opt In Date,RECIPIENT_ID,Last Modified Date,Joined",
        "ann@example.com,05/01/24 09:00 AM,1,05/01/24 09:00 AM,03/05/24",
    ]
    refused = post_xml(
        server,
        envelope("ExportList", LIST_ID=LIST_ID, EXPORT_TYPE="ALL", EXPORT_FORMAT="CSV", EXPORT_COLUMNS=["Nickname"]),
    )
    assert fault(refused)[1] == 153
    assert len(server.jobs) == 1


# ---------------------------------------------------------------------------------------- metadata and faults


def test_list_metadata_names_columns_types_and_key_columns(server: AcousticServer) -> None:
    server.add_contact(LIST_ID, "ann@example.com")
    server.opt_out(LIST_ID, "gone@example.com")
    result = call(server, "GetListMetaData", LIST_ID=LIST_ID)
    assert (result.findtext("ID"), result.findtext("NAME")) == (LIST_ID, "Newsletter")
    assert (result.findtext("SIZE"), result.findtext("NUM_OPT_OUTS"), result.findtext("NUM_UNDELIVERABLE")) == (
        "2",
        "1",
        "0",
    )
    assert re.fullmatch(r"\d\d/\d\d/\d\d \d\d:\d\d [AP]M", result.findtext("LAST_MODIFIED") or "")
    columns = [
        (c.findtext("NAME"), c.findtext("TYPE"), c.findtext("DEFAULT_VALUE")) for c in result.iterfind("COLUMNS/COLUMN")
    ]
    assert columns == [
        ("LIST_ID", None, None),
        ("MAILING_ID", None, None),
        ("RECIPIENT_ID", None, None),
        ("EMAIL", None, None),
        ("First Name", "0", None),
        ("Age", "2", "0"),
        ("Joined", "3", None),
    ]
    assert [c.findtext("NAME") for c in result.iterfind("KEY_COLUMNS/COLUMN")] == ["Email"]


@pytest.mark.parametrize(
    ("request_xml", "errorid", "fault_string"),
    [
        (envelope("GetListMetaData", LIST_ID="999"), 106, "List ID is not valid."),
        (envelope("ExportList", LIST_ID="999", EXPORT_TYPE="ALL", EXPORT_FORMAT="CSV"), 106, "List ID is not valid."),
        (
            envelope("GetListMetaData", LIST_ID="abc"),
            310,
            'Invalid value for element LIST_ID. Not an integer. Value:"abc"',
        ),
        (envelope("GetListMetaData"), 100, 'Parameter "LIST_ID" was not provided in the API call'),
        (envelope("GetJobStatus", JOB_ID="42"), 135, "The job ID is not valid."),
        (
            envelope("ExportList", LIST_ID=LIST_ID, EXPORT_TYPE="ALL", EXPORT_FORMAT="XLS"),
            321,
            "The export format is not valid.",
        ),
        (envelope("getlistmetadata", LIST_ID=LIST_ID), 51, "Invalid XML Request"),
        ("<Envelope><body><GetListMetaData/></body></Envelope>", 51, "Invalid XML Request"),
        ("<Envelope><Body><GetListMetaData>", 51, "Invalid XML Request"),
    ],
)
def test_faults_carry_the_documented_string_and_error_id(
    server: AcousticServer, request_xml: str, errorid: int, fault_string: str
) -> None:
    assert fault(post_xml(server, request_xml)) == (fault_string, errorid, "SP.API")


def test_the_envelope_may_come_as_the_form_field_xml(server: AcousticServer) -> None:
    request = envelope("GetListMetaData", LIST_ID=LIST_ID)
    as_body, as_form = post_xml(server, request), post_xml(server, request, as_form=True)
    assert as_body.headers["Content-Type"].startswith("text/xml")
    assert as_form.body == as_body.body and as_form.xml().findtext("Body/RESULT/NAME") == "Newsletter"


# ---------------------------------------------------------------------------------------- failures and limits


def retry(send_once: Callable[[], Answer], attempts: int) -> list[int]:
    """A client's retry loop reduced to its outcome: the statuses it saw."""
    seen: list[int] = []
    for _ in range(attempts):
        seen.append(send_once().status)
        if seen[-1] < 429:
            break
    return seen


def test_injected_429s_then_success_and_every_request_counted(server: AcousticServer) -> None:
    token = server.access_token()
    request = envelope("GetListMetaData", LIST_ID=LIST_ID)
    server.fail_next(2, status=429)
    first = post_xml(server, request, token)
    assert (first.status, first.body) == (429, b"429 Too Many Requests")
    assert retry(lambda: post_xml(server, request, token), attempts=5) == [429, 200]
    assert server.request_count == 3
    assert server.requests == ["POST /XMLAPI"] * 3
    assert server.api.operations == ["GetListMetaData"]


def test_injected_server_errors_then_success_on_either_endpoint(server: AcousticServer) -> None:
    server.fail_next(1, status=500)
    request = envelope("GetListMetaData", LIST_ID=LIST_ID)
    assert retry(lambda: post_xml(server, request), attempts=3) == [500, 200]
    server.fail_next(1, status=503, endpoint="token")
    assert retry(lambda: grant(server), attempts=3) == [503, 200]
    assert server.requests == ["POST /XMLAPI", "POST /XMLAPI", "POST /oauth/token", "POST /oauth/token"]


def test_an_eleventh_concurrent_request_gets_429(server: AcousticServer) -> None:
    token = server.access_token()
    server.response_delay = 1.0  # each request stays open long enough for all eleven to overlap
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = post_xml(server, envelope("GetListMetaData", LIST_ID=LIST_ID), token).status
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(11)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 10 + [429]
    server.response_delay = 0.0
    assert post_xml(server, envelope("GetListMetaData", LIST_ID=LIST_ID), token).status == 200
