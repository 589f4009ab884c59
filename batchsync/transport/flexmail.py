"""Flexmail through its REST API (https://api.flexmail.eu): contacts upserted, opt-outs sent as unsubscribes.

    transport = FlexmailTransport(profile, clock, account_id="123456", token=token)
    transport.submit([export_csv], "newsletter")    # one contact at a time, within the API's limits

Flexmail's file import only adds and updates, so an address that leaves a list would never be unsubscribed
there; through the API each export row is one contact:

* subscribed (or pending): ``GET /contacts?email=`` finds it; found, ``PATCH /contacts/{id}`` sets its names
  and custom fields; not found, ``POST /contacts`` creates it with the profile's ``language`` and ``source_id``
  (both required by Flexmail). Flexmail refuses an address it holds unsubscribed or bounced (409): that row is
  refused with Flexmail's reason, never forced.
* unsubscribed, cleaned, or a tombstone: ``POST /contacts/{id}/unsubscribe``; an address Flexmail does not
  hold (or no longer holds as active) needs nothing.

Columns: the one whose field is ``email`` is the address, ``status`` the status, ``first_name`` and
``last_name`` go to Flexmail's ``first_name`` and ``name``; every other column is a custom field, its header the
field's placeholder (``batchsync check`` says which are missing at Flexmail). Addresses go lower-cased: Flexmail
refuses capitals.

Limits: Flexmail answers 429 past 60 requests a minute; the transport paces itself to
``transport.max_per_minute`` and backs off on a 429. Flexmail documents no monthly limit; an account's contract
may set one: ``transport.monthly_calls`` stops sending when this month's calls (counted in the work folder,
every batchsync run together) reach it: the rows left are refused as "not sent" and go out next run.

Unsubscribes and bounces at Flexmail come back by its webhooks (a ``[[callback]]`` of format ``json``: Flexmail
has no "changed since" query), so ``list`` has no report folders here.

Sources: Flexmail's API reference as quoted and called by public integrations (the Airbyte connector manifest,
PostHog's Flexmail source, Pipedream's Flexmail components, the Craft Formie and statikbe Flexmail plugins):
Basic auth with the account id and a personal access token; ``GET /contacts?email=``; ``POST /contacts``
(email, language, source; first_name, name, custom_fields by placeholder); ``PATCH /contacts/{id}``;
``POST /contacts/{id}/unsubscribe``; ``GET /custom-fields``, ``/sources``, ``/account-contact-languages``;
the 60-a-minute limit from Flexmail's API getting-started page.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import ConfigError, TransportError
from batchsync.transport.api import ApiTransport, ExportRow, Finding, Rejected, Submission, export_rows
from batchsync.transport.http import ApiClient, ApiRefusal
from batchsync.workdir import write_whole

log = logging.getLogger(__name__)
NAMES = {"first_name": "first_name", "last_name": "name"}  # batchsync field -> Flexmail's
LIVE = ("subscribed", "pending")
WEBHOOK_EVENTS = ("contact.unsubscribed", "contact.bounced_out")  # what the [[callback]] of the profile reads


class MonthlyLimitReached(TransportError):
    """This month's API calls reached ``transport.monthly_calls``."""


class CallBudget:
    """The API calls of the current month, kept in the work folder so that every run counts against one limit."""

    def __init__(self, path: Path, limit: int | None, clock: Clock) -> None:
        self.path, self.limit, self.clock = path, limit, clock

    def spend(self) -> None:
        month, used = self._read()
        if self.limit is not None and used >= self.limit:
            raise MonthlyLimitReached(
                f"this month's {self.limit} Flexmail API calls are spent (transport.monthly_calls)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"month": month, "calls": used + 1})

        def write(part: Path) -> None:
            part.write_text(text, "utf-8")

        write_whole(self.path, write)  # a run stopped mid-write leaves the count whole

    def used(self) -> int:
        return self._read()[1]

    def _read(self) -> tuple[str, int]:
        month = f"{self.clock.now():%Y-%m}"
        if self.path.exists():
            stored = json.loads(self.path.read_text("utf-8"))
            if stored.get("month") == month:
                return month, int(stored.get("calls", 0))
        return month, 0


class FlexmailTransport(ApiTransport):
    def __init__(self, profile: Profile, clock: Clock, account_id: str, token: str) -> None:
        super().__init__(profile, clock)
        config = profile.transport
        if not account_id or not token:
            raise ConfigError(
                f"profile {profile.name}: the Flexmail transport needs 'user' (the account id) and its personal "
                "access token (api_key_env or api_key_file)"
            )
        self.budget = CallBudget(self.inbox.root / ".flexmail-calls.json", config.monthly_calls, clock)
        self.api = ApiClient.of(
            config,
            clock,
            "https://api.flexmail.eu",
            "Flexmail",
            auth=(account_id, token),
            max_connections=1,
            per_minute=config.max_per_minute,
            before_call=self.budget.spend,
        )

    def connect(self) -> None:
        self.api.call("GET", "/")

    def close(self) -> None:
        self.api.close()

    def fetch_reports(self, folder: str) -> None:  # pragma: no cover - no report folders: list refuses first
        raise TransportError("Flexmail reports its unsubscribes and bounces by webhook ([[callback]])")

    def check(self) -> Iterator[Finding]:
        where = f"Flexmail API {self.api.base_url}"
        try:
            self.api.call("GET", "/")
            sources = [item["id"] for item in _items(self.api.call("GET", "/sources", params={"limit": 500}).body)]
            languages = _languages(self.api.call("GET", "/account-contact-languages").body)
            fields = {item.get("placeholder") for item in _items(self.api.call("GET", "/custom-fields").body)}
        except TransportError as exc:
            yield Finding(where, False, f"{exc}: check transport.user (the account id) and the access token")
            return
        yield Finding(where, True, f"answers; account accepted; {self.budget.used()} calls spent this month")
        config = self.profile.transport
        known = config.source_id in sources
        yield Finding(
            "Flexmail source",
            known,
            f"source_id {config.source_id}" + (" exists" if known else f" is not one of {sources}"),
        )
        yield Finding(
            "Flexmail language",
            config.language in languages,
            f"language {config.language!r} (the account has {languages})",
        )
        yield self._webhooks()
        wanted = _custom_headers(self.profile)
        missing = [header for header in wanted if header not in fields]
        advice = "create them at Flexmail (Contacts > Custom fields), their placeholders as the column headers"
        yield Finding(
            "Flexmail custom fields",
            not missing,
            f"missing: {', '.join(missing)}: {advice}"
            if missing
            else f"every mapped field there ({', '.join(wanted) or 'none mapped'})",
        )

    def _webhooks(self) -> Finding:
        """Flexmail tells of unsubscribes and bounces only by webhook: both must be registered."""
        registered = {item.get("event_name") for item in _items(self.api.call("GET", "/webhooks").body)}
        missing = [event for event in WEBHOOK_EVENTS if event not in registered]
        if not missing:
            return Finding("Flexmail webhooks", True, f"registered for {', '.join(WEBHOOK_EVENTS)}")
        hooks = ", ".join(f"/hooks/{self.profile.name}/{hook.name}" for hook in self.profile.callback) or "none"
        return Finding(
            "Flexmail webhooks",
            False,
            f"none for {', '.join(missing)}: register them (POST /webhooks) with the daemon's callback URL "
            f"({hooks}), or Flexmail's opt-outs never reach the CRM",
        )

    # --- out ---------------------------------------------------------------------------------------------------

    def submit(self, files: list[Path], list_code: str) -> Submission:
        submission = Submission()
        rows = (row for path in files for row in export_rows(self.profile, path))
        for row in rows:
            try:
                self._send(row)
                submission.accepted += 1
            except MonthlyLimitReached as exc:  # this row and every one left, of every file: not sent
                left = [row, *rows]
                submission.rejected += [Rejected(r.line, r.email, f"not sent: {exc}") for r in left]
                log.error("%s; %d rows left for the next run", exc, len(left))
                return submission
            except ApiRefusal as exc:
                submission.rejected.append(Rejected(row.line, row.email, exc.reason))
        return submission

    def _send(self, row: ExportRow) -> None:
        email = row.email.strip().lower()
        found = _items(self.api.call("GET", "/contacts", params={"email": email}).body)
        if row.status not in LIVE:
            for contact in found:
                self.api.call("POST", f"/contacts/{contact['id']}/unsubscribe")
            return
        document = _fields(row)
        if found:
            self.api.call("PATCH", f"/contacts/{found[0]['id']}", json_body=document)
            return
        config = self.profile.transport
        created = {"email": email, "language": config.language, "source": config.source_id, **document}
        self.api.call("POST", "/contacts", json_body=created)


def _fields(row: ExportRow) -> dict[str, Any]:
    """A row's Flexmail fields: first_name and name, and the custom fields by placeholder."""
    names = {NAMES[kind]: cell for _, kind, cell in row.others if kind in NAMES}
    custom = {header: cell or None for header, kind, cell in row.others if kind not in NAMES and kind != "groups"}
    return {**names, "custom_fields": custom}


def _custom_headers(profile: Profile) -> list[str]:
    return [c.header for c in profile.export.columns if c.field not in ("email", "status", "groups", *NAMES)]


def _languages(body: Any) -> list[str]:
    """The account's contact languages: ``{"languages": ["nl", ...]}`` (items given as codes or as objects)."""
    found = body.get("languages") if isinstance(body, dict) else None
    return [str(item.get("code") if isinstance(item, dict) else item) for item in found or []]


def _items(body: Any) -> list[dict[str, Any]]:
    """The items of a HAL collection (none when ``_embedded`` is absent: Flexmail's empty answer)."""
    if not isinstance(body, dict):
        return []
    return list((body.get("_embedded") or {}).get("item") or [])
