"""The command line as a user runs it: the installed `batchsync` script, its output and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from batchsync.cli import main
from batchsync.db.schema import bs_runs, subscriptions

from .conftest import ROOT
from .crmdata import UNSUB_HEADER, unsub_row, write_csv


def batchsync(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchsync.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_demo_runs_the_whole_loop_and_prints_a_summary(tmp_path: Path) -> None:
    done = batchsync("demo", "--dir", str(tmp_path / "demo"), "--contacts", "500", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "batchsync demo: done" in done.stdout
    assert "rows rejected:  0" in done.stdout
    provider = tmp_path / "demo" / "provider"
    assert sorted(p.name for p in (provider / "import").iterdir()) == ["1", "2", "3"]
    assert len(list((provider / "export" / "processed").iterdir())) == 1
    engine = create_engine(f"sqlite:///{tmp_path / 'demo' / 'crm.sqlite'}")
    with engine.connect() as connection:
        assert (
            connection.scalar(
                select(func.count()).select_from(subscriptions).where(subscriptions.c.source == "provider")
            )
            > 0
        )
    engine.dispose()
    again = batchsync("demo", "--dir", str(tmp_path / "demo"), "--contacts", "500", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    done = batchsync("demo", "--dir", str(tmp_path / "mine"), cwd=tmp_path)
    assert done.returncode == 2
    assert "was not made by the demo" in done.stderr
    assert (tmp_path / "mine" / "precious.txt").exists()


def _profile(tmp_path: Path) -> Path:
    text = (ROOT / "profiles" / "mailup.toml").read_text(encoding="utf-8")
    text = text.replace('url_env = "BATCHSYNC_CRM_URL"', f'url = "sqlite:///{tmp_path}/crm.sqlite"')
    text = text.replace('dir = "../var/mailup"', f'dir = "{tmp_path}/work"')
    text = text.replace('kind = "ftp"', f'kind = "local"\npath = "{tmp_path}/provider"')
    text = text.replace("min_age_seconds = 120", "min_age_seconds = 0")
    path = tmp_path / "local.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_init_samples_run_and_import_with_rejected_rows_exit_3(tmp_path: Path) -> None:
    profile = str(_profile(tmp_path))
    planned = batchsync("init", "-p", profile, "--dry-run", cwd=tmp_path)
    assert planned.returncode == 0 and "would create" in planned.stdout and "bs_snapshots" in planned.stdout
    assert not (tmp_path / "work").exists()
    assert batchsync("init", "-p", profile, cwd=tmp_path).returncode == 0
    assert batchsync("init", "-p", profile, cwd=tmp_path).returncode == 0  # safe twice
    sampled = batchsync("samples", "-p", profile, "--contacts", "300", "--files-to", str(tmp_path / "s"), cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert "300 contacts" in sampled.stdout
    missing = batchsync("run", "-p", profile, "--full", cwd=tmp_path)  # the provider's inbox folder is not there
    assert missing.returncode == 2 and "the remote folder 'export' does not exist" in missing.stderr
    (tmp_path / "provider" / "export").mkdir(parents=True)
    ran = batchsync("run", "-p", profile, "--full", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "export full newsletter" in ran.stdout
    write_csv(
        tmp_path / "work" / "inbox" / "unsubscribers_x.csv",
        [
            UNSUB_HEADER,
            unsub_row("jose.1@example.org", "1", "20260105T100000", "2"),
            unsub_row("broken", "1", "20260105T100000", "2"),
        ],
    )
    imported = batchsync("import", "-p", profile, cwd=tmp_path)
    assert imported.returncode == 3, imported.stderr
    assert "1 rejected" in imported.stdout
    engine = create_engine(f"sqlite:///{tmp_path}/crm.sqlite")
    with engine.connect() as connection:
        kinds = [row[0] for row in connection.execute(select(bs_runs.c.kind, bs_runs.c.outcome))]
        outcomes = [row[1] for row in connection.execute(select(bs_runs.c.kind, bs_runs.c.outcome))]
    engine.dispose()
    assert kinds == ["run", "run", "import"] and outcomes == ["failed", "ok", "rejected"]


def test_help_explains_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "init", "samples", "export", "import", "run"):
        assert command in out
    assert main(["export", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out


def test_an_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--nope"]) == 2


def test_json_log_lines(tmp_path: Path) -> None:
    import json

    profile = str(_profile(tmp_path))
    done = batchsync("--log-format", "json", "samples", "-p", profile, "--contacts", "50", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = batchsync("--log-format", "json", "export", "-p", profile, "--full", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert entries and {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(entry["logger"] == "batchsync.export" and "full export" in entry["message"] for entry in entries)


def test_progress_is_shown_only_to_a_listener() -> None:
    import io

    from batchsync import progress

    stream = io.StringIO()
    progress.report("export newsletter", 10_000)  # nobody listening: nothing happens
    progress.set_listener(progress.TerminalProgress(stream))
    try:
        progress.report("export newsletter", 20_000)
    finally:
        progress.set_listener(None)
    assert stream.getvalue() == "\rexport newsletter: 20,000 rows "
