"""Bench: full export, diff export (1% changed) and import of a 100k-row unsubscribers file, with peak RSS.

Makes its own CRM for each size, runs every step in a fresh process (so each peak RSS is that step's own) and
prints a table. Not a test: it prints figures and asserts nothing.

    python bench/bench_sync.py                      # 100k and 1M contacts on SQLite
    python bench/bench_sync.py --sizes 10000        # a quick look
    python bench/bench_sync.py --pg postgresql://postgres@127.0.0.1:5432/postgres
    python bench/bench_sync.py --pg URL --mapped    # the same on the views of samples/mapped_crm
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchsync.clock import ManualClock  # noqa: E402
from batchsync.config import Profile, load_profile  # noqa: E402
from batchsync.db.mapping import crm_tables  # noqa: E402
from batchsync.samples import write_sample_crm  # noqa: E402
from batchsync.sync import Sync  # noqa: E402

NOW = datetime(2026, 2, 1, 3, 0, tzinfo=UTC)


MAPPED_CRM = ROOT / "samples" / "mapped_crm"


def profile_for(folder: Path, url: str, mapped: bool = False) -> Profile:
    """The MailUp profile on the bench's CRM; ``mapped``: mapped as samples/mapped_crm/profile.toml says."""
    keys = tomllib.loads((MAPPED_CRM / "profile.toml").read_text(encoding="utf-8"))["database"] if mapped else {}
    mapping = {key: value for key, value in keys.items() if key in ("schema", "tables")}
    return load_profile(
        ROOT / "profiles" / "mailup.toml",
        overrides={
            "database": {"url": url, **mapping},
            "work.dir": str(folder / "work"),
            "transport": {"kind": "local", "path": str(folder / "provider")},
            "inbound.0.min_age_seconds": 0.0,
        },
    )


def step(name: str, folder: Path, url: str, size: int, mapped: bool = False) -> dict[str, Any]:
    """One measured step, run in this (fresh) process."""
    profile = profile_for(folder, url, mapped)
    sync = Sync(profile, clock=ManualClock(NOW))
    started = time.perf_counter()
    rows = 0
    if name == "make":
        sync.init()
        rows = write_sample_crm(sync.engine, profile, contacts=size, seed=11).contacts
    elif name == "full":
        rows = sync.export("full").rows
    elif name == "change":
        rows = change_one_percent(sync)
    elif name == "diff":
        rows = sync.export("diff").rows
    elif name == "unsubs":
        rows = write_unsubscribers(sync, folder / "unsubscribers_bench.csv", 100_000)
    elif name == "import":
        report = sync.import_files([folder / "unsubscribers_bench.csv"], force=True, origin="provider")
        rows = sum(item.rows for item in report.files)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step": name, "rows": rows, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1)}


def change_one_percent(sync: Sync) -> int:
    with sync.engine.begin() as connection:
        contacts = crm_tables(connection).sql_name("contacts", connection)
        total = connection.scalar(text(f"SELECT count(*) FROM {contacts}")) or 0
        step_size = 100
        return (
            connection.execute(
                text(f"UPDATE {contacts} SET first_name = first_name || 'x' WHERE id % :n = 0"), {"n": step_size}
            ).rowcount
            or total // step_size
        )


def write_unsubscribers(sync: Sync, path: Path, rows: int) -> int:
    rng = random.Random(5)
    with sync.engine.connect() as connection:
        contacts = crm_tables(connection).sql_name("contacts", connection)
        found = connection.execute(text(f"SELECT email FROM {contacts} WHERE email LIKE '%@%.%'"))
        emails = [row[0] for row in found]
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = (NOW - timedelta(days=1)).strftime("%Y%m%dT%H%M%S")
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write("email;mobile;idList;OptOut_Date;optout_nl;optout_type;optout_subtype\r\n")
        for index in range(rows):
            email = emails[index % len(emails)].strip()
            kind = rng.choice(["2", "2", "2", "0", "4", "8", "16"])
            handle.write(f"{email};;{rng.choice('123')};{stamp};1;{kind};\r\n")
    return rows


def run_child(name: str, folder: Path, url: str, size: int, mapped: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--step", name, "--folder", str(folder), "--url", url, "--size", str(size)]
    command += ["--mapped"] if mapped else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def database_for(base: str | None, folder: Path, size: int, mapped: bool = False) -> str:
    if base is None:
        if mapped:
            raise SystemExit("--mapped needs --pg: the example CRM is PostgreSQL's")
        return f"sqlite:///{folder / 'crm.sqlite'}"
    from batchsync.db.schema import make_engine

    name = f"bench_{size}_{int(time.time())}"
    admin = make_engine(base).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = base.rsplit("/", 1)[0] + "/" + name
    if mapped:  # the example CRM, loaded as its header says
        load = ["psql", "-v", "ON_ERROR_STOP=1", "-q", "-d", url, "-f", str(MAPPED_CRM / "postgresql.sql")]
        subprocess.run(load, check=True, capture_output=True)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="contact counts, comma separated")
    parser.add_argument("--pg", help="a PostgreSQL URL to an admin database; default: SQLite files")
    parser.add_argument("--mapped", action="store_true", help="on the views of samples/mapped_crm (needs --pg)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"), help="working folder")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, Path(args.folder), args.url, args.size, args.mapped)))
        return
    backend = ("mapped-" if args.mapped else "") + ("postgresql" if args.pg else "sqlite")
    print(f"{'contacts':>10} {'step':>8} {'rows':>10} {'seconds':>8} {'rows/s':>10} {'peak RSS MB':>12}  ({backend})")
    peaks: dict[int, float] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        folder = Path(args.out) / f"{backend}_{size}"
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        folder.mkdir(parents=True)
        url = database_for(args.pg, folder, size, args.mapped)
        for name in ("make", "full", "change", "diff", "unsubs", "import"):
            result = run_child(name, folder, url, size, args.mapped)
            rate = result["rows"] / result["seconds"] if result["seconds"] else 0
            print(
                f"{size:>10} {name:>8} {result['rows']:>10} {result['seconds']:>8} {rate:>10.0f} "
                f"{result['peak_rss_mb']:>12}",
                flush=True,
            )
            if name not in ("make", "change", "unsubs"):  # the bench's own set-up steps
                peaks[size] = max(peaks.get(size, 0.0), result["peak_rss_mb"])
    sizes = sorted(peaks)
    if len(sizes) > 1:
        print(
            f"peak RSS of sync steps: {peaks[sizes[-1]]} MB at {sizes[-1]} vs {peaks[sizes[0]]} MB at {sizes[0]}: "
            f"{peaks[sizes[-1]] / peaks[sizes[0]]:.2f}x"
        )


if __name__ == "__main__":
    main()
