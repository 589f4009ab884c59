"""The sample CRM: deterministic for a seed, and as messy as a real one."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, select

from batchsync.db.schema import contacts, group_members, groups, lists, subscriptions, suppressions
from batchsync.samples import OPTOUT_TYPES, write_sample_crm, write_unsubscribers_file
from batchsync.sync import Sync

from .conftest import mailup_profile
from .crmdata import read_csv


def _sample(folder: Path, seed: int, url: str | None = None) -> tuple[list[tuple[object, ...]], Path, object]:
    profile = mailup_profile(folder, url or f"sqlite:///{folder / 'crm.sqlite'}")
    sync = Sync(profile)
    sync.init()
    summary = write_sample_crm(sync.engine, profile, contacts=3000, seed=seed, chunk=1000)
    path = write_unsubscribers_file(folder / "unsubscribers.csv", summary.picks, profile, seed=seed)
    rows = _contents(sync.engine)
    sync.engine.dispose()
    return rows, folder / "unsubscribers.csv", summary if path else None


def _contents(engine: Engine) -> list[tuple[object, ...]]:
    """Contacts, then every subscription, membership and suppression, by codes rather than database ids."""
    with engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(select(contacts).order_by(contacts.c.id))]
        s = subscriptions.c
        joined = select(s.contact_id, lists.c.code, s.status, s.status_at, s.consent_at).join(lists)
        rows += sorted(tuple(row) for row in connection.execute(joined))
        members = select(group_members.c.contact_id, groups.c.code).join(groups)
        rows += sorted(tuple(row) for row in connection.execute(members))
        rows += sorted(tuple(row) for row in connection.execute(select(suppressions)))
    return rows


def test_the_same_seed_gives_the_same_crm_and_files(tmp_path: Path) -> None:
    first, file_a, _ = _sample(tmp_path / "a", 7)
    second, file_b, _ = _sample(tmp_path / "b", 7)
    assert first == second
    assert file_a.read_bytes() == file_b.read_bytes()


def test_the_same_seed_gives_the_same_crm_on_sqlite_and_postgresql(tmp_path: Path, pg_server: str) -> None:
    from .conftest import make_database

    on_sqlite, file_a, _ = _sample(tmp_path / "a", 11)
    on_postgresql, file_b, _ = _sample(tmp_path / "b", 11, make_database(pg_server))
    assert on_sqlite == on_postgresql
    assert file_a.read_bytes() == file_b.read_bytes()


def test_the_sample_is_realistic(tmp_path: Path) -> None:
    rows, unsubscribers, summary = _sample(tmp_path, 3)
    rows = [row for row in rows if len(row) == len(contacts.c)]
    assert len(rows) == 3000
    assert summary.duplicates > 0 and summary.invalid > 0 and summary.suppressed > 0  # type: ignore[attr-defined]
    names = " ".join(f"{row[3]} {row[4]}" for row in rows)
    assert any(ord(char) > 0x3000 for char in names)  # CJK
    assert any("\u0400" <= char <= "\u04ff" for char in names)  # Cyrillic
    assert "é" in names or "ü" in names
    emails = [row[1] for row in rows]
    assert any(email != email.strip() for email in emails)  # surrounding spaces
    file_rows = read_csv(unsubscribers)
    assert file_rows[0][:5] == ["email", "Phone Number", "idList", "OptOut_Date", "Subscription Date"]
    assert {row[6] for row in file_rows[1:]} == set(OPTOUT_TYPES)
