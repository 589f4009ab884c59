"""Lower bounds: what parts of an export cost on SQLite with batchsync's own code taken out.

On a copy of a sample CRM, it times
  python-floor  the rows of each list read in email order and written by Python's csv module, nothing else
  ledger-floor  the first export's ledger written entirely inside SQLite: INSERT ... SELECT into bs_pending,
                then the commit into bs_exported, no Python
  import-floor  the writes an import of 100k unsubscribers must make, done in SQL: the file read by csv into a
                temporary table, then one statement each for the activities, the audit trail, the statuses,
                the ledger's provider statuses and the suppressions, and the result file; no sync rules
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

from bench_sync import NOW, profile_for, write_unsubscribers  # noqa: E402

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


EVENTS = (  # optout_type -> new status, every list (bounce, complaint) or the row's, suppressed
    {"0": ("unsubscribed", 0), "1": ("unsubscribed", 0), "2": ("unsubscribed", 0), "4": ("unsubscribed", 0)}
    | {"8": ("cleaned", 1), "16": ("unsubscribed", 1)}
)
IMPORT_STEPS = (
    "CREATE TEMP TABLE d AS SELECT e.*, c.id AS contact_id, s.status AS old FROM bs_events e "
    "JOIN contacts c ON c.email_key = e.email_key AND NOT c.deleted "
    "LEFT JOIN subscriptions s ON s.contact_id = c.id AND s.list_id = e.list_id",
    "INSERT INTO activities (contact_id, kind, at, detail) SELECT DISTINCT contact_id, 'unsubscribe', at, "
    "'bench:' || line FROM d",
    "INSERT INTO bs_changes (run_id, contact_id, list_code, old_status, new_status, rule, source_file, "
    "source_line, at) SELECT 1, contact_id, code, old, status, 'opt-out newer than CRM state', 'bench', line, at "
    "FROM d WHERE old IS NULL OR old NOT IN ('unsubscribed', 'cleaned')",
    "UPDATE subscriptions SET status = d.status, status_at = d.at, source = 'provider', reason = 'bench' FROM d "
    "WHERE subscriptions.contact_id = d.contact_id AND subscriptions.list_id = d.list_id "
    "AND subscriptions.status NOT IN ('unsubscribed', 'cleaned')",
    "INSERT OR IGNORE INTO subscriptions (contact_id, list_id, status, status_at, source, reason) "
    "SELECT contact_id, list_id, status, at, 'provider', 'bench' FROM d WHERE old IS NULL",
    "CREATE TEMP TABLE noted (code TEXT, email_key TEXT, status TEXT, PRIMARY KEY (code, email_key)) WITHOUT ROWID",
    "INSERT OR REPLACE INTO noted SELECT code, email_key, status FROM d",
    "UPDATE bs_exported SET status = (SELECT n.status FROM noted n WHERE n.code = bs_exported.list_code "
    "AND n.email_key = bs_exported.email_key), origin = 'provider', source_digest = NULL "
    "WHERE (profile, list_code, email_key) IN (SELECT 'bench', code, email_key FROM noted)",
    "INSERT OR IGNORE INTO suppressions (email_key, email, reason, at, source) "
    "SELECT email_key, email, 'complaint', at, 'bench' FROM d WHERE suppress",
)


def import_floor(database: Path, unsubscribers: Path, list_codes: dict[str, str]) -> float:
    """Seconds to apply the unsubscribers file with SQL statements, after reading it with csv (see IMPORT_STEPS)."""
    connection = sqlite3.connect(database, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    started = time.perf_counter()
    ids = dict(connection.execute("SELECT code, id FROM lists").fetchall())
    at = (NOW.replace(tzinfo=None)).strftime("%Y-%m-%d %H:%M:%S.%f")
    events = []
    with unsubscribers.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=";")
        next(reader)
        for line, row in enumerate(reader, start=2):
            email, provider_list, kind = row[0].strip(), row[2], row[5]
            status, every_list = EVENTS[kind]
            for code in list_codes.values() if every_list else [list_codes[provider_list]]:
                events.append((line, email.lower(), email, ids[code], code, status, at, every_list))
    connection.execute("BEGIN")
    connection.execute("SELECT list_id, count(*) FROM subscriptions WHERE status = 'subscribed' GROUP BY list_id")
    connection.execute(
        "CREATE TEMP TABLE bs_events (line INT, email_key TEXT, email TEXT, list_id INT, code TEXT, status TEXT, "
        "at TEXT, suppress INT)"
    )
    connection.executemany("INSERT INTO bs_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", events)
    for statement in IMPORT_STEPS:
        connection.execute(statement)
    with (unsubscribers.parent / "result.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, delimiter=";").writerows(connection.execute("SELECT line, email, code, old, status FROM d"))
    connection.execute("COMMIT")
    return time.perf_counter() - started


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
        unsubscribers = folder / "unsubscribers.csv"
        rows = write_unsubscribers(sync, unsubscribers, 100_000)
        codes = {item.id: code for code, item in sync.profile.lists.items()}
        seconds = import_floor(copy, unsubscribers, codes)
        print(f"import-floor  {rows} rows in {seconds:.2f} s = {rows / seconds:.0f} rows/s (SQL, no sync rules)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
