"""The whole loop on embedded defaults: a sample SQLite CRM, a local FTP server as MailUp, export, return, import.

``run_demo(folder)`` makes everything inside ``folder`` and returns a :class:`DemoSummary`; the CLI prints it.
The FTP password is random for each demo and reaches the profile through the environment, as a real one would.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from batchsync.clock import Clock, utc_stamp
from batchsync.config import builtin_profile_path, load_profile
from batchsync.errors import ConfigError
from batchsync.export import ExportResult
from batchsync.ftpserver import LoopbackFtpServer
from batchsync.samples import SampleSummary, write_sample_crm, write_unsubscribers_file
from batchsync.sync import ImportReport, Sync

MARKER = ".batchsync-demo"
PASSWORD_ENV = "BATCHSYNC_DEMO_FTP_PASSWORD"


@dataclass
class DemoSummary:
    """What ``batchsync demo`` made and did, for the CLI to print."""

    folder: Path
    crm_url: str
    samples: SampleSummary
    exported: ExportResult
    returned_file: Path
    imported: ImportReport
    provider_root: Path


def run_demo(folder: Path, *, contacts: int = 2_000, seed: int = 7, clock: Clock | None = None) -> DemoSummary:
    clock = clock or Clock()
    folder = folder.resolve()
    _fresh_folder(folder)
    provider_root = folder / "provider"
    os.environ[PASSWORD_ENV] = secrets.token_urlsafe(18)
    with LoopbackFtpServer(provider_root, "provider", os.environ[PASSWORD_ENV]) as server:
        profile = load_profile(
            builtin_profile_path("demo"), overrides={"base_dir": str(folder), "transport.port": server.port}
        )
        sync = Sync(profile, clock=clock)
        sync.init()
        samples = write_sample_crm(sync.engine, profile, contacts=contacts, seed=seed)
        exported = sync.export("full")
        # Play MailUp: leave tonight's unsubscribers file in its export/ folder.
        returned = provider_root / "export" / f"unsubscribers_{utc_stamp(clock.now())}.csv"
        write_unsubscribers_file(returned, samples.picks[:30], profile, seed=seed)
        imported = sync.import_files()
        sync.engine.dispose()
    return DemoSummary(folder, profile.database_url(), samples, exported, returned, imported, provider_root)


def _fresh_folder(folder: Path) -> None:
    """Start from nothing, but only ever wipe a folder an earlier demo made."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise ConfigError(f"{folder} exists and was not made by the demo; choose another folder with --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by batchsync demo; removed by the next demo\n", encoding="utf-8")
