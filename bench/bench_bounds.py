"""Lower bounds: what parts of an export cost on SQLite with batchsync's own code taken out.

On a copy of a sample CRM, it times
  python-floor  the rows of each list read in email order and written by Python's csv module, nothing else
  ledger-floor  the first export's ledger written entirely inside SQLite: INSERT ... SELECT into bs_pending,
                then the commit into bs_exported, no Python
so that the scale bench's figures can be read against them. Not a test: it prints figures and asserts nothing.

    python bench/bench_bounds.py --contacts 1000000
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sync import NOW, profile_for  # noqa: E402

from batchsync.clock import ManualClock  # noqa: E402
from batchsync.samples import write_sample_crm  # noqa: E402
from batchsync.sync import Sync  # noqa: E402

ROWS = (
    "SELECT c.email, c.first_name, c.last_name, s.status FROM contacts c "
    "JOIN subscriptions s ON s.contact_id = c.id AND s.list_id = ? WHERE NOT c.deleted ORDER BY c.email_key, c.id"
)
STAGE = (
    "INSERT INTO bs_pending (profile, list_code, email_key, email, contact_id, fingerprint, status, origin, at) "
    "SELECT 'bench', l.code, c.email_key, min(c.email), min(c.id), 0, min(s.status), 'export', ? "
    "FROM contacts c JOIN subscriptions s ON s.contact_id = c.id JOIN lists l ON l.id = s.list_id "
    "WHERE NOT c.deleted AND l.id = ? GROUP BY c.email_key"
)


def python_floor(database: Path, out: Path) -> tuple[int, float]:
    connection = sqlite3.connect(database)
    started, rows = time.perf_counter(), 0
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=";")
        for (list_id,) in connection.execute("SELECT id FROM lists ORDER BY id").fetchall():
            cursor = connection.execute(ROWS, (list_id,))
            while batch := cursor.fetchmany(10_000):
                writer.writerows(batch)
                rows += len(batch)
    return rows, time.perf_counter() - started


def ledger_floor(database: Path) -> tuple[float, float]:
    connection = sqlite3.connect(database, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    started = time.perf_counter()
    connection.execute("BEGIN")
    for (list_id,) in connection.execute("SELECT id FROM lists ORDER BY id").fetchall():
        connection.execute(STAGE, (NOW.strftime("%Y-%m-%d %H:%M:%S.%f"), list_id))
    connection.execute("COMMIT")
    staged = time.perf_counter() - started
    started = time.perf_counter()
    connection.execute("BEGIN")
    connection.execute("INSERT INTO bs_exported SELECT * FROM bs_pending")
    connection.execute("DELETE FROM bs_pending")
    connection.execute("COMMIT")
    return staged, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contacts", type=int, default=1_000_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batchsync-bounds-"))
    try:
        database = folder / "crm.sqlite"
        sync = Sync(profile_for(folder, f"sqlite:///{database}"), clock=ManualClock(NOW))
        sync.init()
        write_sample_crm(sync.engine, sync.profile, contacts=args.contacts, seed=11)
        sync.engine.dispose()
        copy = folder / "ledger.sqlite"
        shutil.copy(database, copy)
        rows, seconds = python_floor(database, folder / "rows.csv")
        print(f"python-floor  {rows} rows in {seconds:.2f} s (read in email order per list + csv.writer)")
        staged, committed = ledger_floor(copy)
        print(f"ledger-floor  staged in {staged:.2f} s, committed in {committed:.2f} s (SQL only)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
