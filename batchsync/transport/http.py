"""The one HTTP client every provider API goes through: its errors translated into batchsync's, 429 and 5xx
tried again with back-off, and every call counted.

    client = ApiClient("https://us19.api.mailchimp.com/3.0", clock, retries=3, auth=("batchsync", key))
    member = client.call("GET", "/lists/a1b2c3d4e5/members/" + digest)
    client.calls                     # requests made, tries again included (what the provider counts)

Built on httpx rather than each provider's own client library: one place for time-outs, TLS checks, the
connection limit and retries serves all three providers, where Mailchimp's generated client
(``mailchimp-marketing``, last released 2022) retries nothing and Acoustic and Flexmail publish none for Python.
A refused credential is never tried again; a 4xx other than 429 is the provider's verdict on the request
(:class:`ApiRefusal`, with its reason), not a failure of the transport.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from batchsync.clock import Clock
from batchsync.config import TransportConfig
from batchsync.errors import TransportError
from batchsync.transport.retry import RetryPolicy

log = logging.getLogger(__name__)
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # an API answer larger than this is refused, never read into memory


class ApiRefusal(TransportError):
    """The provider refused a request for what it holds (4xx, not 401, 403 or 429): ``reason`` says why."""

    def __init__(self, status: int, reason: str, what: str) -> None:
        super().__init__(f"{what}: the provider refused it ({status}): {reason}")
        self.status, self.reason = status, reason


class CredentialsRefused(TransportError):
    """The provider refused the credentials (401 or 403): never tried again as it is."""


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    json_body: Any
    data: Mapping[str, str] | None
    content: bytes | None
    params: Mapping[str, Any] | None
    headers: Mapping[str, str] | None
    anonymous: bool


@dataclass
class Answer:
    """A successful answer: status, headers, and the body (JSON decoded where it is JSON, else bytes)."""

    status: int
    headers: Mapping[str, str]
    body: Any


class ApiClient:
    """A provider's API over one pooled httpx client, at most ``max_connections`` at once."""

    def __init__(
        self,
        base_url: str,
        clock: Clock,
        *,
        retries: int,
        timeout: float = 30.0,
        auth: tuple[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 4,
        per_minute: int | None = None,
        before_call: Callable[[], None] | None = None,
        name: str = "the provider's API",
    ) -> None:
        self.base_url, self.name, self.clock = base_url.rstrip("/"), name, clock
        self.retry = RetryPolicy(retries, clock)
        self.calls = 0
        self.interval = 60.0 / per_minute if per_minute else 0.0  # paced: at most per_minute requests a minute
        self.rate_window = 60.0 if per_minute else 0.0  # a 429 without Retry-After waits for the next window
        self.before_call = before_call  # may refuse the call (a monthly budget spent)
        self._last = -1e18
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.Client(
            auth=auth, headers=dict(headers or {}), timeout=timeout, limits=limits, follow_redirects=False
        )

    @classmethod
    def of(cls, config: TransportConfig, clock: Clock, default_url: str, name: str, **more: Any) -> ApiClient:
        """The client a profile's ``[transport]`` asks for: its ``url`` (else the provider's own), retries and
        time-out; ``more`` as for the constructor."""
        return cls(
            config.url or default_url, clock, retries=config.retries, timeout=config.timeout_seconds, name=name, **more
        )

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Mapping[str, str] | None = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        anonymous: bool = False,
    ) -> Answer:
        """One request, tried again on 429, 5xx and lost connections; ``path`` is joined to the base URL unless
        it is a whole URL (a link the provider gave: ``anonymous``, the credentials stay home)."""
        url = path if path.startswith(("https://", "http://")) else self.base_url + path
        what = f"{self.name}: {method} {url.split('?', 1)[0]}"
        request = Request(method, url, json_body, data, content, params, headers, anonymous)

        def attempt() -> Answer:
            return self._send(request, what)

        return self.retry.call(attempt, what=what)

    def _send(self, r: Request, what: str) -> Answer:
        if self.before_call is not None:
            self.before_call()
        wait = self._last + self.interval - self.clock.monotonic()
        if wait > 0:
            self.clock.sleep(wait)
        self._last = self.clock.monotonic()
        self.calls += 0 if r.anonymous else 1  # a link to the provider's storage is not a call on its API
        auth: Any = None if r.anonymous else httpx.USE_CLIENT_DEFAULT
        try:
            with self._http.stream(
                r.method,
                r.url,
                json=r.json_body,
                data=r.data,
                content=r.content,
                params=r.params,
                headers=r.headers,
                auth=auth,
            ) as response:
                body = _read_limited(response, what)
        except httpx.TimeoutException as exc:
            raise TransportError(f"{what}: timed out ({type(exc).__name__})", retryable=True) from None
        except httpx.TransportError as exc:
            raise TransportError(f"{what}: {type(exc).__name__}: {exc}", retryable=True) from None
        return _answer(response, body, what, self.rate_window)

    def link(self, url: str) -> str:
        """A link the provider gave (a results archive), checked before it is followed: https, or a loopback
        http as the base URL may be; anything else is refused."""
        parts = httpx.URL(url)
        base = httpx.URL(self.base_url)
        if parts.scheme == "https" or (parts.scheme == "http" and parts.host == base.host == "127.0.0.1"):
            return url
        raise TransportError(f"{self.name}: refused to follow {parts.scheme}://{parts.host}/...: not https")

    def close(self) -> None:
        self._http.close()


def _read_limited(response: httpx.Response, what: str) -> bytes:
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise TransportError(f"{what}: the answer is larger than {MAX_ANSWER_BYTES} bytes: refused")
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(response: httpx.Response, body: bytes, what: str, rate_window: float) -> Answer:
    status = response.status_code
    if status < 400:
        return Answer(status, response.headers, _decoded(response, body))
    reason = _reason(_decoded(response, body))
    if status == 429:
        wait = _retry_after(response.headers.get("retry-after")) or rate_window
        raise TransportError(f"{what}: {status} {reason}", retryable=True, wait=wait)
    if status >= 500:
        raise TransportError(f"{what}: {status} {reason}", retryable=True)
    if status in (401, 403):
        raise CredentialsRefused(f"{what}: credentials refused ({status}): {reason}")
    raise ApiRefusal(status, reason, what)


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds (its date form is taken as no advice), at most an hour."""
    try:
        return min(max(float(value or 0), 0.0), 3600.0)
    except ValueError:
        return 0.0


def _decoded(response: httpx.Response, body: bytes) -> Any:
    kind = response.headers.get("content-type", "")
    if "json" in kind and body:
        try:
            return json.loads(body)
        except ValueError:
            return body
    return body


def _reason(body: Any) -> str:
    """What a provider's error body says, in one line: a problem document's title and detail, and the fields it
    names (Mailchimp, Flexmail), or the text as it came."""
    if isinstance(body, dict):
        parts = [str(body[key]) for key in ("title", "detail", "message", "error_description") if body.get(key)]
        for error in body.get("errors") or []:
            if isinstance(error, dict):
                parts.append(f"{error.get('field', '')}: {error.get('message', '')}".strip(": "))
        return "; ".join(parts) or json.dumps(body)[:300]
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    return " ".join(text.split())[:300] or "no reason given"
