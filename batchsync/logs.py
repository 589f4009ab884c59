"""Logging set-up for the command line: plain lines, or JSON lines with ``--log-format json``.

Fields that say what a line is about (the profile, the run id, the daemon's job) are bound for a stretch of work
and appear on every line logged meanwhile, whatever logger logs it::

    with log_fields(profile="mailup", run=12):
        log.info("applied")     # text: "... [profile=mailup run=12] applied"; JSON: {"profile": "mailup", ...}
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_fields: ContextVar[dict[str, Any]] = ContextVar("batchsync_log_fields", default={})  # noqa: B039  # never mutated
_format: list[str] = ["text"]  # the format chosen by setup_logging, for the CLI's last line


@contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged in this block (None values are left out)."""
    token = _fields.set({**_fields.get(), **{key: value for key, value in fields.items() if value is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


class _QuietWatchdog(logging.Filter):
    """watchdog logs an error when an observer is stopped with events still queued (a reload, a stop): nothing
    is lost, as the daemon reads the inbox folder itself, so the line would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("InotifyEmitter.queue_events() called when the thread is inactive")


class _Redact(logging.Filter):
    """aiohttp's server logs a request it cannot parse with its request line, which may hold a callback's secret
    (a ``?key=`` parameter, a path token): the query's values and a hook URL's token are starred out."""

    QUERY = re.compile(r"([?&][^=&\s'\"]*=)[^&\s'\"]*")
    TOKEN = re.compile(r"(/hooks/[^/\s'\"?]+/[^/\s'\"?]+/)[^\s'\"?]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp"):
            text = self.TOKEN.sub(r"\1***", self.QUERY.sub(r"\1***", record.getMessage()))
            record.msg, record.args = text, ()
            if record.exc_info:  # the traceback may quote the line too
                record.exc_info, record.exc_text = None, None
        return True


class _FieldsFilter(logging.Filter):
    """Puts the fields bound by ``log_fields`` on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = _fields.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, the bound fields, the message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            **getattr(record, "fields", {}),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """A plain line per record, with the bound fields in brackets before the message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging's own name
        fields = getattr(record, "fields", {})
        if fields:
            record.message = "[" + " ".join(f"{key}={value}" for key, value in fields.items()) + "] " + record.message
        return super().formatMessage(record)


def setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_FieldsFilter())
    handler.addFilter(_QuietWatchdog())
    handler.addFilter(_Redact())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("paramiko").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aiohttp.access").setLevel(max(logging.WARNING, root.level))
    # httpx logs every request's whole URL at INFO: a provider's signed links and addresses in queries stay out.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    _format[0] = log_format


def json_output() -> bool:
    """Whether ``--log-format json`` was chosen."""
    return _format[0] == "json"


def final_line(message: str, exit_code: int) -> str:
    """The CLI's last line for an error: ``error: ...`` as text, or one JSON object under ``--log-format json``."""
    if not json_output():
        return f"error: {message}"
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": "error",
        "logger": "batchsync.cli",
        **_fields.get(),
        "message": message,
        "exit_code": exit_code,
    }
    return json.dumps(entry, ensure_ascii=False, default=str)
