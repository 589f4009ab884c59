"""Acoustic Campaign (Silverpop): files over SFTP, jobs through the XML API with OAuth.

    transport = AcousticTransport(profile, clock, sftp, OAuthCredentials(client_id, secret, refresh_token))
    transport.submit([data_csv, data_map, optout_csv, optout_map], "newsletter")
    transport.list("reports")        # the opt-outs (and undeliverables) since the last collect, as CSVs

Out: each data file and its map file (``LIST_IMPORT``: ADD_AND_UPDATE for the data, OPT_OUT for the opt-outs)
go up to the SFTP account's ``upload`` folder, confirmed whole, and then ``ImportList`` (MAP_FILE, SOURCE_FILE)
starts the import: Acoustic imports nothing until it is called. ``GetJobStatus`` is polled until the job is
COMPLETE (then the files are removed from ``upload``) or ERROR (then nothing is taken as accepted, and the files
stay for a person to read); the job's error file (``ERROR_FILE_NAME`` in
``download``: ``LINE_NUMBER``, ``ERROR``, then the row's own columns) names the rows Acoustic refused and why.

In: ``ExportList`` of each list, EXPORT_TYPE OPT_OUT (and UNDELIVERABLE where a kind takes it), from the last
collect (less a day: the XML API's dates are in the organisation's time zone, which it does not say) to now; the
job is polled, and the CSV at its ``FILE_PATH`` is fetched from ``download``, removed there, and handed to
collect as ``<list id>_OPT_OUT_<stamp>.csv``. Acoustic writes its own columns (``Email``, ``Opt In Date``,
``Opted Out``, ``Opt In Details``, ``Email Type``, ``Opted Out Date``, ``Opt Out Details``) and its times as
``02/20/2024 09:01 AM``, or ``10/18/16 08:01 PM`` in older exports: the profile reads both.

OAuth: an access token from the refresh token (``POST /oauth/token``), kept until a minute before it expires
and asked for again after a 401. Acoustic allows 10 concurrent requests per organisation; this transport makes
one at a time.

Sources: https://developer.goacoustic.com/acoustic-campaign/reference/importlist , .../get-status-data-job ,
.../exportlist (as quoted by Silverpop's own clients, github.com/Silverpop/node-engage and engage-api-client),
.../getting-started-with-oauth , .../xml-api-overview ("API Limits"), and the responses and export files
Wikimedia recorded from the real API (github.com/eileenmcnaughton/org.wikimedia.omnimail, tests/phpunit/Responses).
"""

from __future__ import annotations

import csv
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from xml.etree import ElementTree
from xml.etree.ElementTree import Element

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import ConfigError, TransportError
from batchsync.transport.api import ApiTransport, Finding, Rejected, Submission, export_rows
from batchsync.transport.base import Transport, check_remote_name, upload_confirmed
from batchsync.transport.http import ApiClient, ApiRefusal, CredentialsRefused
from batchsync.transport.retry import RetryPolicy

log = logging.getLogger(__name__)
DOWNLOAD = "download"
REPORTS = (("OPT_OUT", "OPT_OUT"), ("UNDELIVERABLE", "UNDELIVERABLE"))  # file word, EXPORT_TYPE
# Undeliverables have no opt-out date: their export asks for the address and when it was last modified.
COLUMNS = {"UNDELIVERABLE": ["Email", "Last Modified Date"]}
WINDOW_SLACK = timedelta(days=1)  # the API's dates are in the organisation's zone: a window starts a day early
API_DATE = "%m/%d/%Y %H:%M:%S"  # ExportList DATE_START / DATE_END


@dataclass(frozen=True)
class OAuthCredentials:
    client_id: str
    client_secret: str
    refresh_token: str


class AcousticTransport(ApiTransport):
    report_folders = ("reports",)

    def __init__(self, profile: Profile, clock: Clock, files: Transport, credentials: OAuthCredentials) -> None:
        super().__init__(profile, clock)
        if not (credentials.client_id and credentials.client_secret and credentials.refresh_token):
            raise ConfigError(
                f"profile {profile.name}: the Acoustic transport needs client_id, client_secret (client_secret_env "
                "or _file) and refresh_token (refresh_token_env or _file)"
            )
        if profile.export.map_file != "acoustic":
            raise ConfigError(f"profile {profile.name}: an 'acoustic' transport needs export.map_file = \"acoustic\"")
        config = profile.transport
        self.files, self.credentials = files, credentials
        self.retry = RetryPolicy.of(config, clock)
        self.api = ApiClient.of(config, clock, "", "Acoustic")
        self._token, self._expires = "", datetime.min.replace(tzinfo=UTC)

    def connect(self) -> None:
        self.files.connect()
        self._bearer()

    def close(self) -> None:
        self.files.close()
        self.api.close()

    # --- the XML API -----------------------------------------------------------------------------------------

    def _bearer(self, *, again: bool = False) -> str:
        if again or not self._token or self.clock.now() >= self._expires:
            form = {"grant_type": "refresh_token", "client_id": self.credentials.client_id}
            form |= {"client_secret": self.credentials.client_secret, "refresh_token": self.credentials.refresh_token}
            answer = self.api.call("POST", "/oauth/token", data=form).body
            self._token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in") or 3600)
            self._expires = self.clock.now() + timedelta(seconds=max(lifetime - 60, 0))
        return self._token

    def xml(self, operation: str, **fields: str | list[str]) -> Element:
        """One operation; its ``RESULT``. A fault raises ApiRefusal with its FaultString."""
        request = Element(operation)
        for name, value in fields.items():
            child = ElementTree.SubElement(request, name)
            if isinstance(value, list):  # EXPORT_COLUMNS: <COLUMN> each
                for item in value:
                    ElementTree.SubElement(child, "COLUMN").text = item
            else:
                child.text = value
        envelope = Element("Envelope")
        ElementTree.SubElement(envelope, "Body").append(request)
        body = ElementTree.tostring(envelope, encoding="utf-8")
        try:
            answer = self._post(body)
        except CredentialsRefused:
            self._bearer(again=True)  # the token was refused before its time: a new one, once
            answer = self._post(body)
        return _result(answer, operation)

    def _post(self, body: bytes) -> bytes:
        headers = {"Authorization": f"Bearer {self._bearer()}", "Content-Type": "text/xml; charset=utf-8"}
        answer = self.api.call("POST", "/XMLAPI", content=body, headers=headers).body
        return answer if isinstance(answer, bytes) else str(answer).encode()

    def _wait(self, job_id: str) -> tuple[str, dict[str, str], str]:
        """Poll a job to its end: its status (COMPLETE, ERROR, CANCELLED), parameters and description."""
        config = self.profile.transport
        deadline, delay = self.clock.monotonic() + config.job_timeout_seconds, config.poll_seconds
        while True:
            status = self.xml("GetJobStatus", JOB_ID=job_id)
            state = status.findtext("JOB_STATUS", "")
            if state not in ("WAITING", "RUNNING"):
                parameters = {
                    item.findtext("NAME", ""): item.findtext("VALUE", "")
                    for item in status.iterfind("PARAMETERS/PARAMETER")
                }
                return state, parameters, status.findtext("JOB_DESCRIPTION", "")
            if self.clock.monotonic() >= deadline:
                raise TransportError(f"Acoustic job {job_id} still {state} after {config.job_timeout_seconds:.0f} s")
            self.clock.sleep(delay)
            delay = min(delay * 2, 60.0)

    # --- check -------------------------------------------------------------------------------------------------

    def check(self) -> Iterator[Finding]:
        where = f"Acoustic API {self.api.base_url}"
        try:
            self.files.connect()
            self._bearer()
        except TransportError as exc:
            yield Finding(where, False, f"{exc}: check the SFTP login, client_id, client secret and refresh token")
            return
        yield Finding(where, True, "SFTP login and OAuth token accepted")
        mapped = [c.header for c in self.profile.export.columns if c.field != "email"]
        for code, config in self.profile.lists.items():
            try:
                meta = self.xml("GetListMetaData", LIST_ID=config.id)
            except ApiRefusal as exc:
                yield Finding(f"list {config.id} (lists.{code})", False, f"{exc.reason}: check lists.{code}.id")
                continue
            yield Finding(f"list {config.id} (lists.{code})", True, f"exists: {meta.findtext('NAME', '')}")
            columns = {(name.text or "").lower() for name in meta.iterfind("COLUMNS/COLUMN/NAME")}
            missing = [header for header in mapped if header.lower() not in columns]
            detail = (
                f"missing: {', '.join(missing)}: add them to the list, or drop the columns" if missing else "all there"
            )
            yield Finding(f"columns of list {config.id}", not missing, detail)

    # --- out ---------------------------------------------------------------------------------------------------

    def submit(self, files: list[Path], list_code: str) -> Submission:
        folder = "upload"  # the only folder ImportList reads (the profile is held to it)
        submission = Submission()
        pairs = list(zip(files[0::2], files[1::2], strict=True))
        if any(mapping.suffix != ".xml" or data.suffix != ".csv" for data, mapping in pairs) or len(
            {path.name for path in files}
        ) != len(files):
            raise TransportError(f"Acoustic: the files to import are not (data, map) pairs of their own: {files}")
        for data, mapping in pairs:
            for local in (data, mapping):  # the map last: the data is whole on the server when the job starts
                remote = posixpath.join(folder, local.name)
                self.retry.call(partial(upload_confirmed, self.files, local, remote), what=f"upload of {remote}")
            job = self.xml("ImportList", MAP_FILE=mapping.name, SOURCE_FILE=data.name).findtext("JOB_ID", "")
            state, parameters, description = self._wait(job)
            if state != "COMPLETE":
                raise TransportError(f"Acoustic import job {job} of {data.name} ended {state}: {description}")
            sent = _addresses(self.profile, data)
            refused = self._refused(data, sent, parameters)
            submission.rejected += refused
            submission.accepted += len(sent) - len(refused)
            for local in (data, mapping):  # imported: the contacts' data need not wait on the server (a failed
                self._remove(posixpath.join(folder, local.name))  # job's files stay there for a person to read)
        return submission

    def _refused(self, data: Path, sent: dict[int, str], parameters: dict[str, str]) -> list[Rejected]:
        """The rows of the job's error file (LINE_NUMBER, ERROR, the row's columns), each matched to the row sent
        by its line; the file must list as many as the job counted bad (BAD_RECORDS, BAD_ADDRESSES), or nothing
        is taken as accepted. The job's files are removed from the download folder once read."""
        counted = sum(int(parameters.get(name) or 0) for name in ("BAD_RECORDS", "BAD_ADDRESSES"))
        error_file, results_file = parameters.get("ERROR_FILE_NAME", ""), parameters.get("RESULTS_FILE_NAME", "")
        rows: list[dict[str, str]] = []
        if error_file:
            local = self.inbox.root / ".acoustic-errors.csv"
            local.parent.mkdir(parents=True, exist_ok=True)
            self.files.download(posixpath.join(DOWNLOAD, check_remote_name(posixpath.basename(error_file))), local)
            with local.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
            local.unlink()
        if len(rows) != counted:
            raise TransportError(
                f"Acoustic: the import of {data.name} counted {counted} bad rows, its error file lists {len(rows)}"
            )
        for name in (error_file, results_file):
            if name:
                self._remove(posixpath.join(DOWNLOAD, check_remote_name(posixpath.basename(name))))
        refused = []
        for row in rows:
            line = int(row.get("LINE_NUMBER") or 0)
            if line not in sent:
                raise TransportError(f"Acoustic: the error file of {data.name} names line {line}, not a row sent")
            refused.append(Rejected(line, sent[line], row.get("ERROR") or "refused, no reason given"))
        return refused

    # --- in ----------------------------------------------------------------------------------------------------

    def fetch_reports(self, folder: str) -> None:
        for word, export_type in REPORTS:
            if not any(k.remote_dir == folder and k.matches(f"x_{word}_x.csv") for k in self.profile.inbound):
                continue
            for config in self.profile.lists.values():
                self._export(folder, config.id, word, export_type)

    def _export(self, folder: str, list_id: str, word: str, export_type: str) -> None:
        stream = f"{list_id}.{word}"
        since, upto = self.inbox.cursor(folder, stream), self.clock.now()
        window: dict[str, str | list[str]] = {}
        if since is not None:
            window = {"DATE_START": f"{since - WINDOW_SLACK:{API_DATE}}", "DATE_END": f"{upto:{API_DATE}}"}
        if export_type in COLUMNS:
            window["EXPORT_COLUMNS"] = COLUMNS[export_type]
        asked = self.xml("ExportList", LIST_ID=list_id, EXPORT_TYPE=export_type, EXPORT_FORMAT="CSV", **window)
        state, _, description = self._wait(asked.findtext("JOB_ID", ""))
        if state != "COMPLETE":
            raise TransportError(f"Acoustic export of list {list_id} ({export_type}) ended {state}: {description}")
        remote = posixpath.join(DOWNLOAD, check_remote_name(posixpath.basename(asked.findtext("FILE_PATH", ""))))
        name = f"{list_id}_{word}_{upto:%Y%m%dT%H%M%SZ}.csv"

        def fetch(part: Path) -> None:
            self.files.download(remote, part)

        self.inbox.add(folder, name, stream, upto, fetch)
        self._remove(remote)

    def _remove(self, remote: str) -> None:
        try:
            self.files.delete(remote)
        except TransportError as exc:  # tidying the server is no reason to fail an export or a collect
            log.warning("could not remove %s from Acoustic's SFTP folder: %s", remote, exc)


def _result(answer: bytes, operation: str) -> Element:
    try:
        root = ElementTree.fromstring(answer)
    except ElementTree.ParseError as exc:
        raise TransportError(f"Acoustic {operation}: an answer that is not XML ({exc})") from None
    result = root.find("Body/RESULT")
    if result is not None and result.findtext("SUCCESS", "").upper() == "TRUE":
        return result
    fault = root.findtext("Body/Fault/FaultString") or "no reason given"
    raise ApiRefusal(200, fault.strip(), f"Acoustic {operation}")


def _addresses(profile: Profile, data: Path) -> dict[int, str]:
    """The address of each row of a data file by its line, as Acoustic counts them (the CSV's records)."""
    return {row.line: row.email for row in export_rows(profile, data)}
