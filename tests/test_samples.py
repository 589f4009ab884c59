"""The sample CRM: deterministic for a seed, and as messy as a real one."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from batchsync.db.schema import contacts
from batchsync.samples import write_sample_crm, write_unsubscribers_file
from batchsync.sync import Sync

from .conftest import mailup_profile
from .crmdata import read_csv


def _sample(folder: Path, seed: int) -> tuple[list[tuple[object, ...]], Path, object]:
    profile = mailup_profile(folder, f"sqlite:///{folder / 'crm.sqlite'}")
    sync = Sync(profile)
    sync.init()
    summary = write_sample_crm(sync.engine, profile, contacts=3000, seed=seed, chunk=1000)
    path = write_unsubscribers_file(folder / "unsubscribers.csv", summary.picks, profile, seed=seed)
    with sync.engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(select(contacts).order_by(contacts.c.id))]
    sync.engine.dispose()
    return rows, folder / "unsubscribers.csv", summary if path else None


def test_the_same_seed_gives_the_same_crm_and_files(tmp_path: Path) -> None:
    first, file_a, _ = _sample(tmp_path / "a", 7)
    second, file_b, _ = _sample(tmp_path / "b", 7)
    assert first == second
    assert file_a.read_bytes() == file_b.read_bytes()


def test_the_sample_is_realistic(tmp_path: Path) -> None:
    rows, unsubscribers, summary = _sample(tmp_path, 3)
    assert len(rows) == 3000
    assert summary.duplicates > 0 and summary.invalid > 0 and summary.suppressed > 0  # type: ignore[attr-defined]
    names = " ".join(f"{row[3]} {row[4]}" for row in rows)
    assert any(ord(char) > 0x3000 for char in names)  # CJK
    assert any("\u0400" <= char <= "\u04ff" for char in names)  # Cyrillic
    assert "é" in names or "ü" in names
    emails = [row[1] for row in rows]
    assert any(email != email.strip() for email in emails)  # surrounding spaces
    file_rows = read_csv(unsubscribers)
    assert file_rows[0][:4] == ["email", "mobile", "idList", "OptOut_Date"]
    assert {row[7] for row in file_rows[1:]} == {"0", "1", "2", "4", "8", "16"}
