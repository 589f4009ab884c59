"""What happened and what is next, per profile, and whether someone should look: the last runs, the next nightly
run, the files waiting in the inboxes, the files in quarantine (and the export files the safety stop held back
in held/), the rows rejected in the last run, and the problems (a failed or missed night, a file stuck in
staging, quarantine left for over a day, a profile that cannot be loaded or a database that cannot be read)::

    status = profile_status(profile, Clock())
    print(as_table([status]))
    status.problems             # [] when all is well: `batchsync status` exits 4 otherwise, /healthz answers 503
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.db import ledger
from batchsync.db.mapping import missing_tables, open_engine
from batchsync.errors import BatchsyncError, first_line
from batchsync.slots import latest_slot, next_nightly
from batchsync.workdir import WorkDir

MISSED_AFTER = timedelta(minutes=15)  # a slot not started this long after it was due is missed
STUCK_AFTER = timedelta(hours=1)  # a staged file still there after this is stuck
QUARANTINE_NOTICED_FOR = timedelta(days=1)  # a file left this long in quarantine (or held/) needs someone


@dataclass
class ProfileStatus:
    """One profile's state for ``status``, ``/healthz`` and the status page; healthy when it has no problems."""

    profile: str
    next_run: datetime | None = None
    last_runs: list[dict[str, Any]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    rejected_last_run: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def broken_status(name: str, error: str) -> ProfileStatus:
    """The status of a profile that cannot be loaded or used: its one problem is the error."""
    return ProfileStatus(name, problems=[f"profile cannot be used: {error}"])


def profile_status(profile: Profile, clock: Clock, runs: int = 5) -> ProfileStatus:
    now = clock.now()
    status = ProfileStatus(profile.name, next_nightly(profile, now))
    work = WorkDir.of(profile)
    staged = sorted(path for path in work.staging.rglob("*") if path.is_file() and not path.name.startswith("."))
    status.waiting = _files(work.inbox, "inbox") + [f"staging/{path.relative_to(work.staging)}" for path in staged]
    kept = _files(work.quarantine, "quarantine") + _files(work.held, "held")
    status.quarantined = [name for name in kept if not name.endswith(".reason.txt")]
    status.problems += _old_files(work, staged, now)
    try:
        nightly = _read_runs(profile, status, runs)
    except BatchsyncError as exc:
        status.problems.insert(0, str(exc))
        return status
    status.problems[:0] = _night_problems(profile, nightly, now)
    return status


def _read_runs(profile: Profile, status: ProfileStatus, runs: int) -> dict[str, Any] | None:
    """Fill the last runs; return the last nightly attempt with whether the latest slot was attempted."""
    engine = open_engine(profile.database_url(), profile.database)
    try:
        if missing_tables(engine):
            return None
        with engine.connect() as connection:
            status.last_runs = ledger.last_runs(connection, profile.name, runs)
            nightly = ledger.last_nightly(connection, profile.name)
            if nightly is not None and nightly["outcome"] not in ("ok", "rejected"):
                nightly["mended"] = ledger.later_success(connection, profile.name, nightly["id"])
    except Exception as exc:  # a database that is down is reported, never a traceback
        raise BatchsyncError(f"cannot read the database: {first_line(exc)}") from None
    finally:
        engine.dispose()
    if status.last_runs:
        status.rejected_last_run = int((status.last_runs[0].get("counts") or {}).get("rejected", 0))
    return nightly


def _night_problems(profile: Profile, nightly: dict[str, Any] | None, now: datetime) -> list[str]:
    if nightly is None:  # never ran a night: nothing to have missed yet
        return []
    slot = latest_slot(profile, now)
    if slot is not None and nightly["slot"] != slot.name and now - slot.due > MISSED_AFTER:
        return [f"the {slot.name} run was missed (due {slot.due:%Y-%m-%d %H:%M} UTC, never started)"]
    if nightly.get("mended"):  # an admin's run or export ended well since
        return []
    if nightly["outcome"] == "failed":
        return [f"the {nightly['slot']} run failed: {nightly['message']}"]
    if nightly["outcome"] == "interrupted":
        return [f"the {nightly['slot']} run was interrupted by a stop; it runs again at the daemon's next start"]
    if nightly["outcome"] == "stopped":
        return [f"the {nightly['slot']} run held exports back: {nightly['message']}"]
    return []


def _old_files(work: WorkDir, staged: list[Path], now: datetime) -> list[str]:
    problems = []
    stuck = [path.name for path in staged if _age(path, now) > STUCK_AFTER]
    if stuck:
        problems.append(f"{len(stuck)} files stuck in staging for over an hour: {', '.join(stuck[:5])}")
    notes = [path for folder in (work.quarantine, work.held) if folder.is_dir() for path in folder.glob("*.reason.txt")]
    old = [path.name.removesuffix(".reason.txt") for path in notes if _age(path, now) > QUARANTINE_NOTICED_FOR]
    if old:
        problems.append(f"{len(old)} files in quarantine or held/ for over a day: {', '.join(sorted(old)[:5])}")
    return problems


def _age(path: Path, now: datetime) -> timedelta:
    try:
        return now - datetime.fromtimestamp(path.stat().st_mtime, now.tzinfo)
    except OSError:
        return timedelta(0)


def _files(folder: Path, label: str) -> list[str]:
    if not folder.is_dir():
        return []
    return [f"{label}/{path.name}" for path in sorted(folder.iterdir()) if path.is_file() and path.name[0] != "."]


def as_json(statuses: list[ProfileStatus]) -> str:
    return json.dumps([_as_dict(status) for status in statuses], default=_json_default, indent=2)


def _as_dict(status: ProfileStatus) -> dict[str, Any]:
    return {**asdict(status), "healthy": status.healthy}


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def as_table(statuses: list[ProfileStatus]) -> str:
    lines: list[str] = []
    for status in statuses:
        due = status.next_run.isoformat(timespec="minutes") if status.next_run else "not scheduled"
        lines += [
            f"profile {status.profile}: {'ok' if status.healthy else 'NEEDS ATTENTION'}",
            *(f"  problem: {problem}" for problem in status.problems),
            f"  next run:       {due}",
            f"  waiting files:  {len(status.waiting)}" + _listed(status.waiting),
            f"  quarantined:    {len(status.quarantined)}" + _listed(status.quarantined),
            f"  rejected rows in the last run: {status.rejected_last_run}",
            f"  {'run':>5} {'kind':<7} {'started (UTC)':<17} {'outcome':<9} counts",
        ]
        for run in status.last_runs:
            lines += _run_lines(run)
        if not status.last_runs:
            lines.append("  (no runs yet)")
        lines.append("")
    return "\n".join(lines)


def _run_lines(run: dict[str, Any]) -> list[str]:
    counts = ", ".join(f"{key}={value}" for key, value in (run.get("counts") or {}).items() if value)
    started = run["started_at"].strftime("%Y-%m-%d %H:%M")
    line = f"  {run['id']:>5} {run['kind']:<7} {started:<17} {run['outcome']:<9} {counts}"
    return [line] + ([f"        {run['message']}"] if run.get("message") and run["outcome"] != "ok" else [])


def _listed(names: list[str]) -> str:
    return f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
