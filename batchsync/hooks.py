"""The callbacks a listener takes: which profile and ``[[callback]]`` a URL names, whether the call is the
provider's (its secret), whether its source is within its rate, and the journal each accepted call goes to::

    hooks = Hooks(clock)
    hooks.use(profiles)                                     # at start, and at every reload
    answer = await hooks.take(Delivery("mailup", "optouts", None, "POST", query, headers, body, "10.0.0.7"))
    answer.status                                            # 200, 400, 401, 404, 413, 429 or 503

Nothing is applied here: an accepted call's rows are appended to the journal (journal.py), and the daemon cuts
the journal into inbox files. The order of the checks is chosen so that a refusal says nothing it need not: an
unknown profile or callback is 404 (the same answer for both); a source past its rate is 429 before its body is
read; a wrong or missing secret is 401 with the same text whatever was wrong; secrets are compared in constant
time and never logged (nor are query strings, which may hold them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import BatchsyncError
from batchsync.hookconfig import CallbackConfig
from batchsync.hookformats import BadCall, Call, read_call
from batchsync.journal import Journal
from batchsync.secret import read_secret

log = logging.getLogger(__name__)
REFUSED = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "too_large", 429: "rate_limited"}
URL_SECRETS = ("query", "path", "basic")  # checked before the body is read


@dataclass(frozen=True)
class Delivery:
    """One callback request as the listener received it, before any check."""

    profile: str
    callback: str
    token: str | None  # the URL's last part after the callback's name (secret_in = "path")
    method: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes | None  # None: not read yet (the size is checked first)
    source: str


@dataclass(frozen=True)
class Answer:
    """What the listener answers a callback: the HTTP status and a short text."""

    status: int
    text: str


class RateLimiter:
    """A token bucket per callback and source (an IPv6 source by its /64): ``rate`` calls a second, bursts of
    twice that. At most MAX_SOURCES buckets are kept, the least recently seen forgotten first, so a flood of
    sources costs bounded memory and time."""

    MAX_SOURCES = 10_000

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()  # tokens, when; LRU order

    def allow(self, key: tuple[str, str], rate: float) -> bool:
        now, burst = self.clock.monotonic(), 2 * rate
        key = (key[0], _source(key[1]))
        tokens, last = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > self.MAX_SOURCES:  # the least recently seen go first
            self._buckets.popitem(last=False)
        return allowed


def _source(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    return str(ipaddress.ip_network(f"{parsed}/64", strict=False)) if parsed.version == 6 else address


class FirstSeen:
    """When each delivery (its body and parameters, the secret left out) was first received, for RETRY_WINDOW:
    a provider retrying a call whose payload carries no time of its own gets that first time again, so a retry
    a day later cannot override what the CRM did meanwhile. Kept in memory (MAX_KEPT deliveries)."""

    RETRY_WINDOW = 48 * 3600.0
    MAX_KEPT = 200_000

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._seen: OrderedDict[str, tuple[float, datetime]] = OrderedDict()

    def of(self, delivery: Delivery, secret_param: str) -> datetime:
        query = sorted((k, v) for k, v in delivery.query.items() if k != secret_param)
        digest = hashlib.sha256(repr((delivery.profile, delivery.callback, query)).encode() + (delivery.body or b""))
        key, now = digest.hexdigest(), self.clock.monotonic()
        while self._seen and (
            len(self._seen) > self.MAX_KEPT or now - next(iter(self._seen.values()))[0] > self.RETRY_WINDOW
        ):
            self._seen.popitem(last=False)
        if key not in self._seen:
            self._seen[key] = (now, self.clock.now())
        return self._seen[key][1]


class Hooks:
    """The callbacks of the loaded profiles: routes each request to its profile and callback, checks its rate and
    secret, and journals its rows; keeps the counts /metrics and /healthz show."""

    def __init__(self, clock: Clock, registry: CollectorRegistry | None = None) -> None:
        self.clock = clock
        self.limiter = RateLimiter(clock)
        self.first_seen = FirstSeen(clock)
        self.profiles: dict[str, Profile] = {}
        self.tally: dict[tuple[str, str], dict[str, int]] = {}  # (profile, callback) -> outcome -> calls
        self.journals: dict[tuple[str, str], Journal] = {}
        self.calls = Counter(
            "batchsync_callbacks", "Callbacks by outcome", ["profile", "callback", "outcome"], registry=registry
        )
        self.backlog = Gauge(
            "batchsync_callback_backlog_rows",
            "Rows journalled, not cut yet",
            ["profile", "callback"],
            registry=registry,
        )

    def use(self, profiles: list[Profile]) -> None:
        """Take the callbacks of these profiles (a reload's profiles replace the ones before)."""
        self.profiles = {profile.name: profile for profile in profiles}
        for profile in profiles:
            for config in profile.callback:
                self.journal(profile, config)

    def journal(self, profile: Profile, config: CallbackConfig) -> Journal:
        """The callback's journal, made (and its backlog gauge set) on first use."""
        key = (profile.name, config.name)
        if key not in self.journals:
            journal = self.journals[key] = Journal(journal_folder(profile), config.name)
            self.backlog.labels(*key).set_function(_rows_waiting(journal))
        return self.journals[key]

    def find(self, profile_name: str, callback: str) -> tuple[Profile, CallbackConfig] | None:
        profile = self.profiles.get(profile_name)
        found = [c for c in profile.callback if c.name == callback] if profile is not None else []
        return (profile, found[0]) if profile is not None and found else None

    def early(self, delivery: Delivery) -> Answer | None:
        """The checks made before the body is read: the callback exists; a secret in the URL or a header is
        right (so that calls with a wrong one, e.g. through a shared proxy, never use up the provider's rate);
        the source is within its rate."""
        found = self.find(delivery.profile, delivery.callback)
        if found is None:
            return self.count(delivery, Answer(404, "no such callback"))
        profile, config = found
        if config.secret_in in URL_SECRETS and not self._authentic(profile, config, delivery):
            return self.count(delivery, Answer(401, "unauthorized"))
        if not self.limiter.allow((f"{delivery.profile}/{delivery.callback}", delivery.source), config.max_per_second):
            return self.count(delivery, Answer(429, "too many calls from this address; slow down"))
        return None

    async def take(self, delivery: Delivery) -> Answer:
        """Check, read and journal one call (``early`` was asked first, and the body read within its limit)."""
        found = self.find(delivery.profile, delivery.callback)
        assert found is not None and delivery.body is not None
        profile, config = found
        # A GET or HEAD is the provider checking the URL unless it carries parameters of its own (a MailUp
        # webhook, or a form callback, sent by GET).
        checking = delivery.method in ("GET", "HEAD") and not (set(delivery.query) - {config.key_param})
        if checking and config.secret_in not in URL_SECRETS:
            # The provider checking the URL (Mailigen's HEAD) cannot sign an empty request: answered, nothing written
            return self.count(delivery, Answer(200, "ok"), "validated")
        if not self._authentic(profile, config, delivery):
            return self.count(delivery, Answer(401, "unauthorized"))
        if checking:  # Mailchimp's validation GET carries the URL's key
            return self.count(delivery, Answer(200, "ok"), "validated")
        try:
            received = self.first_seen.of(delivery, config.key_param)
            rows = read_call(config, Call(delivery.method, delivery.body, delivery.query), received)
        except BadCall as exc:
            return self.count(delivery, Answer(400, f"bad request: {exc}"))
        if rows:
            try:
                await self.journal(profile, config).append(rows)
            except OSError as exc:
                log.error("profile %s: callback %s not stored: %s", profile.name, config.name, exc.strerror)
                return self.count(delivery, Answer(503, "cannot store the call now; try again later"), "failed")
        return self.count(delivery, Answer(200, "ok"), "accepted")

    def _authentic(self, profile: Profile, config: CallbackConfig, delivery: Delivery) -> bool:
        try:
            secret = read_secret(profile, config.secret_env, config.secret_file, f"callback {config.name} secret")
        except BatchsyncError as exc:
            log.error("%s", exc)
            return False
        if not secret:
            return False
        return _presented(config, delivery, secret.encode())

    def count(self, delivery: Delivery, answer: Answer, outcome: str | None = None) -> Answer:
        """Count the answer in /metrics (by outcome) and return it."""
        known = self.find(delivery.profile, delivery.callback) is not None
        labels = (delivery.profile, delivery.callback) if known else ("-", "-")  # no label per unknown URL
        outcome = outcome or REFUSED.get(answer.status, str(answer.status))
        self.calls.labels(*labels, outcome).inc()
        counts = self.tally.setdefault(labels, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        return answer


def _presented(config: CallbackConfig, delivery: Delivery, secret: bytes) -> bool:
    """Whether the call carries the secret the way the callback says; constant time."""
    body, headers = delivery.body or b"", {key.lower(): value for key, value in delivery.headers.items()}
    if config.secret_in == "query":
        return _same(delivery.query.get(config.key_param, ""), secret)
    if config.secret_in == "path":
        return _same(delivery.token or "", secret)
    if config.secret_in == "basic":
        expected = base64.b64encode(config.basic_user.encode() + b":" + secret).decode()
        return _same(headers.get("authorization", "").removeprefix("Basic "), expected.encode())
    if config.secret_in == "hmac-sha256":
        given = headers.get(config.signature_header.lower(), "").removeprefix("sha256=")
        return _same(given, hmac.new(secret, body, hashlib.sha256).hexdigest().encode())
    given = headers.get("x-mailigen-signature", "")  # "sha1=" + hex HMAC-SHA1 of the raw body
    return _same(given, b"sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest().encode())


def _same(given: str, expected: bytes) -> bool:
    return hmac.compare_digest(given.encode(), expected)


def journal_folder(profile: Profile) -> Path:
    return profile.work_dir / "callbacks"


def _rows_waiting(journal: Journal) -> Callable[[], float]:
    return lambda: float(journal.rows_waiting())
