"""What happened and what is next, per profile: the last runs, the next nightly run, the files waiting in the
inboxes, the files in quarantine (and the export files the safety stop held back in held/), and the rows
rejected in the last run::

    print(as_table([profile_status(profile, Clock())]))
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.daemon import next_nightly
from batchsync.db import ledger
from batchsync.db.mapping import missing_tables, open_engine
from batchsync.workdir import WorkDir


@dataclass
class ProfileStatus:
    profile: str
    next_run: datetime | None
    last_runs: list[dict[str, Any]]
    waiting: list[str]
    quarantined: list[str]
    rejected_last_run: int


def profile_status(profile: Profile, clock: Clock, runs: int = 5) -> ProfileStatus:
    engine = open_engine(profile.database_url(), profile.database)
    try:
        if missing_tables(engine):
            last: list[dict[str, Any]] = []
        else:
            with engine.connect() as connection:
                last = ledger.last_runs(connection, profile.name, runs)
    finally:
        engine.dispose()
    work = WorkDir.of(profile)
    staged = sorted(path for path in work.staging.rglob("*") if path.is_file() and not path.name.startswith("."))
    waiting = _files(work.inbox, "inbox") + [f"staging/{path.relative_to(work.staging)}" for path in staged]
    quarantined = [name for name in _files(work.quarantine, "quarantine") if not name.endswith(".reason.txt")]
    quarantined += [name for name in _files(work.held, "held") if not name.endswith(".reason.txt")]
    rejected = int((last[0].get("counts") or {}).get("rejected", 0)) if last else 0
    return ProfileStatus(profile.name, next_nightly(profile, clock.now()), last, waiting, quarantined, rejected)


def _files(folder: Path, label: str) -> list[str]:
    if not folder.is_dir():
        return []
    return [f"{label}/{path.name}" for path in sorted(folder.iterdir()) if path.is_file() and path.name[0] != "."]


def as_json(statuses: list[ProfileStatus]) -> str:
    return json.dumps([asdict(status) for status in statuses], default=_json_default, indent=2)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def as_table(statuses: list[ProfileStatus]) -> str:
    lines: list[str] = []
    for status in statuses:
        due = status.next_run.isoformat(timespec="minutes") if status.next_run else "not scheduled"
        lines += [
            f"profile {status.profile}",
            f"  next run:       {due}",
            f"  waiting files:  {len(status.waiting)}" + _listed(status.waiting),
            f"  quarantined:    {len(status.quarantined)}" + _listed(status.quarantined),
            f"  rejected rows in the last run: {status.rejected_last_run}",
            f"  {'run':>5} {'kind':<7} {'started (UTC)':<17} {'outcome':<9} counts",
        ]
        for run in status.last_runs:
            counts = ", ".join(f"{key}={value}" for key, value in (run.get("counts") or {}).items() if value)
            started = run["started_at"].strftime("%Y-%m-%d %H:%M")
            lines.append(f"  {run['id']:>5} {run['kind']:<7} {started:<17} {run['outcome']:<9} {counts}")
        if not status.last_runs:
            lines.append("  (no runs yet)")
        lines.append("")
    return "\n".join(lines)


def _listed(names: list[str]) -> str:
    return f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
