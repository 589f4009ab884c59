"""The daemon's HTTP listener (``batchsync daemon --listen HOST:PORT``): ``GET /healthz``, ``GET /metrics`` and a
read-only status page at ``GET /``, served by aiohttp from a thread of its own::

    listener = Listener(daemon, "127.0.0.1", 8080)
    listener.start()          # returns once the port is bound; ConfigError when it cannot be
    ...
    listener.close()

``/healthz`` answers 200 with JSON when the daemon's loop is alive (it came round lately, or a job is in hand)
and every profile is healthy, else 503 with the reasons: a failed or missed night, a file stuck in staging,
quarantine left for over a day, a database or server down, a profile that cannot be loaded. What it reads from
the database is cached for a few seconds, so a probe every second costs nothing. The page and the answers hold
counts, file names and reasons, never addresses or secrets; bind to loopback (or a private network) and put a
reverse proxy in front for anything wider.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from batchsync import __version__
from batchsync.config import Profile
from batchsync.errors import ConfigError
from batchsync.hooks import Answer, Delivery, journal_folder
from batchsync.status import ProfileStatus, broken_status, profile_status

if TYPE_CHECKING:
    from batchsync.daemon import Daemon

log = logging.getLogger(__name__)
CACHE_SECONDS = 5.0
ALIVE_SECONDS = 60.0  # a loop that has not come round for this long, with no job in hand, is stuck
MAX_BODY = 16 * 1024 * 1024 + 1  # a callback's own limit is checked first (max_body_bytes, at most 16 MiB)
JOURNAL_STALE_SECONDS = 60.0  # callbacks journalled this long ago and not cut yet: something is wrong
LONGEST_JOB_SECONDS = 6 * 3600.0  # a job in hand longer than this is taken to hang (a database that never answers)


@dataclass
class Snapshot:
    """What the listener answers from: whether the daemon is alive, the job in hand, each profile's status and the
    callbacks' counts."""

    alive: bool
    job: str | None
    statuses: list[ProfileStatus]
    taken: float
    callbacks: list[tuple[str, str, dict[str, int], int]] = field(default_factory=list)  # profile, name, tally, rows

    @property
    def healthy(self) -> bool:
        return self.alive and all(status.healthy for status in self.statuses)


def snapshot(daemon: Daemon) -> Snapshot:
    """What the daemon is doing and how each profile is; reads each profile's database."""
    job, now = daemon.job, daemon.clock.monotonic()
    looped = now - daemon.heartbeat < max(ALIVE_SECONDS, 5 * daemon.tick_seconds)
    alive = looped or (job is not None and now - job[1] < LONGEST_JOB_SECONDS)
    statuses = []
    for runtime in list(daemon.runtimes.values()):
        # A receiver alone (`serve`) may not reach the database: it answers for its journals only.
        status = (
            ProfileStatus(runtime.profile.name)
            if daemon.receive_only
            else profile_status(runtime.profile, daemon.clock)
        )
        troubles = runtime.trouble.describe()
        if runtime.reload_error is not None:
            troubles.append(f"the profile file changed into one that cannot be used: {runtime.reload_error}")
        if not runtime.prepared and not troubles and not daemon.receive_only:
            troubles.append("not started yet")
        troubles += _journal_problems(daemon, runtime.profile)
        status.problems[:0] = troubles
        statuses.append(status)
    statuses += [broken_status(str(path), reason) for path, reason in list(daemon.broken.items())]
    if not statuses and not daemon.started:
        statuses.append(ProfileStatus("(starting)", problems=["the daemon is loading its profiles"]))
    elif not statuses:
        statuses.append(broken_status("(none)", "no profile files to run"))
    callbacks = [
        (name, hook, dict(daemon.hooks.tally.get((name, hook), {})), journal.rows_waiting())
        for (name, hook), journal in list(daemon.hooks.journals.items())
    ]
    return Snapshot(alive, job[0] if job else None, statuses, time.monotonic(), callbacks)


def _journal_problems(daemon: Daemon, profile: Profile) -> list[str]:
    problems = []
    folder, known = journal_folder(profile), {config.name for config in profile.callback}
    strays = {path.name.split(".")[0] for path in folder.glob("*.journal*")} - known if folder.is_dir() else set()
    problems += [f"callback {name} is no longer in the profile, but its journal holds rows" for name in sorted(strays)]
    for config in profile.callback:
        journal = daemon.hooks.journals.get((profile.name, config.name))
        since = journal.waiting_since if journal is not None else None
        if journal is not None and since is not None and time.monotonic() - since > JOURNAL_STALE_SECONDS:
            waited = f"{time.monotonic() - since:.0f} s"
            problems.append(f"callback {config.name}: {journal.rows_waiting()} rows journalled {waited} ago, not cut")
    return problems


class Listener:
    """The daemon's HTTP(S) listener (aiohttp, in a thread and event loop of its own): /healthz, /metrics, the status
    page and the callbacks."""

    def __init__(self, daemon: Daemon, host: str, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.daemon, self.host, self.port, self.tls = daemon, host, port, tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="batchsync-listener", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._cache: Snapshot | None = None
        self._cache_lock = asyncio.Lock()

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {self._error}") from None
        scheme = "https" if self.tls else "http"
        log.info("listening on %s://%s:%d (/healthz, /metrics, /)", scheme, self.host, self.port)

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._bind())
        except OSError as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _bind(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._page)
        for path in ("/hooks/{profile}/{callback}", "/hooks/{profile}/{callback}/{token}"):
            app.router.add_route("*", path, self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _snapshot(self) -> Snapshot:
        async with self._cache_lock:  # one reader at a time; the others get its result
            if self._cache is None or time.monotonic() - self._cache.taken > CACHE_SECONDS:
                self._cache = await asyncio.get_running_loop().run_in_executor(None, snapshot, self.daemon)
            return self._cache

    async def _healthz(self, request: web.Request) -> web.Response:
        shot = await self._snapshot()
        body = {
            "healthy": shot.healthy,
            "alive": shot.alive,
            "job": shot.job,
            "version": __version__,
            "profiles": [{"profile": s.profile, "healthy": s.healthy, "problems": s.problems} for s in shot.statuses],
        }
        return web.json_response(body, status=200 if shot.healthy else 503, dumps=_dumps)

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.daemon.metrics.text())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _hook(self, request: web.Request) -> web.Response:
        """A provider's callback: checked, journalled (fsynced) and answered; applied later by the daemon."""
        if request.method not in ("GET", "HEAD", "POST"):
            return web.Response(status=405, text="method not allowed")
        hooks, info = self.daemon.hooks, request.match_info
        delivery = Delivery(
            info["profile"], info["callback"], info.get("token"), request.method, dict(request.query),
            dict(request.headers), None, request.remote or "",
        )  # fmt: skip
        answer = hooks.early(delivery)
        if answer is None:
            found = hooks.find(delivery.profile, delivery.callback)
            assert found is not None
            limit = found[1].max_body_bytes
            body = await _whole_body(request, limit)
            if body is None:
                answer = hooks.count(delivery, Answer(413, f"the body is over {limit} bytes"))
            elif request.content_length is not None and len(body) != request.content_length:
                answer = hooks.count(delivery, Answer(400, "bad request: the body is shorter than its Content-Length"))
            else:
                answer = await hooks.take(replace(delivery, body=body))
        return web.Response(status=answer.status, text=answer.text)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=status_page(await self._snapshot()), content_type="text/html", charset="utf-8")


async def _whole_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, read to its end (a read returns what has arrived so far), or None when it is over ``limit``
    bytes (said by its Content-Length, or found while reading)."""
    if (request.content_length or 0) > limit:
        return None
    chunks, size = [], 0
    while chunk := await request.content.read(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2)


PAGE_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 2em}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    ".ok{color:#176f2c}.bad{color:#b00020;font-weight:bold}pre{background:#f7f7f7;padding:.6em}"
)


def status_page(shot: Snapshot) -> str:
    """The status page: the daemon, then per profile its health, its problems and its last runs."""
    state = "healthy" if shot.healthy else "NEEDS ATTENTION"
    css = "ok" if shot.healthy else "bad"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><meta http-equiv='refresh' content='30'>",
        f"<title>batchsync: {state}</title><style>{PAGE_STYLE}</style></head><body>",
        f"<h1>batchsync {html.escape(__version__)}: <span class='{css}'>{state}</span></h1>",
        f"<p>Loop {'alive' if shot.alive else 'STUCK'}; job in hand: {html.escape(shot.job or 'none')}.</p>",
    ]
    for status in shot.statuses:
        parts += _profile_section(status)
    if shot.callbacks:
        parts.append("<h2>Callbacks</h2><table class='callbacks'><tr><th>profile</th><th>callback</th>")
        parts.append("<th>calls by outcome</th><th>rows in the journal</th></tr>")
        for name, hook, tally, rows in shot.callbacks:
            counts = ", ".join(f"{outcome}={count}" for outcome, count in sorted(tally.items())) or "none yet"
            cells = [name, hook, counts, str(rows)]
            parts.append("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _profile_section(status: ProfileStatus) -> list[str]:
    e = html.escape
    parts = [f"<h2>Profile {e(status.profile)}: {'ok' if status.healthy else 'needs attention'}</h2>"]
    parts += [f"<p class='bad'>{e(problem)}</p>" for problem in status.problems]
    due = f"{status.next_run:%Y-%m-%d %H:%M} UTC" if status.next_run else "not scheduled"
    facts = [
        ("next nightly run", due),
        ("files waiting", ", ".join(status.waiting) or "none"),
        ("quarantined or held", ", ".join(status.quarantined) or "none"),
        ("rows rejected in the last run", str(status.rejected_last_run)),
    ]
    parts.append("<ul>" + "".join(f"<li>{e(label)}: {e(value)}</li>" for label, value in facts) + "</ul>")
    parts.append(
        "<table class='runs'><tr><th>run</th><th>kind</th><th>night</th><th>started (UTC)</th><th>outcome</th>"
    )
    parts.append("<th>counts</th><th>message</th></tr>")
    for run in status.last_runs:
        counts = ", ".join(f"{key}={value}" for key, value in (run.get("counts") or {}).items() if value)
        started = f"{run['started_at']:%Y-%m-%d %H:%M}"
        cells = [run["id"], run["kind"], run["slot"], started, run["outcome"], counts, run["message"]]
        parts.append("<tr>" + "".join(f"<td>{e(str(cell or ''))}</td>" for cell in cells) + "</tr>")
    parts.append("</table>")
    return parts


def listen_address(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` too) as a host and a port."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen wants HOST:PORT, such as 127.0.0.1:8080, got {listen!r}")
    return host, int(port)


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's TLS context for ``--tls-cert``/``--tls-key``, or None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use the TLS certificate {cert} and key {key}: {exc}") from None
    return context
