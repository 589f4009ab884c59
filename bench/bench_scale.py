"""Scale bench: batchsync against the floor and against the script a user would write, side by side.

For each size (contacts x 3 lists) and backend it makes its own CRM, then runs, each in a fresh process:
  floor     the rows dumped by ``sqlite3 -csv`` or ``psql \\copy``, then uploaded by OpenSSH's ``sftp``
  pandas    read_sql, to_csv, paramiko put: the script a user would write
  full      batchsync's first full export, uploaded over SFTP to OpenSSH's sshd, the ledger update included
  refull    the next full export: every row written and uploaded again, the ledger already current
  diff      batchsync diff export after 1% of the contacts changed
  import    batchsync import of a 100k-row unsubscribers file
and prints wall time, rows/s, peak RSS and the ratio to the floor. Not a test: it asserts nothing.

    python bench/bench_scale.py --sizes 1000000                 # SQLite
    python bench/bench_scale.py --sizes 1000000 --pg postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_sync import NOW, change_one_percent, database_for, write_unsubscribers  # noqa: E402

from batchsync.clock import ManualClock  # noqa: E402
from batchsync.config import Profile, load_profile  # noqa: E402
from batchsync.samples import write_sample_crm  # noqa: E402
from batchsync.sync import Sync  # noqa: E402
from tests.peers import give_to, start_sshd  # noqa: E402

QUERY = (
    "SELECT c.email, c.first_name, c.last_name, l.code, s.status FROM subscriptions s "
    "JOIN contacts c ON c.id = s.contact_id JOIN lists l ON l.id = s.list_id WHERE NOT c.deleted"
)


def profile_for(folder: Path, url: str, ssh: dict[str, Any]) -> Profile:
    return load_profile(
        ROOT / "profiles" / "mailup.toml",
        overrides={
            "database": {"url": url},
            "work.dir": str(folder / "work"),
            "inbound.0.min_age_seconds": 0.0,
            "inbound.0.remote_dir": None,
            "transport": {
                "kind": "sftp",
                "host": "127.0.0.1",
                "port": ssh["port"],
                "user": ssh["user"],
                "known_hosts": ssh["known_hosts"],
                "key_file": ssh["key"],
                "path": ssh["root"],
            },
        },
    )


def step(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    folder, url = Path(spec["folder"]), spec["url"]
    started = time.perf_counter()
    rows = 0
    if name == "make":
        sync = Sync(profile_for(folder, url, spec["ssh"]), clock=ManualClock(NOW))
        sync.init()
        rows = write_sample_crm(sync.engine, sync.profile, contacts=spec["size"], seed=11).contacts
    elif name in ("full", "diff", "refull"):
        mode = "full" if name == "refull" else name
        rows = Sync(profile_for(folder, url, spec["ssh"]), clock=ManualClock(NOW)).export(mode).rows  # type: ignore[arg-type]
    elif name == "change":
        rows = change_one_percent(Sync(profile_for(folder, url, spec["ssh"])))
    elif name == "unsubs":
        rows = write_unsubscribers(Sync(profile_for(folder, url, spec["ssh"])), folder / "unsubscribers.csv", 100_000)
    elif name == "import":
        sync = Sync(profile_for(folder, url, spec["ssh"]), clock=ManualClock(NOW))
        rows = sum(
            item.rows for item in sync.import_files([folder / "unsubscribers.csv"], force=True, origin="provider").files
        )
    elif name == "floor":
        rows = floor(folder, url, spec["ssh"])
    elif name == "pandas":
        rows = pandas_peer(folder, url, spec["ssh"])
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"rows": rows, "seconds": round(seconds, 2), "peak_rss_mb": round(max(own, children) / 1024, 1)}


def floor(folder: Path, url: str, ssh: dict[str, Any]) -> int:
    out = folder / "floor.csv"
    if url.startswith("sqlite"):
        with out.open("wb") as handle:
            subprocess.run(["sqlite3", "-csv", url.removeprefix("sqlite:///"), QUERY], stdout=handle, check=True)
    else:
        plain = url.replace("postgresql+psycopg://", "postgresql://")
        subprocess.run(
            [
                "psql",
                plain,
                "-q",
                "-c",
                f"\\copy ({QUERY.replace('NOT c.deleted', 'NOT c.deleted')}) TO '{out}' CSV HEADER",
            ],
            check=True,
        )
    batch = folder / "sftp.batch"
    batch.write_text(f"put {out} {ssh['root']}/floor.csv\n")
    subprocess.run(
        [
            "sftp",
            "-q",
            "-b",
            str(batch),
            "-i",
            ssh["key"],
            "-P",
            str(ssh["port"]),
            "-o",
            f"UserKnownHostsFile={ssh['known_hosts']}",
            f"{ssh['user']}@127.0.0.1",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return sum(1 for _ in out.open("rb"))


def pandas_peer(folder: Path, url: str, ssh: dict[str, Any]) -> int:
    import pandas
    import paramiko
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    frame = pandas.read_sql(text(QUERY), engine)
    out = folder / "pandas.csv"
    frame.to_csv(out, sep=";", index=False)
    client = paramiko.SSHClient()
    client.load_host_keys(ssh["known_hosts"])
    client.connect("127.0.0.1", port=ssh["port"], username=ssh["user"], key_filename=ssh["key"])
    client.open_sftp().put(str(out), f"{ssh['root']}/pandas.csv")
    client.close()
    return len(frame)


def run_step(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--step", name, "--spec", json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,5000000")
    parser.add_argument("--pg", help="PostgreSQL URL of an admin database; default: SQLite files")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, json.loads(args.spec))))
        return
    backend = "postgresql" if args.pg else "sqlite"
    scratch = Path(tempfile.mkdtemp(prefix="batchsync-scale-"))
    scratch.chmod(0o755)
    server = start_sshd(scratch / "ssh")
    try:
        print(
            f"{'contacts':>9} {'step':>7} {'rows':>9} {'seconds':>8} {'rows/s':>9} {'peak MB':>8} "
            f"{'x floor':>8}  ({backend})",
            flush=True,
        )
        for size in (int(item) for item in args.sizes.split(",")):
            run_size(size, backend, args, server)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def run_size(size: int, backend: str, args: argparse.Namespace, server: Any) -> None:
    folder = Path(args.out) / f"scale_{backend}_{size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    remote = server.root / f"scale_{backend}_{size}"
    remote.mkdir(exist_ok=True)
    give_to(remote, server.user)
    ssh = {
        "port": server.port,
        "user": server.user,
        "known_hosts": str(server.known_hosts),
        "key": str(server.keys["ed25519"]),
        "root": str(remote),
    }
    spec = {"folder": str(folder), "url": database_for(args.pg, folder, size), "size": size, "ssh": ssh}
    floor_seconds = None
    for name in ("make", "floor", "pandas", "full", "refull", "change", "diff", "unsubs", "import"):
        result = run_step(name, spec)
        if name == "floor":
            floor_seconds = result["seconds"]
        if name in ("make", "change", "unsubs"):
            continue
        rate = result["rows"] / result["seconds"] if result["seconds"] else 0
        ratio = f"{result['seconds'] / floor_seconds:.1f}" if floor_seconds and name != "import" else ""
        print(
            f"{size:>9} {name:>7} {result['rows']:>9} {result['seconds']:>8} {rate:>9.0f} "
            f"{result['peak_rss_mb']:>8} {ratio:>8}",
            flush=True,
        )


if __name__ == "__main__":
    main()
