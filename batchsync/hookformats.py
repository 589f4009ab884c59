"""The providers' callback payloads, read into rows of events (the columns of hookconfig.CUT_COLUMNS)::

    rows = read_call(config, Call("POST", body, query), now)

A payload that cannot be read raises BadCall with the reason (the listener answers 400). A call about nothing
batchsync keeps (a Mailchimp ``profile`` or ``campaign`` event) reads as no rows and is still answered 2xx, so
the provider does not retry it.

Sources (each checked before writing the reader):
- Mailchimp: form-encoded POSTs, ``type`` and ``fired_at`` ("2009-03-26 21:35:57"; its zone is not documented:
  taken as UTC) and ``data[...]`` fields; unsubscribe ``data[reason]`` "manual" or "abuse" (a complaint),
  cleaned "hard" or "abuse"; upemail ``data[old_email]``/``data[new_email]``. Validation is a GET, answered 200.
  https://mailchimp.com/developer/marketing/guides/sync-audience-data-webhooks/ and
  https://developer.mailchimp.com/documentation/mailchimp/guides/about-webhooks/ (no signature: a key in the URL).
- Mailigen: JSON POSTs ``{"hook": "contact.unsubscribe", "timestamp": ..., "data": [{"email", "list",
  "unsubscribe_ts", ...}]}`` (the page's prose also names an ``events`` array of ``{type, data}``: both are read);
  times in Unix seconds; the URL is checked with a HEAD. http://dev.mailigen.com/webhooks. Its address-change
  hook's fields are not on the public page: take those through the ``json`` format with a mapping.
- MailUp: its webhooks send the parameters the account names, by GET or POST; this reader takes the names of
  MailUp's own example, ``customerEmail``, ``customerList`` and ``unsubscribeDate``
  ("2012-12-10T17:41:03.695+01": an ISO time with an hours-only offset), and optionally ``eventType`` set to
  [EventType] (UNSUBSCRIBE, SUBSCRIBE, CHANGEPROFILE, DELETE; unsubscribe when absent).
  https://help.mailup.com/display/MUG/Webhook+examples and .../Add+or+Edit+a+Webhook. There is no email-change
  webhook at MailUp (it is an unsubscribe of the old address and a subscribe of the new one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

from batchsync.hookconfig import CUT_COLUMNS, CUT_TIME_FORMAT, CallbackConfig, HookEvent

OPT_OUTS = ("unsubscribe", "hard_bounce", "complaint", "clean")


class BadCall(Exception):
    """A callback whose body cannot be read as its format says (answered 400 with the reason)."""


@dataclass(frozen=True)
class Call:
    """A callback's request as the reader needs it: method, raw body and query parameters."""

    method: str
    body: bytes
    query: Mapping[str, str]


@dataclass(frozen=True)
class HookRow:
    """One event read from a callback, as a row of the journal (the columns of CUT_COLUMNS)."""

    email: str
    list_id: str
    at: datetime
    event: HookEvent
    new_email: str = ""
    note: str = ""

    def cells(self) -> dict[str, str]:
        at = self.at.astimezone(UTC).strftime(CUT_TIME_FORMAT)
        values = (self.email, self.list_id, at, self.event, self.new_email, self.note)
        return dict(zip(CUT_COLUMNS, values, strict=True))


def read_call(config: CallbackConfig, call: Call, now: datetime) -> list[HookRow]:
    readers = {"mailchimp": _mailchimp, "mailigen": _mailigen, "mailup": _mailup, "form": _mapped, "json": _mapped}
    rows = readers[config.format](config, call, now)
    for row in rows:
        if not row.email.strip():
            raise BadCall("no email address in the call")
        if row.event == "email_change" and not row.new_email.strip():
            raise BadCall("an address change without the new address")
    # A subscribe that names no list would clear the provider's opt-outs of every list (a row without a list
    # concerns them all): fail safe, such a call changes nothing.
    listless = not config.list_code
    return [
        row for row in rows if row.event != "ignore" and not (row.event == "subscribe" and listless and not row.list_id)
    ]


def _form(call: Call) -> dict[str, str]:
    try:
        text = call.body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadCall("the body is not UTF-8") from None
    fields = dict(call.query)
    fields.update(parse_qsl(text, keep_blank_values=True))
    return fields


def _json(call: Call) -> Any:
    try:
        return json.loads(call.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCall(f"the body is not JSON: {exc}") from None


def _mailchimp(config: CallbackConfig, call: Call, now: datetime) -> list[HookRow]:
    form = _form(call)
    if not call.body.strip() and "type" not in form:
        return []  # some say Mailchimp validates with an empty POST (its page says a GET): answered, nothing kept
    kind, reason = form.get("type", ""), form.get("data[reason]", "")
    at = _parse_time(form["fired_at"], "%Y-%m-%d %H:%M:%S", ZoneInfo("UTC")) if form.get("fired_at") else now
    list_id = form.get("data[list_id]", "")
    email = form.get("data[email]", "")
    note = f"mailchimp {kind}" + (f" ({form.get('data[action]', '')} {reason})".rstrip() if reason else "")
    if kind == "unsubscribe":
        return [HookRow(email, list_id, at, "complaint" if reason == "abuse" else "unsubscribe", note=note)]
    if kind == "cleaned":
        event: HookEvent = {"hard": "hard_bounce", "abuse": "complaint"}.get(reason, "clean")  # type: ignore[assignment]
        return [HookRow(email, list_id, at, event, note=note)]
    if kind == "upemail":
        old, new = form.get("data[old_email]", ""), form.get("data[new_email]", "")
        return [HookRow(old, list_id, at, "email_change", new_email=new, note=note)]
    if kind == "subscribe":
        return [HookRow(email, list_id, at, "subscribe", note=note)]
    if kind in ("profile", "campaign"):
        return []
    raise BadCall(f"unknown Mailchimp event type {kind!r}")


def _mailigen(config: CallbackConfig, call: Call, now: datetime) -> list[HookRow]:
    body = _json(call)
    if not isinstance(body, dict):
        raise BadCall("a Mailigen call is a JSON object")
    if "events" in body:  # the page's prose: {"timestamp", "events": [{"type", "data"}]}
        events = body["events"] if isinstance(body["events"], list) else [body["events"]]
        if not all(isinstance(event, dict) for event in events):
            raise BadCall("a Mailigen call's events are objects")
        pairs = [(event.get("type", ""), event.get("data")) for event in events]
    else:  # the page's examples: {"hook", "timestamp", "data": [...]}
        pairs = [(body.get("hook", ""), body.get("data"))]
    rows = []
    for hook, data in pairs:
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item, dict):
                raise BadCall("a Mailigen event's data is an object or a list of objects")
            rows += _mailigen_item(str(hook), item, body.get("timestamp"), now)
    return rows


def _mailigen_item(hook: str, item: dict[str, Any], sent: Any, now: datetime) -> list[HookRow]:
    events: dict[str, tuple[HookEvent, str]] = {
        "contact.unsubscribe": ("unsubscribe", "unsubscribe_ts"),
        "contact.subscribe": ("subscribe", "optin_ts"),
    }
    if hook not in events:
        return []  # contact.update and the others: nothing batchsync keeps
    event, stamp = events[hook]
    seconds = item.get(stamp) or sent
    at = _epoch(seconds) if seconds is not None else now
    return [HookRow(str(item.get("email", "")), str(item.get("list", "")), at, event, note=f"mailigen {hook}")]


def _mailup(config: CallbackConfig, call: Call, now: datetime) -> list[HookRow]:
    form = _form(call)
    kind = form.get("eventType", "UNSUBSCRIBE").upper()
    events: dict[str, HookEvent] = {"UNSUBSCRIBE": "unsubscribe", "DELETE": "unsubscribe", "SUBSCRIBE": "subscribe"}
    if kind == "CHANGEPROFILE":
        return []
    if kind not in events:
        raise BadCall(f"unknown MailUp event type {kind!r}")
    at = _iso(form["unsubscribeDate"]) if form.get("unsubscribeDate") else now
    note = f"mailup {kind.lower()}" + (f" (reason {form['reason']})" if form.get("reason") else "")
    return [HookRow(form.get("customerEmail", ""), form.get("customerList", ""), at, events[kind], note=note)]


def _mapped(config: CallbackConfig, call: Call, now: datetime) -> list[HookRow]:
    fields = config.fields
    assert fields is not None  # checked with the profile
    source: Any = _json(call) if config.format == "json" else _form(call)
    items = source if isinstance(source, list) else [source]
    rows = []
    for item in items:
        value = {name: _pick(item, getattr(fields, name)) for name in ("email", "list_id", "at", "reason", "new_email")}
        event = config.event or _code(config, value["reason"])
        zone = ZoneInfo(config.timezone)
        at = _parse_time(value["at"], config.timestamp_format, zone) if value["at"] else now
        note = f"{config.name} callback" + (f" ({value['reason']})" if value["reason"] else "")
        rows.append(HookRow(value["email"], value["list_id"], at, event, new_email=value["new_email"], note=note))
    return rows


def _code(config: CallbackConfig, value: str) -> HookEvent:
    if value in config.codes:
        return config.codes[value]
    if config.codes and all(event in OPT_OUTS for event in config.codes.values()):
        return "unsubscribe"  # a call of opt-outs fails safe: an unknown code is still an opt-out
    raise BadCall(f"unknown reason code {value!r}")


def _pick(item: Any, path: str | None) -> str:
    """A field by name, or by a dotted path into nested JSON objects; '' when absent."""
    if path is None:
        return ""
    if isinstance(item, dict) and path in item:  # a form field may hold dots or brackets in its name
        return "" if item[path] is None else str(item[path])
    for part in path.split("."):
        item = item.get(part) if isinstance(item, dict) else None
    return "" if item is None else str(item)


def _parse_time(text: str, fmt: str, zone: ZoneInfo) -> datetime:
    if fmt == "epoch":
        return _epoch(text)
    try:
        moment = datetime.strptime(text.strip(), fmt)
    except ValueError:
        raise BadCall(f"the time {text!r} is not in the format {fmt!r}") from None
    return (moment.replace(tzinfo=zone) if moment.tzinfo is None else moment).astimezone(UTC)


def _epoch(value: Any) -> datetime:
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        raise BadCall(f"the time {value!r} is not Unix seconds") from None


def _iso(text: str) -> datetime:
    """ISO 8601 with MailUp's hours-only offset (``+01``) accepted; a time without a zone is Italy's."""
    fixed = re.sub(r"([+-]\d\d)$", r"\1:00", text.strip())
    try:
        moment = datetime.fromisoformat(fixed)
    except ValueError:
        raise BadCall(f"the time {text!r} is not an ISO 8601 time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=ZoneInfo("Europe/Rome"))).astimezone(UTC)
