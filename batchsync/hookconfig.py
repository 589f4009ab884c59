"""A profile's ``[[callback]]`` sections: the provider's HTTP callbacks (webhooks) the daemon's listener takes::

    [[callback]]
    name = "mailchimp"                 # POST /hooks/<profile>/mailchimp
    format = "mailchimp"               # mailchimp | mailigen | mailup | form | json
    secret_env = "MAILCHIMP_HOOK_KEY"  # or secret_file; never the secret itself
    secret_in = "query"                # query (?key=...) | path (/hooks/p/c/<secret>) | basic | hmac-sha256 |
                                       # mailigen-signature (X-Mailigen-Signature: sha1=<HMAC-SHA1 of the body>)

``form`` and ``json`` take a field mapping as ``[[inbound]]`` does (``fields``: email, list_id, at, reason,
new_email; dotted paths into a JSON body), and either ``event`` (every call is that event) or ``codes`` (the
``reason`` field's value -> event). Each callback becomes an inbound kind of its own, ``callback_<name>``:
the journal of accepted calls is cut into files of that kind, reconciled as every other file is.
"""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from batchsync.dbconfig import FrozenModel as _Model

HookEvent = Literal["unsubscribe", "subscribe", "hard_bounce", "complaint", "clean", "email_change", "ignore"]
HOOK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
# The canonical file a journal is cut into: one row per event, UTC times (see journal.py).
CUT_COLUMNS = ("email", "list_id", "at", "event", "new_email", "note")
CUT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class HookFields(_Model):
    """The payload field names a ``form`` or ``json`` callback's rows are read from."""

    email: str
    list_id: str | None = None
    at: str | None = None
    reason: str | None = None
    new_email: str | None = None


class CallbackConfig(_Model):
    """One ``[[callback]]``: the provider payload format a URL takes, how its secret is checked, and its limits."""

    name: str
    format: Literal["mailchimp", "mailigen", "mailup", "form", "json"]
    secret_env: str | None = None
    secret_file: str | None = None
    secret_in: Literal["query", "path", "basic", "hmac-sha256", "mailigen-signature"] = "query"
    key_param: str = "key"  # secret_in = "query": the parameter's name
    signature_header: str = "X-Signature"  # secret_in = "hmac-sha256": hex HMAC-SHA256 of the raw body
    basic_user: str = "batchsync"  # secret_in = "basic": the user name; the secret is the password
    list_code: str | None = None  # every call concerns this CRM list (when the payload names none)
    fields: HookFields | None = None  # form and json
    event: HookEvent | None = None  # form and json: every call is this event...
    codes: dict[str, HookEvent] = Field(default_factory=dict)  # ...or the reason field's value says which
    timestamp_format: str = "%Y-%m-%d %H:%M:%S"  # form and json; "epoch" for Unix seconds
    timezone: str = "UTC"
    max_body_bytes: int = Field(65536, ge=256, le=16 * 1024 * 1024)
    max_per_second: float = Field(50.0, gt=0)  # per source address; a burst of twice this is let through
    origin: Literal["provider", "admin"] = "provider"  # a provider's callback is the provider's report

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not HOOK_NAME.fullmatch(value):
            raise ValueError("a callback name is 1-40 of a-z, 0-9, _ and -, starting with a letter or digit")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as 'Europe/Rome')") from None
        return value

    @model_validator(mode="after")
    def _complete(self) -> CallbackConfig:
        if not (self.secret_env or self.secret_file):
            raise ValueError("a callback needs its secret by reference: secret_env or secret_file")
        if self.format in ("form", "json"):
            if self.fields is None:
                raise ValueError(f"a {self.format} callback needs 'fields' (email, list_id, at, reason, new_email)")
            if self.event is None and not (self.codes and self.fields.reason):
                raise ValueError("say which event a call is: 'event', or a 'reason' field with 'codes'")
        elif self.fields is not None or self.codes or self.event is not None:
            raise ValueError(f"the {self.format} format reads the provider's own fields: no fields, event or codes")
        return self

    @property
    def kind(self) -> str:
        return f"callback_{self.name}"

    def inbound(self) -> dict[str, object]:
        """The ``[[inbound]]`` entry of the files its journal is cut into (their columns are CUT_COLUMNS)."""
        every: tuple[HookEvent, ...] = ("unsubscribe", "subscribe", "hard_bounce", "complaint", "clean", "email_change")
        return {
            "kind": self.kind,
            "pattern": f"{self.kind}.*.csv",  # names hold no dot: one callback's files are never another's
            "origin": "callback" if self.origin == "provider" else "admin",  # audited as a callback
            "encoding": "utf-8",
            "delimiter": ",",
            "min_age_seconds": 0.0,
            "settle_seconds": 0.0,
            "timestamp_format": CUT_TIME_FORMAT,
            "timezone": "UTC",
            "columns": {
                "email": "email",
                "list_id": "list_id",
                "at": "at",
                "reason": "event",
                "new_email": "new_email",
                "note": "note",
            },
            "codes": {event: {"event": event, "reason": f"{self.name} callback: {event}"} for event in every},
            "unknown_codes": "reject",
            "optional_columns": ["list_id", "note"],
            "list_code": self.list_code,
        }
