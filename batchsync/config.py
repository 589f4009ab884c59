"""Profiles: one TOML file per provider account, read into frozen, typed objects.

Every validation message is written here, and names the file, the key and what was expected::

    profile = load_profile(Path("profiles/mailup.toml"))
    profile.export.delimiter      # ";"
    profile.list_by_provider_id("1").code

Relative paths in a profile are read from the profile file's own folder. Secrets are never inline: a password
is named by ``password_env`` (an environment variable) or ``password_file``.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from batchsync.dbconfig import DatabaseConfig
from batchsync.dbconfig import FrozenModel as _Model
from batchsync.errors import ConfigError
from batchsync.hookconfig import CallbackConfig
from batchsync.rules import OPT_OUT_KINDS, EventKind, Status

ExportField = str  # email | first_name | last_name | list_id | groups | status | custom.<name>
PLAIN_FIELDS = ("email", "first_name", "last_name", "list_id", "groups", "status")
SECRET_KEYS = ("password", "passphrase", "secret", "token")


def known_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'Europe/Rome')") from None
    return value


class WorkConfig(_Model):
    """``[work]``: the local work folder, the inbox admins drop files into, and the limits on what is kept."""

    dir: str = "var"
    inbox_dir: str | None = None  # where admins drop files; default: inbox/ in the work folder
    retention_days: int = Field(30, ge=1)
    max_file_bytes: int = Field(2_000_000_000, ge=1)


FILE_KINDS = ("local", "ftp", "ftps", "sftp", "acoustic")  # acoustic: its files go over SFTP, its jobs over the API
API_KINDS = ("mailchimp", "acoustic", "flexmail")


def _https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"))


class TransportConfig(_Model):
    """``[transport]``: the server a profile exchanges files with, its credentials by reference, and its timeouts and
    retries."""

    kind: Literal["local", "ftp", "ftps", "sftp", "mailchimp", "acoustic", "flexmail"]
    path: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    user: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    known_hosts: str | None = None
    key_file: str | None = None
    key_passphrase_env: str | None = None
    key_passphrase_file: str | None = None
    ca_file: str | None = None
    timeout_seconds: float = Field(30.0, gt=0)
    keepalive_seconds: int = Field(30, ge=0)
    retries: int = Field(3, ge=0)
    # A provider's API (kinds mailchimp, acoustic, flexmail): its base URL where it cannot be worked out (a
    # Mailchimp key names its data centre), and its credentials by reference.
    url: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    client_id: str | None = None  # Acoustic's OAuth application: its id is no secret, its secret is
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    refresh_token_env: str | None = None
    refresh_token_file: str | None = None
    batch_size: int = Field(500, ge=1, le=5000)  # rows an API request (a Mailchimp batch) carries
    poll_seconds: float = Field(5.0, gt=0)  # the first wait before asking whether a batch or job is done
    job_timeout_seconds: float = Field(3600.0, gt=0)  # a batch or job not done by then fails the export
    max_connections: int = Field(4, ge=1, le=10)  # Mailchimp allows 10 at once per key
    max_per_minute: int | None = Field(None, ge=1)  # requests a minute the transport paces itself to (Flexmail: 60)
    monthly_calls: int | None = Field(None, ge=1)  # the account's API calls a month: sending stops there
    language: str | None = None  # Flexmail: the language a new contact is created with (one of the account's)
    source_id: int | None = None  # Flexmail: the source a new contact is created from (required by Flexmail)

    @model_validator(mode="after")
    def _kind_needs(self) -> TransportConfig:
        if self.kind == "local" and not self.path:
            raise ValueError("a 'local' transport needs 'path', the folder that stands in for the server")
        if self.kind in FILE_KINDS and self.kind != "local" and not self.host:
            raise ValueError(f"an '{self.kind}' transport needs 'host'")
        if self.kind == "flexmail" and not (self.user and self.language and self.source_id):
            raise ValueError("a 'flexmail' transport needs 'user' (the account id), 'language' and 'source_id'")
        if self.kind == "acoustic" and not self.client_id:
            raise ValueError("an 'acoustic' transport needs 'client_id' (its OAuth application's id)")
        if self.kind in ("acoustic", "flexmail") and not self.url:
            raise ValueError(f"an '{self.kind}' transport needs 'url', the base URL of the provider's API")
        if self.url and not _https_or_loopback(self.url):
            raise ValueError(f"url {self.url!r}: an API is reached over https (plain http only on loopback)")
        for name in ("api_key", "client_secret", "refresh_token"):
            if getattr(self, f"{name}_env") and getattr(self, f"{name}_file"):
                raise ValueError(f"give at most one of '{name}_env' or '{name}_file'")
        if self.kind in ("sftp", "acoustic") and not self.known_hosts:
            raise ValueError(f"an '{self.kind}' transport needs 'known_hosts': host keys are always checked")
        if self.password_env and self.password_file:
            raise ValueError("give at most one of 'password_env' or 'password_file'")
        if self.key_passphrase_env and self.key_passphrase_file:
            raise ValueError("give at most one of 'key_passphrase_env' or 'key_passphrase_file'")
        return self

    @property
    def port_or_default(self) -> int:
        return self.port or (22 if self.kind in ("sftp", "acoustic") else 21)


class ExportColumn(_Model):
    """One column of the field mapping: a CRM field and the provider's column, with its direction."""

    header: str
    field: ExportField
    direction: Literal["out", "in", "both"] = "out"  # out: written on export; in: read from "update" events
    default: str = ""  # written when the CRM has no value
    transform: Literal["upper", "lower", "title"] | None = None
    date_format: str | None = None  # the CRM holds ISO dates (2026-01-05); the provider wants this format
    values: dict[str, str] = Field(default_factory=dict)  # CRM value -> provider value

    @field_validator("field")
    @classmethod
    def _known_field(cls, value: str) -> str:
        if value in PLAIN_FIELDS or (value.startswith("custom.") and len(value) > 7):
            return value
        raise ValueError(f"unknown field {value!r}; expected one of {', '.join(PLAIN_FIELDS)} or custom.<name>")


class Dialect(_Model):
    """How a CSV file is written or read: encoding, delimiter and quote character."""

    encoding: Literal["utf-8", "utf-8-sig", "cp1252", "latin-1", "utf-16", "utf-16-le", "utf-16-be"] = "utf-8"
    delimiter: Literal[";", ",", "|", "\t"] = ";"
    quote: Literal['"', "'"] = '"'  # the character that quotes a field holding the delimiter or a newline


class ExportConfig(Dialect):
    """``[export]``: the export files' columns, dialect, names, folders, mode and packaging."""

    remote_dir: str = "import/{list_id}"
    file_name: str = "{profile}_{list}_{stamp}_{mode}.csv"
    group_separator: str = ","
    full_weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] = "sunday"
    timezone: str = "UTC"
    chunk_rows: int = Field(50_000, ge=1000)  # contacts an export builds at a time (a bucket of its scan)
    zip: bool = False  # upload NAME.zip holding NAME
    opt_out_file: bool = False  # opt-outs in a file of their own, NAME with "_optout" before the extension
    map_file: Literal["acoustic"] | None = None  # write the provider's XML map file beside each data file
    columns: tuple[ExportColumn, ...] = Field(strict=False)  # TOML arrays arrive as lists
    status_values: dict[Status, str] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_zone(value)

    @field_validator("file_name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if "/" in value or "\\" in value:
            raise ValueError("a file name template cannot hold a folder; put folders in 'remote_dir'")
        return value

    @model_validator(mode="after")
    def _columns(self) -> ExportConfig:
        fields = [c.field for c in self.columns if c.direction != "in"]
        if "email" not in fields:
            raise ValueError("the export columns need one with field = 'email'")
        if self.has_status and ("subscribed" not in self.status_values or "unsubscribed" not in self.status_values):
            raise ValueError("status_values needs at least 'subscribed' and 'unsubscribed'")
        return self

    @property
    def has_status(self) -> bool:
        """Without a status column only subscribed rows are sent, and leaving a list is sent as absence."""
        return any(column.field == "status" and column.direction != "in" for column in self.columns)


class SegmentConfig(_Model):
    """A list defined by a filter on the contacts rather than by stored membership."""

    field: str  # a contact field: first_name, last_name, or custom.<name>
    equals: str | None = None  # None: the field has any non-empty value


class ListConfig(_Model):
    """One CRM list (``[lists.<code>]``): the provider's id for it, its groups, and a segment that may define it."""

    id: str
    name: str | None = None
    groups: dict[str, str] = Field(default_factory=dict)
    segment: SegmentConfig | None = None


class EventCode(_Model):
    """What one reason code of an inbound file means: the event it is and the reason recorded."""

    event: EventKind
    reason: str


class InboundColumns(_Model):
    """The names of an inbound file's columns that batchsync reads; other columns are allowed and ignored."""

    email: str
    list_id: str | None = None
    at: str | None = None
    reason: str | None = None
    new_email: str | None = None  # email changes: the new address (``email`` holds the old one)
    note: str | None = None  # free text kept with the event's reason (Mailchimp's UNSUB_REASON)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"12h"`` or ``"1d"`` as a timedelta (at most 10,000 days)."""
    number, unit = value.strip()[:-1], value.strip()[-1:]
    try:
        amount = float(number) * DURATION_UNITS.get(unit, 0)
    except ValueError:
        amount = -1.0
    if unit not in DURATION_UNITS or not 0 <= amount <= 10_000 * 86400:
        raise ValueError(f"expected a duration such as '1d', '12h', '30m' or '90s', got {value!r}")
    return timedelta(seconds=amount)


class InboundConfig(Dialect):
    """One kind of inbound file (``[[inbound]]``): which names it takes, where from, its dialect and columns, and the
    event each row is."""

    kind: str
    pattern: str | Annotated[tuple[str, ...], Field(strict=False)]  # one file-name pattern, or several
    # Who the file's events come from: "provider" (its reports: not echoed back, remembered for good) or "admin"
    # (a CRM-side change: sent in the next export). None: by where the file came from (the remote inbox is the
    # provider's; the local inbox and import --file are an admin's).
    # "callback": the journal of a provider's callbacks (a [[callback]] section makes the kind).
    origin: Literal["provider", "admin", "callback"] | None = None
    remote_dir: str | None = None
    after_import: Literal["move", "delete"] = "move"
    processed_dir: str = "processed"
    min_age_seconds: float = Field(60.0, ge=0)
    settle_seconds: float = Field(5.0, ge=0)
    marker: str | None = None
    # One strptime format, or several tried in order (Acoustic writes "10/18/16 08:01 PM" and "02/20/2024 09:01 AM").
    timestamp_format: str | Annotated[tuple[str, ...], Field(strict=False)] = "%Y-%m-%dT%H:%M:%S"
    timezone: str = "UTC"
    columns: InboundColumns
    event: EventKind | None = None
    codes: dict[str, EventCode] = Field(default_factory=dict)
    # A reason code the table does not know: "unsubscribe" (the default where every code is an opt-out: a file of
    # opt-outs fails safe, the row is an unsubscribe with a warning) or "reject" (the row goes to the errors file).
    unknown_codes: Literal["unsubscribe", "reject"] | None = None
    # Mapped columns a file may leave out (MailUp's unsubscribers export: all but the address are optional).
    optional_columns: tuple[Literal["list_id", "at", "reason", "note"], ...] = Field((), strict=False)
    future_tolerance: str = "1d"  # an event time later than now plus this is a rejected row
    list_code: str | None = None  # every row concerns this CRM list (a Mailchimp audience export)
    unzip: bool = False  # the file is a zip: its members are taken as files of the kinds they match

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_zone(value)

    @field_validator("future_tolerance")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("pattern")
    @classmethod
    def _patterns(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if not value or any(not pattern for pattern in (value if isinstance(value, tuple) else (value,))):
            raise ValueError("a pattern cannot be empty")
        return value

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in self.patterns)

    @property
    def timestamp_formats(self) -> tuple[str, ...]:
        formats = self.timestamp_format
        return formats if isinstance(formats, tuple) else (formats,)

    @property
    def tolerance(self) -> timedelta:
        return parse_duration(self.future_tolerance)

    @property
    def unknown_code_event(self) -> EventKind | None:
        """The event of a row whose reason code the table lacks, or None: the row is rejected. By default a file of
        opt-outs (every code an opt-out) fails safe; a file of other events (bounces counted, statuses) rejects."""
        if self.unknown_codes is not None:
            return "unsubscribe" if self.unknown_codes == "unsubscribe" else None
        every = bool(self.codes) and all(code.event in OPT_OUT_KINDS for code in self.codes.values())
        return "unsubscribe" if every else None

    @model_validator(mode="after")
    def _event_source(self) -> InboundConfig:
        if self.unzip:
            return self
        if self.event is None and not (self.codes and self.columns.reason):
            raise ValueError("say which event the rows are: 'event', or a 'reason' column with 'codes'")
        if self.event is None and "reason" in self.optional_columns:
            raise ValueError("a file may lack the reason column only when 'event' says what its rows are then")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class ScheduleConfig(_Model):
    """``[schedule]``: the daemon's nightly run, its inbox polls, and the retries of a failed night."""

    nightly: str | None = None  # "HH:MM" in ``timezone``; the export's full_weekday decides full or diff
    timezone: str = "UTC"
    poll_minutes: int = Field(0, ge=0)  # look at the remote inbox this often during the day; 0: never
    # A failed nightly run is tried again after each of these waits in turn (minutes), never past the next night.
    retry_minutes: tuple[float, ...] = Field((5, 20, 60), strict=False)

    @field_validator("retry_minutes")
    @classmethod
    def _waits(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) > 10 or any(wait <= 0 for wait in value):
            raise ValueError("retry_minutes: at most 10 waits, each above 0 minutes")
        return value

    @field_validator("nightly")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None:
            hours, _, minutes = value.partition(":")
            if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60):
                raise ValueError(f"nightly must be HH:MM, got {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return known_zone(value)


class NotifyConfig(_Model):
    """``[notify]``: who gets the run summaries and failure mails, and the SMTP server that sends them."""

    email_to: tuple[str, ...] = Field(strict=False)
    email_from: str
    smtp_host: str
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_password_env: str | None = None
    smtp_password_file: str | None = None
    starttls: Literal["auto", "required", "off"] = "auto"  # auto: when the server offers it
    ca_file: str | None = None
    timeout_seconds: float = Field(30.0, gt=0)


class PolicyConfig(_Model):
    """``[policy]``: how events weigh (all lists, bounces) and the safety stops on both ways."""

    unsubscribe_all_lists: bool = False
    hard_bounce_suppresses: bool = True
    soft_bounce_threshold: int = Field(3, ge=1)  # this many soft bounces clean the address
    max_unsubscribe_share: float = Field(0.2, gt=0, le=1)  # safety stop: a file above it is quarantined
    safety_min_unsubscribes: int = Field(100, ge=1)  # ... when it also opts out at least this many addresses
    # The same stop on the way out: an export that would take off more than this share of the addresses a list
    # has at the provider as subscribed (opt-outs and tombstones), and at least the minimum, is not uploaded.
    max_export_unsubscribe_share: float = Field(0.2, gt=0, le=1)
    safety_min_export_unsubscribes: int = Field(100, ge=1)
    # A subscribe event for an address no contact holds (a sign-up at the provider) creates the contact and its
    # subscription, the provider's opt-in time as its consent; off, such a row is reported as "no contact".
    create_contacts: bool = False


class Profile(_Model):
    """One provider account, read from a TOML file: the CRM, the server, the export, the lists, the inbound kinds, the
    schedule, notification and policy. Relative paths are read from the file's folder."""

    name: str
    provider: str = "mailup"
    database: DatabaseConfig
    work: WorkConfig = WorkConfig()
    transport: TransportConfig
    export: ExportConfig
    lists: dict[str, ListConfig]
    inbound: tuple[InboundConfig, ...] = Field((), strict=False)
    policy: PolicyConfig = PolicyConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    notify: NotifyConfig | None = None
    callback: tuple[CallbackConfig, ...] = Field((), strict=False)
    base_dir: str = "."

    @model_validator(mode="after")
    def _unique_ids(self) -> Profile:
        ids = [entry.id for entry in self.lists.values()]
        if len(set(ids)) != len(ids):
            raise ValueError("two lists share one provider id")
        kinds = [entry.kind for entry in self.inbound]
        if len(set(kinds)) != len(kinds):
            raise ValueError("two inbound entries share one kind (a callback's kind is callback_<name>)")
        if self.transport.kind in API_KINDS:
            api_export_problem(self)
        return self

    def path(self, value: str) -> Path:
        """A path from the profile, read relative to the profile's folder."""
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else Path(self.base_dir) / candidate

    @property
    def work_dir(self) -> Path:
        return self.path(self.work.dir)

    def database_url(self) -> str:
        if self.database.url_env:
            url = os.environ.get(self.database.url_env)
            if not url:
                raise ConfigError(f"profile {self.name}: environment variable {self.database.url_env} is not set")
            return url
        url = self.database.url or ""
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            relative = url[len("sqlite:///") :]
            if relative and relative != ":memory:":
                return "sqlite:///" + str(self.path(relative).resolve())
        return url

    def list_by_provider_id(self, provider_id: str) -> str | None:
        for code, entry in self.lists.items():
            if entry.id == provider_id:
                return code
        return None


def api_export_problem(profile: Profile) -> None:
    """What an API transport needs of the export: every row with its status (an API does nothing with an address
    that is absent, so leaving a list must be a row), no zip, and one list where the provider's reports or its
    unsubscribes cannot say which list they are about."""
    kind, export = profile.transport.kind, profile.export
    if not export.has_status:
        raise ValueError(f"a '{kind}' transport needs a status column in export.columns (and export.status_values)")
    if export.zip:
        raise ValueError(f"a '{kind}' transport takes the rows of the export file itself: export.zip must be false")
    if kind == "acoustic" and not (export.opt_out_file and export.map_file == "acoustic"):
        raise ValueError("an 'acoustic' transport needs export.opt_out_file = true and export.map_file = \"acoustic\"")
    if kind == "acoustic" and export.remote_dir.strip("/") != "upload":
        raise ValueError(
            "an 'acoustic' transport uploads to export.remote_dir = \"upload\": ImportList looks nowhere else"
        )
    unlisted = [entry.kind for entry in profile.inbound if entry.remote_dir and not entry.columns.list_id]
    if len(profile.lists) > 1 and (kind == "flexmail" or unlisted):
        why = (
            "Flexmail unsubscribes a contact from the account"
            if kind == "flexmail"
            else (f"inbound {', '.join(unlisted)} would give every list's reports to one list: map columns.list_id")
        )
        raise ValueError(f"a '{kind}' transport with several lists: {why}")


def load_profile(path: Path, overrides: Mapping[str, Any] | None = None) -> Profile:
    """Read and check one profile file; ``overrides`` maps dotted keys to values (the demo uses it)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    raw["base_dir"] = str(path.resolve().parent)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    _refuse_inline_secrets(path, raw, "")
    try:
        profile = Profile.model_validate(raw)
        if not profile.callback:
            return profile
        # Each callback's journal is cut into files of an inbound kind of its own: validated as every kind.
        # First, so that a broad pattern of the profile's own (``*.csv``) never takes a callback's files.
        raw["inbound"] = [entry.inbound() for entry in profile.callback] + list(raw.get("inbound", []))
        return Profile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` style keys; a number indexes a list (an array of tables)."""
    *parents, last = dotted.split(".")
    node: Any = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _refuse_inline_secrets(path: Path, node: Any, prefix: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS or key.endswith(tuple(f"_{word}" for word in SECRET_KEYS)):
                raise ConfigError(
                    f"{path}: {prefix}{key}: secrets are never written in a profile; "
                    f"name an environment variable with {key}_env or a file with {key}_file"
                )
            _refuse_inline_secrets(path, value, f"{prefix}{key}.")


def _describe(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: the profile is not valid:"]
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {loc}: unknown key{_suggestion(error['loc'])}")
        elif kind == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            where = f"  {loc}: " if loc else "  "
            shown = error.get("input")
            got = f" (got {shown!r})" if not isinstance(shown, dict | list) and loc else ""
            lines.append(f"{where}{message}{got}")
    return "\n".join(lines)


def _suggestion(loc: tuple[int | str, ...]) -> str:
    model: type[BaseModel] | None = Profile
    for part in loc[:-1]:
        # A step that is not a field is a list index or a dict key: the model stays the same.
        if model is not None and isinstance(part, str) and part in model.model_fields:
            model = _model_of_annotation(model.model_fields[part].annotation)
    if model is None:
        return ""
    keys = [field.alias or name for name, field in model.model_fields.items()]  # as written in a profile
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_of_annotation(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of_annotation(arg)
        if found is not None:
            return found
    return None


def builtin_profile_path(name: str) -> Path:
    """A profile shipped with batchsync: inside the installed package, or in the source tree's profiles/."""
    here = Path(__file__).resolve().parent
    for folder in (here / "_profiles", here.parent / "profiles"):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no built-in profile named {name!r}")
