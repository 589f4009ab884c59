"""Failures mailed to the profile's notify address: the first of a kind at once, the same kind again at most once
a day, remembered in ``WORK/.alerts.json`` so a restarted daemon does not mail it again::

    alerts = Alerts(profile, clock)
    alerts.failed("nightly", "nightly 2026-01-05 02:30", exc)

A kind is the job (nightly, inbox, poll, start) and the error's class: a wrong password tonight and a database
down tomorrow are two mails; the same wrong password every night is one a day.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import BatchsyncError
from batchsync.notify import send_failure

log = logging.getLogger(__name__)
SAME_KIND_EVERY = timedelta(days=1)


class Alerts:
    """Mails a profile's job failures, each kind (job and error class) at most once a day, across restarts."""

    def __init__(self, profile: Profile, clock: Clock) -> None:
        self.profile = profile
        self.clock = clock
        self.path = profile.work_dir / ".alerts.json"
        self.sent: dict[str, str] = {}  # also kept here: a disk too full to write the file must not mean a mail a try

    def failed(self, job: str, what: str, error: BaseException, message: str) -> bool:
        """Mail the failure unless one of its kind went out within a day; True when a mail went out."""
        if self.profile.notify is None:
            return False
        kind, now = f"{job}:{type(error).__name__}", self.clock.now()
        sent = {**_load(self.path), **self.sent}
        last = sent.get(kind)
        if last is not None and now - datetime.fromisoformat(last) < SAME_KIND_EVERY:
            log.debug("profile %s: %s failed again; mailed already at %s", self.profile.name, what, last)
            return False
        try:
            send_failure(self.profile, what, message, now)
        except BatchsyncError as exc:
            log.error("profile %s: the failure mail was not sent: %s", self.profile.name, exc)
            return False
        sent[kind] = self.sent[kind] = now.isoformat()
        _save(self.path, sent)
        return True


def _load(path: Path) -> dict[str, str]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(key): str(value) for key, value in loaded.items()} if isinstance(loaded, dict) else {}


def _save(path: Path, sent: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(sent, indent=1), encoding="utf-8")
        temporary.replace(path)
    except OSError as exc:  # a full disk must not stop the daemon; at worst the mail goes out again
        log.warning("cannot remember the alert in %s: %s", path, exc.strerror)
