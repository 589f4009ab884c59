"""A fake Acoustic Campaign (formerly Silverpop Engage) XML API and OAuth token endpoint on loopback.

It is the peer an ``acoustic`` transport is tested against: real HTTP on ``127.0.0.1``; OAuth access tokens
from a refresh token; the XML API's envelopes and faults; ImportList reading a map file and a CSV from the
SFTP account's ``upload`` folder and writing its results and errors to ``download``; ExportList writing its CSV
to ``download``; GetJobStatus; GetListMetaData; the concurrent-request limit. State lives in memory (lists,
contacts, jobs, tokens), and tests read and set it directly. The SFTP account's home is a folder given to the
constructor, so a real sshd can serve the same files.

Usage::

    server = AcousticServer(root).start()        # root/upload and root/download are created
    server.add_list(1234567, "Newsletter", [Column("First Name"), Column("Age", NUMERIC)])
    server.opt_out(1234567, "gone@example.com", at=moment)      # someone opted out at Acoustic
    # a client: POST server.token_url (client_id, client_secret, refresh_token from the server's attributes),
    # then POST server.xml_url with "Authorization: Bearer <token>"; files go through root/upload, root/download
    server.job_polls = 2          # a job answers WAITING, then RUNNING, then COMPLETE on the third poll
    server.fail_next(1, 503)      # the next XML API request is answered 503, then service resumes
    server.stop()

Endpoints: ``POST /oauth/token`` and ``POST /XMLAPI`` (operations ImportList, GetJobStatus, ExportList,
GetListMetaData; any other operation, the legacy Login among them, is answered as an invalid request).

Sources, cited below by tag. Pages of developer.goacoustic.com were read in stored copies; where a page was not
stored, its text was read where client libraries copied it, and the tag says so.

[OVERVIEW] https://developer.goacoustic.com/acoustic-campaign/reference/xml-api-overview (and the same text at
           https://developer.ibm.com/customer-engagement/docs/.../xml-api/api-xml-basics/): the ``/XMLAPI``
           endpoint per pod; "API Limits": "no more than 10 concurrent requests per Org ... can be subject to
           blocking"; no status code or fault is documented for it.
[FAQ]      https://developer.goacoustic.com/acoustic-campaign/reference/faqs: tags are case sensitive; a wrong tag
           gets ``<RESULT><SUCCESS>false</SUCCESS></RESULT><Fault><Request/><FaultCode/><FaultString>Invalid XML
           Request</FaultString><detail><error><errorid>51</errorid><module/><class>SP.API</class><method/>
           </error></detail></Fault>``.
[ERRORS]   https://developer.goacoustic.com/acoustic-campaign/reference/error-codes, the XML API's numbered
           faults (read in its transcription github.com/api-evangelist/silverpop errors/silverpop-problem-types.yml):
           50 Server Error, 51 Invalid XML request, 100 'Parameter "x" was not provided in the API call', 106
           List ID is not valid, 135 The job ID is not valid, 141 Encoding is not valid, 153
           ERR_EXPORT_NOT_LIST_COLUMN, 184 Numerous errors related to dates, 310 'Invalid value for element
           LIST_ID. Not an integer. Value:"x"', 314 'Column "x" is not found in the list.', 321 The export format
           is not valid, 329 SYNC_FiELD element found without a NAME, 133 The file type is not valid, 211 Required
           unique key column values were not provided, 1016 Missing required column value, 1017 The email address
           is invalid.
[OAUTH]    https://developer.goacoustic.com/acoustic-campaign/reference/getting-started-with-oauth and
           .../oauth-token-creation-in-php: ``POST /oauth/token`` form-encoded grant_type=refresh_token,
           client_id, client_secret, refresh_token; "Campaign OAuth tokens have a lifetime of 4 hours ... If you
           request before the start of the fourth hour, you receive the same access token ... A new token will only
           be issued 3 hours after the preceding token"; "expires_in ... the number of seconds this token is good
           for". https://help.goacoustic.com/hc/en-us/articles/360043157333: "good for up to 4 hours as indicated in
           the expires_in property".
[TOKENJSON] A recorded token response kept by Wikimedia: github.com/eileenmcnaughton/org.wikimedia.omnimail
           tests/phpunit/Responses/AuthenticateRestResponse.txt: ``{"access_token", "token_type":"bearer",
           "refresh_token", "expires_in":14223}`` (a reused token: less than 14400 seconds left).
[NODE]     Silverpop's own Node client, github.com/Silverpop/node-engage: lib/engage-auth.js (``Authorization:
           Bearer``; a refused token request is read as JSON ``error``/``error_description``, naming
           ``invalid_client`` and ``invalid_token``), lib/engage-xml-api.js (the envelope posted form-encoded as the
           field ``xml``; ``SUCCESS`` TRUE), lib/xml-api/export-list.js (``JOB_ID``, ``FILE_PATH``), docs/methods.md
           (ExportList DATE_START/DATE_END: "Recipient last modified date range").
[WMF]      The client Wikimedia runs, github.com/mrmarkfrench/silverpop-php-connector: TokenProvider.php (the
           token request), SilverpopBaseConnector.php (commit 6f0eab1, 2025: "retry once on 401 after refreshing
           token" on XML API calls, the only evidence of the status an expired bearer gets), the XML posted as form
           field ``xml``, Xml/ExportList.php (ExportList's reference text copied into doc comments: EXPORT_TYPE
           ALL/OPT_IN/OPT_OUT/UNDELIVERABLE, EXPORT_FORMAT CSV/TAB/PIPE, ADD_TO_STORED_FILES, LIST_DATE_FORMAT
           tokens, DATE_START/DATE_END "mm/dd/yyyy hh:mm:ss"), SilverpopXmlConnector.php (``downloadFile`` reads
           ``download/<name>``).
[KA]       github.com/ka4ok85/watson-campaign-automation-spring: the XML posted as a raw ``text/xml`` body;
           DATE_START/DATE_END written "MM/dd/yyyy HH:mm:ss"; the PARAMETERS it reads from a completed import
           (BAD_ADDRESSES, BAD_RECORDS, DUPLICATES, ERROR_FILE_NAME, LIST_ID, LIST_NAME, NOT_ALLOWED,
           RESULTS_FILE_NAME, SQL_ADDED, SQL_UPDATED, TOTAL_ROWS, TOTAL_VALID, ...) and export (LIST_NAME,
           KEEP_IN_STORED_FILES, KEEP_IN_FTP_DOWNLOAD_DIRECTORY, FILE_ENCODING); JOB_STATUS values; the map
           file's layout (src/test/.../utils/ImportMapperTest.java).
[IMPORT]   https://developer.goacoustic.com/acoustic-campaign/reference/importlist: MAP_FILE and SOURCE_FILE are
           names in the FTP ``upload`` directory ("You must place all files in the upload directory ... or the
           database import service will not find them"); optional EMAIL, FILE_ENCODING (UTF-8 or ISO-8859-1);
           the result is JOB_ID (sample 108518).
[MAPDOC]   The map file's element meanings, from the Silverpop XML API guide as quoted in a public Ruby client
           (Silverpop::Engage, xml_map_file_list_info and xml_map_file_column): ACTION CREATE / ADD_ONLY ("Ignore
           existing recipients") / UPDATE_ONLY ("Ignore recipients who exist in the source file but not in the
           list") / ADD_AND_UPDATE / OPT_OUT ("opt out any recipient in the source file who is already in the
           list. Ignore recipients who exist in the source file but not the list"); FILE_TYPE 0 CSV, 1 tab, 2 pipe;
           HASHEADERS ("must be set to true so it can skip the first line"); COLUMN TYPE 0 text, 1 yes/no, 2
           numeric, 3 date, 4 time, 5 country, 6 select one, 8 segmenting, 9 system (EMAIL); KEY_COLUMN. The
           layout (LIST_INFO, SYNC_FIELDS/SYNC_FIELD/NAME, MAPPING/COLUMN INDEX from 1, NAME, INCLUDE) is also in
           Wikimedia's map files (github.com/eileenmcnaughton/org.wikimedia.omnimail,
           Civi/Api4/Action/Omnicontact/Upload.php and tests/phpunit/Requests/ImportFiles/example.xml).
[JOBSTATUS] https://developer.goacoustic.com/acoustic-campaign/reference/getjobstatus (also the IBM tutorial
           get-status-data-job): JOB_STATUS WAITING, RUNNING, CANCELLED, ERROR, COMPLETE; the sample of a completed
           import (NOT_ALLOWED, LIST_ID, RESULTS_FILE_NAME 1241474.res, SQL_ADDED, ERROR_FILE_NAME 1241474.err,
           LIST_NAME, BAD_ADDRESSES, SQL_UPDATED, BAD_RECORDS, TOTAL_VALID), "If a data job completes with errors,
           you can view detailed results in the results file (.res) and error file (.err) found in the Download
           folder". A Java client's javadoc (GetJobStatusResult, Apache-2.0, thanh@mohc.net, found by the code
           index) lists what an import reports while WAITING/RUNNING (the same counters but SQL_UPDATED) and what
           a completed export reports (NUM_PROCESSED, LIST_ID, LIST_NAME). Wikimedia's recorded
           JobStatusWaitingResponse.txt shows an empty ``<PARAMETERS>`` for a waiting export.
[SAMPLE17] A real ExportList result kept by Wikimedia (org.wikimedia.omnimail tests/phpunit/Responses/):
           ExportListResponse.txt (FILE_PATH ``/download/20170509_noCID - All - Jul 5 2017 06-27-45 AM.csv``) and
           that CSV: header ``Email,Opt In Date,Opted Out,Opt In Details,Email Type,Opted Out Date,Opt Out
           Details,<custom columns>``, unquoted, timestamps ``10/18/16 08:01 PM``, dates ``12/04/16``, Opted Out
           ``T``/``F``, Email Type ``0``, Opt Out Details "Opt out via email opt out.".
[SAMPLE24] The same repository's msl-import-list.csv (an export of 2024 asked for EXPORT_COLUMNS): every field
           quoted, ``"02/20/2024 09:01 AM"``, and the columns RECIPIENT_ID and "Last Modified Date", Opt In Details
           "User Name: <the API user>. IP Address: <address>"; CRM/Omnimail/Omnigroupmembers.php asks for "Opt in
           Date" and gets the header "Opt In Date".
[METADATA] https://developer.goacoustic.com/acoustic-campaign/reference/get-database-details: the GetListMetaData
           sample (ID, NAME, TYPE, SIZE, NUM_OPT_OUTS, NUM_UNDELIVERABLE, LAST_MODIFIED "02/02/06 04:51 PM", ...,
           COLUMNS/COLUMN NAME [DEFAULT_VALUE] [TYPE], KEY_COLUMNS/COLUMN/NAME Email).
[RFC6749]  https://www.rfc-editor.org/rfc/rfc6749#section-5.2 and [RFC6750] https://www.rfc-editor.org/rfc/rfc6750
           #section-3: the token errors' statuses and ``invalid_token``, used where Acoustic documents none.

Where no source says what Acoustic does, a comment says "undocumented" and names the choice made.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import re
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from http import HTTPStatus
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .loopback_http import LoopbackHttp

Element = ElementTree.Element
Params = dict[str, str]

TOKEN_LIFETIME = 14400  # [OAUTH] 4 hours
TOKEN_REUSE_WINDOW = 10800  # [OAUTH] the same token is handed out until 3 hours after it was issued
MAX_CONCURRENT_REQUESTS = 10  # [OVERVIEW] per organisation
FIRST_JOB_ID = 108518  # [IMPORT] the sample JOB_ID; undocumented how ids are numbered: they count up from it
FIRST_RESULT_FILE = 1241474  # [JOBSTATUS] 1241474.res beside JOB_ID 789052: a number of its own, counted up here

# [MAPDOC] column TYPE codes (7 is not listed there).
TEXT, YES_NO, NUMERIC, DATE, TIME, COUNTRY, SELECT_ONE, SEGMENTING, SYSTEM = 0, 1, 2, 3, 4, 5, 6, 8, 9
COLUMN_TYPES = (TEXT, YES_NO, NUMERIC, DATE, TIME, COUNTRY, SELECT_ONE, SEGMENTING, SYSTEM)
IMPORT_ACTIONS = ("ADD_ONLY", "UPDATE_ONLY", "ADD_AND_UPDATE", "OPT_OUT")  # [MAPDOC]; CREATE is not modelled
FILE_TYPES = {"0": ",", "1": "\t", "2": "|"}  # [MAPDOC] FILE_TYPE
ENCODINGS = {"UTF-8": "utf-8-sig", "ISO-8859-1": "iso-8859-1"}  # [IMPORT]; a UTF-8 BOM is skipped (undocumented)
# [WMF] EXPORT_TYPE values. The word each puts in the file name: "All" is [SAMPLE17]'s, the others undocumented.
EXPORT_TYPES = {"ALL": "All", "OPT_IN": "Opt In", "OPT_OUT": "Opt Out", "UNDELIVERABLE": "Undeliverable"}
# [WMF] EXPORT_FORMAT values; ".csv" is [SAMPLE17]'s, the TAB and PIPE extensions are undocumented.
EXPORT_FORMATS = {"CSV": (",", ".csv"), "TAB": ("\t", ".tsv"), "PIPE": ("|", ".psv")}
# [SAMPLE17] the system columns an export without EXPORT_COLUMNS starts with, in this order.
DEFAULT_SYSTEM_COLUMNS = (
    "Email",
    "Opt In Date",
    "Opted Out",
    "Opt In Details",
    "Email Type",
    "Opted Out Date",
    "Opt Out Details",
)
# [SAMPLE24] written only when EXPORT_COLUMNS names them ([WMF]: "all system fields (except RECIPIENT_ID)").
REQUESTABLE_SYSTEM_COLUMNS = (*DEFAULT_SYSTEM_COLUMNS, "RECIPIENT_ID", "Last Modified Date")
METADATA_SYSTEM_COLUMNS = ("LIST_ID", "MAILING_ID", "RECIPIENT_ID", "EMAIL")  # [METADATA], without TYPE
STYLE_2024, STYLE_2017 = "2024", "2017"  # the two real export files: [SAMPLE24] and [SAMPLE17]
# Undocumented how strict Acoustic's address check is. This accepts one "@" and a dot in the domain.
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")
INVALID_XML = "Invalid XML Request"  # [FAQ]
KEY_VALUES_MISSING = "Unable to complete the request. Required unique key column values were not provided."


class Fault(Exception):
    """An XML API fault ([FAQ] layout, [ERRORS] numbers), answered with HTTP 200 like every XML API result:
    [WMF] and [NODE] read SUCCESS from the body of a 200 (undocumented: the status of a fault)."""

    def __init__(self, errorid: int, text: str, error_class: str = "SP.API") -> None:
        super().__init__(f"{errorid} {text}")
        self.errorid, self.text, self.error_class = errorid, text, error_class


class JobError(Exception):
    """Ends a data job in ERROR; the message is kept on the job for tests (undocumented where Acoustic says why)."""


@dataclass
class Column:
    """A database column: [METADATA] NAME, TYPE, DEFAULT_VALUE; TYPE codes from [MAPDOC]."""

    name: str
    type: int = TEXT
    default_value: str = ""


@dataclass
class Contact:
    """A contact and the system fields an export writes ([SAMPLE17], [SAMPLE24])."""

    email: str
    recipient_id: int
    opt_in_date: datetime
    last_modified: datetime
    fields: dict[str, Any] = field(default_factory=dict)  # custom columns; DATE columns hold a ``date``
    opt_in_details: str = "Added by WebForms"  # [SAMPLE17]'s wording, for contacts tests add directly
    opted_out: bool = False
    opted_out_date: datetime | None = None
    opt_out_details: str = ""
    undeliverable: bool = False  # what EXPORT_TYPE UNDELIVERABLE selects; set by tests
    email_type: int = 0  # [SAMPLE17] "Email Type" 0 (HTML)


@dataclass
class ContactList:
    """A database: its columns, key columns ([METADATA] KEY_COLUMNS), and contacts by lower-cased address."""

    id: str
    name: str
    columns: list[Column]
    created: datetime
    key_columns: list[str] = field(default_factory=lambda: ["Email"])
    contacts: dict[str, Contact] = field(default_factory=dict)

    def column(self, name: str) -> Column | None:
        # [FAQ] "database fields are also case sensitive": custom columns match exactly.
        return next((column for column in self.columns if column.name == name), None)

    @property
    def last_modified(self) -> datetime:
        return max([self.created, *(contact.last_modified for contact in self.contacts.values())])


@dataclass
class Job:
    """A data job ([JOBSTATUS]). ``work`` runs when the polls run out and returns the completed PARAMETERS."""

    id: int
    description: str
    work: Callable[[], Params]
    parameters: Params
    status: str = "WAITING"
    polls: int = 0
    error: str = ""


@dataclass
class MapColumn:
    name: str
    type: int
    required: bool


@dataclass
class Mapped:
    index: int  # 1-based position in the source row ([MAPDOC], Wikimedia's map files)
    name: str
    include: bool


@dataclass
class ImportMap:
    """A parsed LIST_IMPORT map file ([MAPDOC])."""

    action: str
    list_id: str
    delimiter: str
    has_headers: bool
    date_format: str
    sync_fields: list[str]
    columns: list[MapColumn]
    mapping: list[Mapped]


@dataclass
class ExportSpec:
    list_id: str
    export_type: str
    delimiter: str
    encoding: str
    start: datetime | None
    end: datetime | None
    use_created_date: bool
    columns: list[str]
    date_format: str | None
    stored: bool
    file_name: str


@dataclass
class Tally:
    """An import's counters, named as [JOBSTATUS] and [KA] name them."""

    total_rows: int = 0
    total_valid: int = 0
    bad_records: int = 0
    bad_addresses: int = 0
    duplicates: int = 0
    added: int = 0
    updated: int = 0
    rejected: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (line, error, fields)


class RowError(Exception):
    def __init__(self, message: str, *, address: bool = False) -> None:
        super().__init__(message)
        self.address = address


def is_email_column(name: str) -> bool:
    """[METADATA] names the address column EMAIL and its key Email; [SAMPLE17] writes Email: either spelling."""
    return name.lower() == "email"


# ---------------------------------------------------------------------------------------------- XML helpers


def envelope(*body: Element) -> str:
    root = Element("Envelope")
    ElementTree.SubElement(root, "Body").extend(body)
    return ElementTree.tostring(root, encoding="unicode")


def leaf(tag: str, text: str | None = None) -> Element:
    element = Element(tag)
    element.text = text
    return element


def result(items: Iterable[tuple[str, str] | Element]) -> Element:
    """``<RESULT><SUCCESS>TRUE</SUCCESS>...`` ([IMPORT], [JOBSTATUS], [METADATA] samples)."""
    element = Element("RESULT")
    element.append(leaf("SUCCESS", "TRUE"))
    for item in items:
        element.append(item if isinstance(item, Element) else leaf(*item))
    return element


def fault_body(fault: Fault) -> list[Element]:
    """[FAQ] the fault layout, with the error's number and class."""
    failed = Element("RESULT")
    failed.append(leaf("SUCCESS", "false"))
    node = Element("Fault")
    node.extend([leaf("Request"), leaf("FaultCode"), leaf("FaultString", fault.text)])
    error = ElementTree.SubElement(ElementTree.SubElement(node, "detail"), "error")
    error.extend(
        [leaf("errorid", str(fault.errorid)), leaf("module"), leaf("class", fault.error_class), leaf("method")]
    )
    return [failed, node]


def parse_operation(text: str) -> Element:
    """The one operation inside ``<Envelope><Body>``. Tags are case sensitive ([FAQ]). Undocumented: an empty
    request is fault 50 "Server Error" ([ERRORS]: "no XML passed"); several operations in one Body (which
    [OVERVIEW] allows as batching) are not modelled and answered as invalid."""
    if not text.strip():
        raise Fault(50, "Server Error")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        raise Fault(51, INVALID_XML) from error
    body = root.find("Body") if root.tag == "Envelope" else None
    if body is None or len(body) != 1:
        raise Fault(51, INVALID_XML)
    return body[0]


def required(operation: Element, tag: str) -> str:
    text = (operation.findtext(tag) or "").strip()
    if not text:
        raise Fault(100, f'Parameter "{tag}" was not provided in the API call')  # [ERRORS] 100
    return text


def optional(operation: Element, tag: str) -> str:
    return (operation.findtext(tag) or "").strip()


def flag(operation: Element, tag: str) -> bool:
    """An empty element like ``<ADD_TO_STORED_FILES/>`` ([WMF]); "false" as its text turns it off (undocumented)."""
    element = operation.find(tag)
    return element is not None and (element.text or "").strip().lower() != "false"


# ------------------------------------------------------------------------------------------ dates and times


DATE_TOKENS = re.compile(r"yyyy|yy|month|mon|mm|m|dd|d", re.IGNORECASE)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip


def render_date(value: date, pattern: str) -> str:
    """[WMF] LIST_DATE_FORMAT tokens: mm, m, mon, month; dd, d; yyyy, yy (matched regardless of case: Wikimedia
    sends "MM/dd/yyyy")."""
    parts = {
        "yyyy": f"{value.year:04d}",
        "yy": f"{value.year % 100:02d}",
        "month": MONTHS[value.month - 1],
        "mon": MONTHS[value.month - 1][:3],
        "mm": f"{value.month:02d}",
        "m": str(value.month),
        "dd": f"{value.day:02d}",
        "d": str(value.day),
    }
    return DATE_TOKENS.sub(lambda match: parts[match.group(0).lower()], pattern)


def parse_date(text: str, pattern: str) -> date:
    """Reads a value written with a LIST_DATE_FORMAT pattern (``mm/dd/yyyy`` by default, [WMF])."""
    pieces = {"yyyy": r"(?P<y>\d{4})", "yy": r"(?P<yy>\d{2})", "month": r"(?P<month>[A-Za-z]+)",
              "mon": r"(?P<mon>[A-Za-z]{3})", "mm": r"(?P<m>\d{2})", "m": r"(?P<m>\d{1,2})",
              "dd": r"(?P<d>\d{2})", "d": r"(?P<d>\d{1,2})"}  # fmt: skip
    regex, last = "", 0
    for match in DATE_TOKENS.finditer(pattern):
        regex += re.escape(pattern[last : match.start()]) + pieces[match.group(0).lower()]
        last = match.end()
    found = re.fullmatch(regex + re.escape(pattern[last:]), text.strip())
    if not found:
        raise ValueError(text)
    return date(year_of(found.groupdict()), month_of(found.groupdict()), int(found.group("d")))


def year_of(groups: Mapping[str, str | None]) -> int:
    if groups.get("y"):
        return int(str(groups["y"]))
    return 2000 + int(str(groups["yy"]))  # undocumented century for two-digit years: this one


def month_of(groups: Mapping[str, str | None]) -> int:
    name = groups.get("month") or groups.get("mon")
    if name:
        return next(number for number, month in enumerate(MONTHS, 1) if month.lower().startswith(name.lower()))
    return int(str(groups["m"]))


def parse_boundary(text: str, zone: tzinfo) -> datetime | None:
    """[WMF], [KA] DATE_START/DATE_END "mm/dd/yyyy hh:mm:ss" (24-hour); a bare date is taken as midnight
    (undocumented). Read in the organisation's time zone (undocumented: ``AcousticServer.timezone``)."""
    if not text:
        return None
    for pattern in ("%m/%d/%Y %H:%M:%S", "%m/%d/%Y"):
        try:
            return datetime.strptime(text, pattern).replace(tzinfo=zone)
        except ValueError:
            continue
    raise Fault(184, "Numerous errors related to dates.")  # [ERRORS] 184; undocumented which fault it is


# -------------------------------------------------------------------------------------------------- OAuth


class TokenIssuer:
    """[OAUTH] access tokens from the refresh token. Credentials are generated: client id and secret as UUIDs
    (their shape in public configurations), the refresh token like [TOKENJSON]'s."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self.now = now
        self.client_id = str(uuid.uuid4())
        self.client_secret = str(uuid.uuid4())
        self.refresh_token = "r-" + secrets.token_urlsafe(32) + "S1"
        self.lifetime = TOKEN_LIFETIME
        self.reuse_window = TOKEN_REUSE_WINDOW
        self.issued: dict[str, datetime] = {}  # every access token by value, with when it was issued
        self.latest = ""

    def grant(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """Undocumented: the refusals. Their statuses and codes are [RFC6749] section 5.2's, in the JSON shape
        [NODE] reads (``error``, ``error_description``); the descriptions are this fake's."""
        if form.get("grant_type") != "refresh_token":
            code = "invalid_request" if not form.get("grant_type") else "unsupported_grant_type"
            return 400, {"error": code, "error_description": "grant_type must be refresh_token"}
        if (form.get("client_id"), form.get("client_secret")) != (self.client_id, self.client_secret):
            return 401, {"error": "invalid_client", "error_description": "Bad client credentials"}
        if form.get("refresh_token") != self.refresh_token:
            return 400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}
        token, expires_in = self.issue()
        body = {"access_token": token, "token_type": "bearer", "refresh_token": self.refresh_token}
        return 200, {**body, "expires_in": expires_in}  # [TOKENJSON]

    def issue(self) -> tuple[str, int]:
        """[OAUTH] the latest token again while it is younger than the reuse window (and still valid), with the
        seconds it has left; a new one after. Older tokens stay valid until they expire."""
        now = self.now()
        age = (now - self.issued[self.latest]).total_seconds() if self.latest else None
        if age is None or age >= min(self.reuse_window, self.lifetime):
            self.latest = secrets.token_urlsafe(33) + "S1"  # [TOKENJSON]'s shape: 46 characters ending "S1"
            self.issued[self.latest] = now
            age = 0.0
        return self.latest, int(self.lifetime - age)

    def valid(self, token: str) -> bool:
        issued = self.issued.get(token)
        return issued is not None and self.now() < issued + timedelta(seconds=self.lifetime)


# ------------------------------------------------------------------------------------------------ the API


class AcousticApi:
    """The XML API's behaviour without HTTP: lists, contacts, jobs and files. Callers hold ``lock``."""

    def __init__(self, root: Path) -> None:
        self.lock = threading.RLock()
        self.root = root
        self.lists: dict[str, ContactList] = {}
        self.jobs: dict[int, Job] = {}
        self.job_polls = 1  # polls a job answers WAITING (the first) or RUNNING (later ones) to before it runs
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.timezone: tzinfo = UTC  # the organisation's time zone for file dates (undocumented: a setting)
        self.export_style = STYLE_2024  # which real export file the CSV follows: [SAMPLE24] or [SAMPLE17]
        self.user_name = "api-user@example.com"  # [SAMPLE24] Opt In Details name the API user of an import
        self.operations: list[str] = []  # the operation of each XML API request, in order
        self._job_ids = itertools.count(FIRST_JOB_ID)
        self._file_numbers = itertools.count(FIRST_RESULT_FILE)
        self._recipient_ids = itertools.count(1)
        self._handlers: dict[str, Callable[[Element, str], list[tuple[str, str] | Element]]] = {
            "ImportList": self.import_list,
            "GetJobStatus": self.get_job_status,
            "ExportList": self.export_list,
            "GetListMetaData": self.get_list_metadata,
        }

    @property
    def upload(self) -> Path:
        return self.root / "upload"

    @property
    def download(self) -> Path:
        return self.root / "download"

    def dispatch(self, text: str, caller: str) -> str:
        """Answers one XML API request body with its envelope."""
        try:
            operation = parse_operation(text)
            self.operations.append(operation.tag)
            handler = self._handlers.get(operation.tag)
            if handler is None:  # [FAQ]: a tag it does not know (wrong case included) is an invalid request
                raise Fault(51, INVALID_XML)
            return envelope(result(handler(operation, caller)))
        except Fault as fault:
            return envelope(*fault_body(fault))

    def contact_list(self, operation: Element) -> ContactList:
        list_id = required(operation, "LIST_ID")
        if not list_id.isdigit():
            raise Fault(310, f'Invalid value for element LIST_ID. Not an integer. Value:"{list_id}"')  # [ERRORS]
        if list_id not in self.lists:
            raise Fault(106, "List ID is not valid.")  # [ERRORS] 106; undocumented which fault an unknown id gets
        return self.lists[list_id]

    # -------------------------------------------------------------------------------------- GetListMetaData

    def get_list_metadata(self, operation: Element, caller: str) -> list[tuple[str, str] | Element]:
        """[METADATA] the database's summary, its columns (system ones by NAME only, as in the sample) and key
        columns. Undocumented values: TYPE 0 (a database), VISIBILITY 0, the form flags false, the ids."""
        target = self.contact_list(operation)
        contacts = list(target.contacts.values())
        stamp = self.metadata_time
        return [
            ("ID", target.id),
            ("NAME", target.name),
            ("TYPE", "0"),
            ("SIZE", str(len(contacts))),
            ("NUM_OPT_OUTS", str(sum(contact.opted_out for contact in contacts))),
            ("NUM_UNDELIVERABLE", str(sum(contact.undeliverable for contact in contacts))),
            ("LAST_MODIFIED", stamp(target.last_modified)),
            ("LAST_CONFIGURED", stamp(target.created)),
            ("CREATED", stamp(target.created)),
            ("VISIBILITY", "0"),
            ("USER_ID", "12c734c-108b610e402-f528764d624db129b32c21fbca0cb8d6"),  # [METADATA]'s sample
            ("ORGANIZATION_ID", "113cf49-fc61243b0b-f528764d624db129b32c21fbca0cb8d6"),
            *[(name, "false") for name in ("OPT_IN_FORM_DEFINED", "OPT_OUT_FORM_DEFINED", "PROFILE_FORM_DEFINED")],
            *[(name, "false") for name in ("OPT_IN_AUTOREPLY_DEFINED", "PROFILE_AUTOREPLY_DEFINED")],
            metadata_columns(target),
            key_columns(target),
        ]

    def metadata_time(self, moment: datetime) -> str:
        return moment.astimezone(self.timezone).strftime("%m/%d/%y %I:%M %p")  # [METADATA] "02/02/06 04:51 PM"

    # ------------------------------------------------------------------------------------------- data jobs

    def add_job(self, description: str, work: Callable[[], Params], parameters: Params) -> Job:
        job = Job(next(self._job_ids), description, work, parameters)
        self.jobs[job.id] = job
        return job

    def get_job_status(self, operation: Element, caller: str) -> list[tuple[str, str] | Element]:
        """[JOBSTATUS] JOB_ID, JOB_STATUS, JOB_DESCRIPTION, PARAMETERS. Each poll moves the job on."""
        text = required(operation, "JOB_ID")
        job = self.jobs.get(int(text)) if text.isdigit() else None
        if job is None:
            raise Fault(135, "The job ID is not valid.")  # [ERRORS] 135
        self.poll(job)
        parameters = Element("PARAMETERS")
        for name, value in job.parameters.items():
            entry = ElementTree.SubElement(parameters, "PARAMETER")
            entry.extend([leaf("NAME", name), leaf("VALUE", value)])
        status = [("JOB_STATUS", job.status), ("JOB_DESCRIPTION", job.description)]
        return [("JOB_ID", str(job.id)), *status, parameters]

    def poll(self, job: Job) -> None:
        """WAITING on the first poll, RUNNING on later ones, for ``job_polls`` polls; the next poll runs the job
        and answers COMPLETE or ERROR. Undocumented: how long a job takes; polls stand in for time here."""
        if job.status not in ("WAITING", "RUNNING"):
            return
        if job.polls < self.job_polls:
            job.status = "WAITING" if job.polls == 0 else "RUNNING"
            job.polls += 1
            return
        self.run(job)

    def run(self, job: Job) -> None:
        try:
            job.parameters = job.work()
            job.status = "COMPLETE"
        except JobError as error:
            job.status, job.error = "ERROR", str(error)

    # ------------------------------------------------------------------------------------------ ImportList

    def import_list(self, operation: Element, caller: str) -> list[tuple[str, str] | Element]:
        """[IMPORT] starts a job; the files are read when it runs, so a missing or unreadable file ends the job
        in ERROR rather than failing the call (undocumented; [IMPORT]: the "import service will not find them")."""
        map_file, source_file = required(operation, "MAP_FILE"), required(operation, "SOURCE_FILE")
        encoding = optional(operation, "FILE_ENCODING") or "UTF-8"  # undocumented org default: UTF-8
        if encoding not in ENCODINGS:
            raise Fault(141, "Encoding is not valid.")  # [ERRORS] 141
        target = self.peek_list(map_file)
        name = target.name if target else ""
        parameters = waiting_import_parameters(target.id if target else "", name)
        # Undocumented: JOB_DESCRIPTION of an update; [JOBSTATUS]'s sample for a new one is "Creating new contact
        # source, Master database", so this follows its wording.
        description = f"Updating contact source, {name}" if name else "Updating contact source"
        source = ImportSource(map_file, source_file, ENCODINGS[encoding], f"User Name: {self.user_name}. "
                              f"IP Address: {caller}")  # fmt: skip
        job = self.add_job(description, lambda: self.run_import(source), parameters)
        return [("JOB_ID", str(job.id))]

    def peek_list(self, map_file: str) -> ContactList | None:
        try:
            return self.lists.get(read_map(self.upload / map_file).list_id)
        except JobError:
            return None

    def run_import(self, source: ImportSource) -> Params:
        spec = read_map(self.upload / source.map_file)
        target = self.lists.get(spec.list_id)
        if target is None:
            raise JobError("List ID is not valid.")  # [ERRORS] 106's words
        check_map(spec, target)
        header, rows = read_source(self.upload / source.source_file, spec, source.encoding)
        tally = Tally()
        seen: set[tuple[str, ...]] = set()
        for line, values in rows:
            self.import_row(spec, target, tally, seen, (line, values), source.details)
        return self.import_results(target, tally, header)

    def import_row(
        self,
        spec: ImportMap,
        target: ContactList,
        tally: Tally,
        seen: set[tuple[str, ...]],
        row: tuple[int, list[str]],
        details: str,
    ) -> None:
        """One source row: rejected (counted in BAD_ADDRESSES for an invalid address, BAD_RECORDS otherwise, and
        written to the .err file), a DUPLICATES of an earlier row's sync key (skipped: undocumented which row
        wins; the first does), or valid and applied."""
        line, values = row
        tally.total_rows += 1
        try:
            taken = take_row(spec, target, values)
        except RowError as error:
            tally.bad_addresses += error.address
            tally.bad_records += not error.address
            tally.rejected.append((line, str(error), values))
            return
        if taken.key in seen:
            tally.duplicates += 1
            return
        seen.add(taken.key)
        tally.total_valid += 1
        outcome = self.apply_row(spec.action, target, taken, details)
        tally.added += outcome == "added"
        tally.updated += outcome == "updated"

    def apply_row(self, action: str, target: ContactList, taken: Taken, details: str) -> str:
        """[MAPDOC] each ACTION's rule. Undocumented, and chosen: an update keeps an opted-out contact opted out;
        an OPT_OUT row changes no other field; last-modified moves only when something changed."""
        now, email, fields = self.clock(), taken.email, taken.fields
        existing = target.contacts.get(email.lower())
        if action == "OPT_OUT":
            if existing is None or existing.opted_out:
                return "ignored"
            opt_out_contact(existing, now, "Opted out by import.")  # undocumented wording of Opt Out Details
            return "updated"
        if existing is None:
            if action == "UPDATE_ONLY":
                return "ignored"
            target.contacts[email.lower()] = self.new_contact(email, fields, now, details)
            return "added"
        if action == "ADD_ONLY":
            return "ignored"
        if any(existing.fields.get(name) != value for name, value in fields.items()):
            existing.fields.update(fields)
            existing.last_modified = now
        return "updated"

    def new_contact(self, email: str, fields: dict[str, Any], now: datetime, details: str) -> Contact:
        return Contact(email, next(self._recipient_ids), now, now, dict(fields), opt_in_details=details)

    def import_results(self, target: ContactList, tally: Tally, header: list[str]) -> Params:
        """[JOBSTATUS] the completed import's PARAMETERS and its .res and .err files in ``download``."""
        number = next(self._file_numbers)
        results_file, error_file = f"{number}.res", f"{number}.err"
        parameters = {
            "NOT_ALLOWED": "0",  # undocumented what is "not allowed"; nothing here
            "LIST_ID": target.id,
            "RESULTS_FILE_NAME": results_file,
            "SQL_ADDED": str(tally.added),
            "ERROR_FILE_NAME": error_file,
            "LIST_NAME": target.name,
            "BAD_ADDRESSES": str(tally.bad_addresses),
            "SQL_UPDATED": str(tally.updated),
            "BAD_RECORDS": str(tally.bad_records),
            "TOTAL_VALID": str(tally.total_valid),
            "TOTAL_ROWS": str(tally.total_rows),  # [KA], and the javadoc in [JOBSTATUS]
            "DUPLICATES": str(tally.duplicates),
        }
        self.download.mkdir(parents=True, exist_ok=True)
        write_results_file(self.download / results_file, parameters)
        write_error_file(self.download / error_file, header, tally.rejected)
        return parameters

    # ------------------------------------------------------------------------------------------ ExportList

    def export_list(self, operation: Element, caller: str) -> list[tuple[str, str] | Element]:
        """[WMF], [NODE] ExportList: JOB_ID and FILE_PATH at once; the file appears in ``download`` when the job
        completes, with the contacts as they are then (undocumented: when the rows are read)."""
        spec = self.export_spec(operation)
        target = self.lists[spec.list_id]
        # Undocumented: an export job's JOB_DESCRIPTION; [JOBSTATUS]'s sample wording again.
        job = self.add_job(f"Exporting contact source, {target.name}", lambda: self.run_export(spec), {})
        return [("JOB_ID", str(job.id)), ("FILE_PATH", f"/download/{spec.file_name}")]  # [SAMPLE17]

    def export_spec(self, operation: Element) -> ExportSpec:
        target = self.contact_list(operation)
        export_type = required(operation, "EXPORT_TYPE")
        if export_type not in EXPORT_TYPES:
            raise Fault(51, INVALID_XML)  # undocumented which fault an unknown EXPORT_TYPE gets
        export_format = required(operation, "EXPORT_FORMAT")
        if export_format not in EXPORT_FORMATS:
            raise Fault(321, "The export format is not valid.")  # [ERRORS] 321
        encoding = optional(operation, "FILE_ENCODING") or "UTF-8"
        if encoding not in ENCODINGS:
            raise Fault(141, "Encoding is not valid.")
        delimiter, extension = EXPORT_FORMATS[export_format]
        return ExportSpec(
            list_id=target.id,
            export_type=export_type,
            delimiter=delimiter,
            encoding="utf-8" if encoding == "UTF-8" else "iso-8859-1",  # undocumented: no BOM written
            start=parse_boundary(optional(operation, "DATE_START"), self.timezone),
            end=parse_boundary(optional(operation, "DATE_END"), self.timezone),
            use_created_date=flag(operation, "USE_CREATED_DATE"),
            columns=export_columns(
                target, [(c.text or "").strip() for c in operation.iterfind("EXPORT_COLUMNS/COLUMN")]
            ),
            date_format=optional(operation, "LIST_DATE_FORMAT") or None,
            stored=flag(operation, "ADD_TO_STORED_FILES"),
            file_name=self.export_file_name(target, export_type, extension),
        )

    def export_file_name(self, target: ContactList, export_type: str, extension: str) -> str:
        """[SAMPLE17] "<database> - All - Jul 5 2017 06-27-45 AM.csv": the time the export was asked for."""
        moment = self.clock().astimezone(self.timezone)
        stamp = f"{moment:%b} {moment.day} {moment:%Y %I-%M-%S %p}"
        return f"{target.name} - {EXPORT_TYPES[export_type]} - {stamp}{extension}"

    def run_export(self, spec: ExportSpec) -> Params:
        """Writes the file. [WMF] says ADD_TO_STORED_FILES writes to Stored Files and that without it the file
        goes to the FTP download folder, yet Wikimedia sends it and downloads ``download/<name>``: the file is
        written to ``download`` either way, and the parameters say where it is kept ([KA]'s names)."""
        target = self.lists[spec.list_id]
        rows = [self.export_row(target, contact, spec) for contact in self.selected(target, spec)]
        self.download.mkdir(parents=True, exist_ok=True)
        write_export(self.download / spec.file_name, spec, rows, quote_all=self.export_style == STYLE_2024)
        return {
            "NUM_PROCESSED": str(len(rows)),
            "LIST_ID": target.id,
            "LIST_NAME": target.name,
            "FILE_ENCODING": "UTF-8" if spec.encoding == "utf-8" else "ISO-8859-1",
            "KEEP_IN_STORED_FILES": str(spec.stored).lower(),
            "KEEP_IN_FTP_DOWNLOAD_DIRECTORY": "true",
        }

    def selected(self, target: ContactList, spec: ExportSpec) -> Iterator[Contact]:
        """[WMF] EXPORT_TYPE: "ALL – export entire database", "OPT_IN – export only currently opted-in contacts",
        "OPT_OUT – ... currently opted-out", "UNDELIVERABLE – ... currently marked as undeliverable"; [NODE]
        DATE_START/DATE_END bound the last modified date (USE_CREATED_DATE: the creation date, [KA]'s element,
        undocumented semantics) for every type. Undocumented: both bounds are inclusive, to the second."""
        for contact in target.contacts.values():
            moment = contact.opt_in_date if spec.use_created_date else contact.last_modified
            if within(moment.replace(microsecond=0), spec.start, spec.end) and of_type(contact, spec.export_type):
                yield contact

    def export_row(self, target: ContactList, contact: Contact, spec: ExportSpec) -> list[str]:
        system = {
            "Email": contact.email,
            "Opt In Date": self.file_time(contact.opt_in_date),
            "Opted Out": "T" if contact.opted_out else "F",
            "Opt In Details": contact.opt_in_details,
            "Email Type": str(contact.email_type),
            "Opted Out Date": self.file_time(contact.opted_out_date),
            "Opt Out Details": contact.opt_out_details,
            "RECIPIENT_ID": str(contact.recipient_id),
            "Last Modified Date": self.file_time(contact.last_modified),
        }
        return [
            system[name] if name in system else self.file_value(target, contact, name, spec) for name in spec.columns
        ]

    def file_time(self, moment: datetime | None) -> str:
        """[SAMPLE24] "02/20/2024 09:01 AM"; [SAMPLE17] "10/18/16 08:01 PM"; empty when unset."""
        if moment is None:
            return ""
        year = "%y" if self.export_style == STYLE_2017 else "%Y"
        return moment.astimezone(self.timezone).strftime(f"%m/%d/{year} %I:%M %p")

    def file_value(self, target: ContactList, contact: Contact, name: str, spec: ExportSpec) -> str:
        """A custom column: DATE columns as LIST_DATE_FORMAT asks ([WMF]), else as the samples write them
        ([SAMPLE24] "12/20/2024", [SAMPLE17] "12/04/16"); unset columns empty (undocumented: not the default)."""
        value = contact.fields.get(name)
        if value is None:
            return ""
        if isinstance(value, date):
            default = "mm/dd/yy" if self.export_style == STYLE_2017 else "mm/dd/yyyy"
            return render_date(value, spec.date_format or default)
        return str(value)


def within(moment: datetime, start: datetime | None, end: datetime | None) -> bool:
    return (start is None or moment >= start) and (end is None or moment <= end)


def of_type(contact: Contact, export_type: str) -> bool:
    """Undocumented: whether an undeliverable contact is also "opted in"; it is here (nothing excludes it)."""
    kinds = {"ALL": True, "OPT_IN": not contact.opted_out, "OPT_OUT": contact.opted_out}
    return kinds.get(export_type, contact.undeliverable)


@dataclass
class ImportSource:
    map_file: str
    source_file: str
    encoding: str
    details: str  # Opt In Details of contacts the import adds ([SAMPLE24])


def waiting_import_parameters(list_id: str, list_name: str) -> Params:
    """The javadoc in [JOBSTATUS]: a waiting or running import reports these (zero until it runs here)."""
    counters = ("NOT_ALLOWED", "SQL_ADDED", "DUPLICATES", "TOTAL_ROWS", "BAD_ADDRESSES", "TOTAL_VALID", "BAD_RECORDS")
    return {"LIST_ID": list_id, "LIST_NAME": list_name, **dict.fromkeys(counters, "0")}


def metadata_columns(target: ContactList) -> Element:
    columns = Element("COLUMNS")
    for name in METADATA_SYSTEM_COLUMNS:
        ElementTree.SubElement(columns, "COLUMN").append(leaf("NAME", name))
    for column in target.columns:
        entry = ElementTree.SubElement(columns, "COLUMN")
        entry.append(leaf("NAME", column.name))
        if column.default_value:
            entry.append(leaf("DEFAULT_VALUE", column.default_value))
        entry.append(leaf("TYPE", str(column.type)))
    return columns


def key_columns(target: ContactList) -> Element:
    keys = Element("KEY_COLUMNS")
    for name in target.key_columns:
        ElementTree.SubElement(keys, "COLUMN").append(leaf("NAME", name))
    return keys


def export_columns(target: ContactList, requested: list[str]) -> list[str]:
    """Without EXPORT_COLUMNS: [SAMPLE17]'s system columns, then the custom ones in list order. With it: the named
    columns in the order asked, system ones matched regardless of case and written in their own spelling
    ([SAMPLE24]); a name that is neither is fault 153 ([ERRORS] ERR_EXPORT_NOT_LIST_COLUMN; undocumented wording,
    and [WMF] avoids asking a list for columns it lacks)."""
    if not requested:
        return [*DEFAULT_SYSTEM_COLUMNS, *(column.name for column in target.columns)]
    system = {name.lower(): name for name in REQUESTABLE_SYSTEM_COLUMNS}
    resolved = []
    for name in requested:
        if name.lower() in system:
            resolved.append(system[name.lower()])
        elif target.column(name) is not None:
            resolved.append(name)
        else:
            raise Fault(153, f'ERR_EXPORT_NOT_LIST_COLUMN: Column "{name}" is not found in the list.')
    return resolved


def write_export(path: Path, spec: ExportSpec, rows: list[list[str]], *, quote_all: bool) -> None:
    """A header row and one row per contact; every field quoted as in [SAMPLE24], or only where needed as in
    [SAMPLE17]. Undocumented: line ends (CRLF, the csv module's)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=spec.delimiter, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    writer.writerow(spec.columns)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(spec.encoding, errors="replace"))


# ------------------------------------------------------------------------------------- map and source files


def read_map(path: Path) -> ImportMap:
    """[MAPDOC] LIST_IMPORT. Any problem with the map ends the job in ERROR (undocumented how Acoustic reports it)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise JobError(f"The map file {path.name} cannot be read.") from error
    info = root.find("LIST_INFO")
    if root.tag != "LIST_IMPORT" or info is None:
        raise JobError("The map file has no LIST_IMPORT/LIST_INFO.")
    action = (info.findtext("ACTION") or "").strip().upper()
    if action not in IMPORT_ACTIONS:
        raise JobError(f"ACTION {action!r} is not modelled.")
    file_type = (info.findtext("FILE_TYPE") or "0").strip()
    if file_type not in FILE_TYPES:
        raise JobError("The file type is not valid.")  # [ERRORS] 133
    return ImportMap(
        action=action,
        list_id=(info.findtext("LIST_ID") or "").strip(),
        delimiter=FILE_TYPES[file_type],
        has_headers=(info.findtext("HASHEADERS") or "").strip().lower() == "true",
        # [WMF] the default; Wikimedia's example.xml puts LIST_DATE_FORMAT in LIST_INFO ([MAPDOC]).
        date_format=(info.findtext("LIST_DATE_FORMAT") or "mm/dd/yyyy").strip(),
        sync_fields=sync_fields(root),
        columns=[map_column(entry) for entry in root.iterfind("COLUMNS/COLUMN")],
        mapping=[mapped(entry) for entry in root.iterfind("MAPPING/COLUMN")],
    )


def sync_fields(root: Element) -> list[str]:
    """SYNC_FIELDS/SYNC_FIELD/NAME. Without them the address is the key (undocumented: the list's key columns
    are not consulted; the lists here are keyed by address)."""
    names = [(entry.findtext("NAME") or "").strip() for entry in root.iterfind("SYNC_FIELDS/SYNC_FIELD")]
    if "" in names:
        raise JobError("SYNC_FiELD element found without a NAME.")  # [ERRORS] 329
    return names or ["EMAIL"]


def map_column(entry: Element) -> MapColumn:
    """[MAPDOC] COLUMNS/COLUMN NAME, TYPE, IS_REQUIRED (KEY_COLUMN only matters to CREATE, not modelled)."""
    try:
        column_type = int((entry.findtext("TYPE") or "0").strip())
    except ValueError as error:
        raise JobError("A COLUMN TYPE is not a number.") from error
    is_required = (entry.findtext("IS_REQUIRED") or "").strip().lower() == "true"
    return MapColumn((entry.findtext("NAME") or "").strip(), column_type, is_required)


def mapped(entry: Element) -> Mapped:
    """MAPPING/COLUMN INDEX, NAME, INCLUDE (undocumented default when INCLUDE is absent: true)."""
    index = (entry.findtext("INDEX") or "").strip()
    if not index.isdigit() or int(index) < 1:
        raise JobError(f"MAPPING INDEX {index!r} is not a column number.")
    include = (entry.findtext("INCLUDE") or "true").strip().lower() != "false"
    return Mapped(int(index), (entry.findtext("NAME") or "").strip(), include)


def check_map(spec: ImportMap, target: ContactList) -> None:
    """Every named column must be the address or one of the list's; the address and each sync field must be
    mapped. Undocumented: Acoustic's answer to a map naming an unknown column; here the job ends in ERROR with
    [ERRORS] 314's words (COLUMNS does not add columns to an existing list here)."""
    names = [item.name for item in spec.mapping] + [column.name for column in spec.columns] + spec.sync_fields
    for name in names:
        if not is_email_column(name) and target.column(name) is None:
            raise JobError(f'Column "{name}" is not found in the list.')
    included = {item.name.lower() for item in spec.mapping if item.include}
    if "email" not in included or any(name.lower() not in included for name in spec.sync_fields):
        raise JobError(KEY_VALUES_MISSING)  # [ERRORS] 211


def read_source(path: Path, spec: ImportMap, encoding: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The source file's header (or ``COLUMN_<n>`` names without one) and its rows with their line numbers."""
    try:
        text = path.read_bytes().decode(encoding)
    except (OSError, UnicodeDecodeError) as error:
        raise JobError(f"The source file {path.name} cannot be read.") from error
    lines = list(csv.reader(io.StringIO(text, newline=""), delimiter=spec.delimiter))
    header = lines[0] if spec.has_headers and lines else []
    body = lines[1:] if spec.has_headers else lines
    first = 2 if spec.has_headers else 1
    rows = [(number, values) for number, values in enumerate(body, start=first) if any(v.strip() for v in values)]
    width = max([len(header), *(len(values) for _, values in rows)], default=0)
    return header or [f"COLUMN_{n}" for n in range(1, width + 1)], rows


@dataclass
class Taken:
    email: str
    fields: dict[str, Any]  # custom column values, typed
    key: tuple[str, ...]  # the sync fields' values, lower-cased


def take_row(spec: ImportMap, target: ContactList, values: list[str]) -> Taken:
    """A row's address, custom values and sync key, or the reason it is rejected. The reasons use [ERRORS]'
    words (1017, 211, 1016); the other wordings are undocumented. Values are stripped of surrounding spaces
    (undocumented). Sync field names match the map's regardless of case (EMAIL is named either way)."""
    needed = max(item.index for item in spec.mapping)
    if len(values) < needed:
        raise RowError(f"The row has {len(values)} fields; the map reads field {needed}.")
    row = {item.name: values[item.index - 1].strip() for item in spec.mapping if item.include}
    by_lower = {name.lower(): value for name, value in row.items()}
    key = tuple(by_lower.get(name.lower(), "") for name in spec.sync_fields)
    if not all(key) or not by_lower["email"]:
        raise RowError(KEY_VALUES_MISSING)
    if not EMAIL_PATTERN.fullmatch(by_lower["email"]):
        raise RowError("The email address is invalid.", address=True)
    for column in spec.columns:
        value = by_lower["email"] if is_email_column(column.name) else row.get(column.name)
        if column.required and not value:
            raise RowError(f"Missing required column value. ({column.name})")
    fields = {
        name: typed(target, name, value, spec.date_format) for name, value in row.items() if not is_email_column(name)
    }
    return Taken(by_lower["email"], fields, tuple(value.lower() for value in key))


def typed(target: ContactList, name: str, value: str, date_format: str) -> Any:
    column = target.column(name)
    if column is None or not value:
        return value
    if column.type == NUMERIC and not re.fullmatch(r"-?\d+(\.\d+)?", value):
        raise RowError(f"Invalid numeric value for column {name}.")
    if column.type == DATE:
        try:
            return parse_date(value, date_format)
        except ValueError as error:
            raise RowError(f"Invalid date for column {name}; expected {date_format}.") from error
    return value


def write_results_file(path: Path, parameters: Params) -> None:
    """Undocumented: what a .res file holds ([JOBSTATUS] names it only). Here: NAME=VALUE lines of the counts."""
    path.write_text("".join(f"{name}={value}\n" for name, value in parameters.items()), encoding="utf-8")


def write_error_file(path: Path, header: list[str], rejected: list[tuple[int, str, list[str]]]) -> None:
    """Undocumented: what a .err file holds ([JOBSTATUS] names it only). Here: a CSV of the rejected rows with
    the columns ``LINE_NUMBER``, ``ERROR`` and then the source file's own (written even when empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["LINE_NUMBER", "ERROR", *header])
    writer.writerows([str(line), error, *values] for line, error, values in rejected)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def opt_out_contact(contact: Contact, at: datetime, details: str) -> None:
    contact.opted_out, contact.opted_out_date, contact.opt_out_details = True, at, details
    contact.last_modified = at  # undocumented: an opt-out counts as a modification (so DATE_START finds it)


# ---------------------------------------------------------------------------------------------- the server


def plain_response(status: int) -> web.Response:
    """Injected failures and the concurrency limit: an HTTP-level answer with a text body. Undocumented: what
    Acoustic answers past its limit ([OVERVIEW] names no status); 429 is this fake's choice."""
    return web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}")


def json_response(status: int, body: Mapping[str, Any]) -> web.Response:
    return web.json_response(dict(body), status=status, headers={hdrs.CACHE_CONTROL: "no-store"})


ENDPOINTS = {"/XMLAPI": "xml", "/oauth/token": "token"}


class AcousticServer(LoopbackHttp):
    """The fake on ``127.0.0.1`` in a background thread. ``root`` stands for the SFTP account's home: the server
    reads ``root/upload`` and writes ``root/download`` (both created here)."""

    label = "the fake Acoustic API"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        for folder in ("upload", "download"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.api = AcousticApi(self.root)
        self.tokens = TokenIssuer(lambda: self.api.clock())
        self.request_count = 0  # every request received, refused ones included
        self.requests: list[str] = []  # "METHOD /path" of each, in order
        self.response_delay = 0.0  # seconds each API request is held open (to test the concurrency limit)
        self.max_concurrent = MAX_CONCURRENT_REQUESTS
        self._failures: dict[str, deque[int]] = {"xml": deque(), "token": deque()}
        self._in_flight = 0

    # ---------------------------------------------------------------------------------- addresses and state

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def xml_url(self) -> str:
        return self.base_url + "/XMLAPI"

    @property
    def token_url(self) -> str:
        return self.base_url + "/oauth/token"

    @property
    def client_id(self) -> str:
        return self.tokens.client_id

    @property
    def client_secret(self) -> str:
        return self.tokens.client_secret

    @property
    def refresh_token(self) -> str:
        return self.tokens.refresh_token

    @property
    def token_lifetime(self) -> int:
        return self.tokens.lifetime

    @token_lifetime.setter
    def token_lifetime(self, seconds: int) -> None:
        self.tokens.lifetime = seconds

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.api.clock

    @clock.setter
    def clock(self, clock: Callable[[], datetime]) -> None:
        self.api.clock = clock

    @property
    def job_polls(self) -> int:
        return self.api.job_polls

    @job_polls.setter
    def job_polls(self, polls: int) -> None:
        self.api.job_polls = polls

    @property
    def lists(self) -> dict[str, ContactList]:
        return self.api.lists

    @property
    def jobs(self) -> dict[int, Job]:
        return self.api.jobs

    @property
    def upload(self) -> Path:
        return self.api.upload

    @property
    def download(self) -> Path:
        return self.api.download

    def add_list(self, list_id: int | str, name: str, columns: Sequence[Column | str] = ()) -> ContactList:
        defined = [column if isinstance(column, Column) else Column(column) for column in columns]
        unknown = [column.type for column in defined if column.type not in COLUMN_TYPES]
        if unknown:
            raise ValueError(f"column types not in the documented list: {unknown}")
        created = ContactList(str(list_id), name, defined, self.api.clock())
        with self.api.lock:
            self.api.lists[created.id] = created
        return created

    def add_contact(self, list_id: int | str, email: str, **fields: Any) -> Contact:
        """Puts an opted-in contact straight into the state; ``fields`` are custom column values (a DATE
        column takes a ``date``)."""
        with self.api.lock:
            target = self.api.lists[str(list_id)]
            unknown = [name for name in fields if target.column(name) is None]
            if unknown:
                raise ValueError(f"not columns of list {list_id}: {unknown}")
            contact = self.api.new_contact(email, fields, self.api.clock(), "Added by WebForms")
            target.contacts[email.lower()] = contact
            return contact

    def opt_out(
        self, list_id: int | str, email: str, at: datetime | None = None, details: str = "Opt out via email opt out."
    ) -> Contact:
        """Someone opting out at Acoustic ([SAMPLE17]'s Opt Out Details), adding them first if absent."""
        with self.api.lock:
            contact = self.contact(list_id, email) or self.add_contact(list_id, email)
            opt_out_contact(contact, at or self.api.clock(), details)
            return contact

    def contact(self, list_id: int | str, email: str) -> Contact | None:
        with self.api.lock:
            return self.api.lists[str(list_id)].contacts.get(email.lower())

    def access_token(self) -> str:
        """A valid bearer token without HTTP (what a grant would answer now)."""
        with self.api.lock:
            return self.tokens.issue()[0]

    def run_jobs(self) -> None:
        """Runs every waiting or running job now, as if enough time had passed."""
        with self.api.lock:
            for job in self.api.jobs.values():
                if job.status in ("WAITING", "RUNNING"):
                    self.api.run(job)

    def fail_next(self, count: int, status: int = 429, endpoint: str = "xml") -> None:
        """Answers the next ``count`` requests to ``endpoint`` ("xml" or "token") with ``status`` and a text body."""
        self._failures[endpoint].extend([status] * count)

    # --------------------------------------------------------------------------------------------- lifecycle

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_post("/XMLAPI", self._handle_xml)
        app.router.add_post("/oauth/token", self._handle_token)
        return app

    # ------------------------------------------------------------------------------------------------- HTTP

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts the request; for the API: the concurrency limit ([OVERVIEW], counted over both endpoints), the
        response delay, then injected failures."""
        self.request_count += 1
        self.requests.append(f"{request.method} {request.path}")
        endpoint = ENDPOINTS.get(request.path)
        if endpoint is None:
            return await handler(request)
        if self._in_flight >= self.max_concurrent:
            return plain_response(429)
        self._in_flight += 1
        try:
            if self.response_delay:
                await asyncio.sleep(self.response_delay)
            if self._failures[endpoint]:
                return plain_response(self._failures[endpoint].popleft())
            return await handler(request)
        finally:
            self._in_flight -= 1

    async def _handle_token(self, request: web.Request) -> web.StreamResponse:
        form = {name: str(value) for name, value in (await request.post()).items()}
        with self.api.lock:
            status, body = self.tokens.grant(form)
        return json_response(status, body)

    async def _handle_xml(self, request: web.Request) -> web.StreamResponse:
        """[NODE], [WMF] Bearer auth; an absent, unknown or expired token is refused with 401 ([WMF] retries on
        it). Undocumented: that refusal's body; here [RFC6750]'s ``invalid_token`` as JSON with a
        WWW-Authenticate header. The XML comes as the form field ``xml`` ([NODE], [WMF]) or as the body ([KA])."""
        header = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, token = header.partition(" ")
        with self.api.lock:
            accepted = scheme.lower() == "bearer" and self.tokens.valid(token.strip())
        if not accepted:
            challenge = 'Bearer error="invalid_token"' if header else "Bearer"
            body = {"error": "invalid_token", "error_description": "Invalid or expired access token"}
            return web.json_response(body, status=401, headers={hdrs.WWW_AUTHENTICATE: challenge})
        text = await request_xml(request)
        with self.api.lock:
            answer = self.api.dispatch(text, request.remote or "127.0.0.1")
        # Undocumented: the answer's content type; text/xml here.
        return web.Response(text=answer, content_type="text/xml", charset="utf-8")


async def request_xml(request: web.Request) -> str:
    if request.content_type == "application/x-www-form-urlencoded":
        return str((await request.post()).get("xml", ""))
    return await request.text()
