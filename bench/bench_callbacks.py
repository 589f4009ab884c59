"""Bench: provider callbacks at a steady rate into the real daemon process, on loopback.

Starts `batchsync daemon --listen` on a sample SQLite CRM, sends Mailchimp `unsubscribe` webhooks (form-encoded,
each for a different subscribed address) at RATE a second for SECONDS, then waits until every one is in the CRM.
Prints the answers' p50/p99/max, the calls refused, how long the CRM took to hold them all, and the daemon's
peak RSS. Not a test: it prints figures and asserts nothing.

    python bench/bench_callbacks.py                       # 1,000 a second for 10 s
    python bench/bench_callbacks.py --rate 200 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchsync.config import load_profile  # noqa: E402
from batchsync.db.schema import bs_changes, contacts, lists, subscriptions  # noqa: E402
from batchsync.rules import email_problem  # noqa: E402
from batchsync.samples import write_sample_crm  # noqa: E402
from batchsync.sync import Sync  # noqa: E402

KEY = "bench-key-0f9e"
CALLBACK = """
[[callback]]
name = "mailchimp"
format = "mailchimp"
secret_env = "BENCH_HOOK_KEY"
max_per_second = 100000
"""


def make_profile(folder: Path, contacts_count: int) -> Path:
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    text = text.replace('url_env = "BATCHSYNC_CRM_URL"', f'url = "sqlite:///{folder / "crm.sqlite"}"')
    text = text.replace('dir = "../var/mailup"', f'dir = "{folder}/work"')
    text = text.replace('kind = "ftp"', f'kind = "local"\npath = "{folder}/provider"')
    # The bench opts out a large share of the list on purpose: past the inbound safety stop, which would
    # otherwise quarantine the cut files (as it should for a real burst of opt-outs).
    text = text.replace("max_unsubscribe_share = 0.2 ", "max_unsubscribe_share = 1.0 ")
    (folder / "provider" / "export").mkdir(parents=True)
    path = folder / "bench.toml"
    path.write_text(text + CALLBACK, encoding="utf-8")
    sync = Sync(load_profile(path))
    sync.init()
    write_sample_crm(sync.engine, sync.profile, contacts=contacts_count, seed=7)
    sync.engine.dispose()
    return path


def subscribed_addresses(profile: Path, wanted: int) -> list[str]:
    sync = Sync(load_profile(profile))
    query = (
        select(contacts.c.email_key)
        .join(subscriptions, subscriptions.c.contact_id == contacts.c.id)
        .join(lists, lists.c.id == subscriptions.c.list_id)
        .where(lists.c.code == "newsletter", subscriptions.c.status == "subscribed")
        .group_by(contacts.c.email_key)
        .having(func.count() == 1)
    )
    with sync.engine.connect() as connection:  # the sample's invalid addresses would be rejected rows
        found = [row[0] for row in connection.execute(query) if email_problem(row[0]) is None]
    sync.engine.dispose()
    return found[:wanted]


def changes(profile: Path) -> int:
    sync = Sync(load_profile(profile))
    with sync.engine.connect() as connection:
        count = int(connection.scalar(select(func.count()).select_from(bs_changes)) or 0)
    sync.engine.dispose()
    return count


async def send(url: str, addresses: list[str], rate: int) -> tuple[list[float], dict[int, int]]:
    fired = f"{datetime.now(UTC) - timedelta(minutes=1):%Y-%m-%d %H:%M:%S}"
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(email: str) -> None:
            body = urlencode({"type": "unsubscribe", "fired_at": fired, "data[list_id]": "1", "data[email]": email,
                              "data[action]": "unsub", "data[reason]": "manual"})  # fmt: skip
            started = time.perf_counter()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - started)

        tasks = []
        start = time.perf_counter()
        for index, email in enumerate(addresses):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(email)))
        await asyncio.gather(*tasks)
    return latencies, statuses


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    arguments = parser.parse_args()
    total = arguments.rate * arguments.seconds
    folder = Path(tempfile.mkdtemp(prefix="bench-callbacks-"))
    profile = make_profile(folder, contacts_count=int(total * 2.5))
    addresses = subscribed_addresses(profile, total)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (folder / "daemon.log").open("wb")
    command = [sys.executable, "-m", "batchsync.cli", "daemon", str(profile), "--listen", f"127.0.0.1:{port}"]
    daemon = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, "BENCH_HOOK_KEY": KEY})
    try:
        time.sleep(3)
        before = changes(profile)
        url = f"http://127.0.0.1:{port}/hooks/mailup/mailchimp?key={KEY}"
        sent_at = time.perf_counter()
        latencies, statuses = asyncio.run(send(url, addresses, arguments.rate))
        sending = time.perf_counter() - sent_at
        while changes(profile) - before < len(addresses) and time.perf_counter() - sent_at < 300:
            time.sleep(0.5)
        landed = changes(profile) - before
        settled = time.perf_counter() - sent_at
        rss = peak_rss_mb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    latencies.sort()
    print(f"callbacks: {len(addresses)} sent in {sending:.1f} s ({len(addresses) / sending:.0f}/s), answers {statuses}")
    print(f"answer time: p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")  # fmt: skip
    print(f"in the CRM: {landed} of {len(addresses)} changes ({'none lost' if landed >= len(addresses) else 'LOST'}), "
          f"all there {settled:.1f} s after the first call")  # fmt: skip
    print(f"daemon peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
