"""The ``batchsync`` command: parse arguments, call the library, print, and map errors to exit codes.

Nothing else in batchsync prints or exits. Exit codes: 0 done, 1 failed, 2 usage or configuration error,
3 done with rejected rows or files, 4 (``status``) a profile needs attention.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from batchsync import __version__
from batchsync.audit import address_history
from batchsync.audit import as_json as audit_json
from batchsync.audit import as_table as audit_table
from batchsync.check import run_checks
from batchsync.cli_echo import echo_demo, echo_export, echo_import, echo_revert
from batchsync.clock import Clock
from batchsync.config import Profile, load_profile
from batchsync.daemon import Daemon
from batchsync.demo import run_demo
from batchsync.errors import BatchsyncError, ConfigError
from batchsync.logs import final_line, json_output, setup_logging
from batchsync.profiles import profile_paths as find_profile_paths
from batchsync.progress import TerminalProgress, set_listener
from batchsync.samples import write_sample_crm, write_unsubscribers_file
from batchsync.status import as_json, as_table, broken_status, profile_status
from batchsync.sync import ImportReport, Sync

log = logging.getLogger(__name__)
EXIT_FAILED = 1
EXIT_REJECTED = 3
EXIT_ATTENTION = 4
profile_option = click.option(
    "--profile",
    "-p",
    "profile_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The profile TOML file (see profiles/).",
)
dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Write the files it would send and the changes it would make under dry-run/; change nothing.",
)
force_option = click.option(
    "--force",
    is_flag=True,
    help="Upload even past the export safety stop (policy.max_export_unsubscribe_share).",
)
profiles_option = click.option(
    "--profile",
    "-p",
    "profile_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A profile file or folder (repeatable); default: profiles/.",
)
json_option = click.option("--json", "as_json_output", is_flag=True, help="Print JSON instead of a table.")
mode_option = click.option(
    "--full/--diff",
    "full",
    default=None,
    help="Every row, or only what changed since the last confirmed export. Default: the profile's full_weekday.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="batchsync")
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), help="How much to log."
)
@click.option(
    "--log-format", default="text", type=click.Choice(["text", "json"]), help="Log lines as text, or JSON lines."
)
def cli(log_level: str, log_format: str) -> None:
    """Keep a CRM's newsletter subscriptions in step with an email provider over batch files on (S)FTP.

    Start with `batchsync demo`; then `batchsync init -p PROFILE`, `batchsync check -p PROFILE` and
    `batchsync run -p PROFILE`, or `batchsync daemon PROFILE...` to run unattended.
    """
    setup_logging(log_level, log_format)
    if log_format == "text" and sys.stderr.isatty():
        set_listener(TerminalProgress(sys.stderr))


@cli.command()
@profile_option
@dry_run_option
def init(profile_path: Path, dry_run: bool) -> None:
    """Create the CRM and batchsync tables, the profile's lists and the work folders (safe to repeat)."""
    sync = Sync(load_profile(profile_path))
    report = sync.init(dry_run=dry_run)
    where = sync.engine.url.render_as_string(hide_password=True)
    missing = ", ".join(report.tables_missing) or "none"
    if dry_run:
        click.echo(f"would create in {where}: tables {missing}; the profile's lists and groups where missing")
        return
    click.echo(
        f"ready: {where} (tables created: {missing}), {report.lists_added} lists or groups added, "
        f"work folder {sync.work.root}"
    )
    if report.ledger_rows_migrated:
        click.echo(
            f"the export ledger of an earlier version ({report.ledger_rows_migrated} rows) is now in snapshots: "
            "the next export sends every row once"
        )


@cli.command()
@profile_option
@click.option("--contacts", default=10_000, show_default=True, help="How many contacts to generate.")
@click.option("--seed", default=7, show_default=True, help="The same seed gives the same CRM.")
@click.option("--files-to", type=click.Path(path_type=Path), help="Where to write the sample MailUp files.")
def samples(profile_path: Path, contacts: int, seed: int, files_to: Path | None) -> None:
    """Fill an empty CRM with a realistic sample and write matching MailUp unsubscribers files."""
    profile = load_profile(profile_path)
    sync = Sync(profile)
    sync.init()
    try:
        summary = write_sample_crm(sync.engine, profile, contacts=contacts, seed=seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    folder = files_to or profile.work_dir / "samples"
    path = folder / "unsubscribers_sample.csv"
    rows = write_unsubscribers_file(path, summary.picks, profile, seed=seed)
    click.echo(
        f"{summary.contacts} contacts, {summary.subscriptions} subscriptions, {summary.duplicates} duplicate "
        f"emails, {summary.invalid} invalid emails, {summary.suppressed} suppressed"
    )
    click.echo(f"{rows} unsubscriber rows in {path}")


@cli.command()
@profile_option
@mode_option
@force_option
@dry_run_option
def export(profile_path: Path, full: bool | None, force: bool, dry_run: bool) -> None:
    """Export contacts to the provider: one file per list, uploaded whole, the ledger moved after.

    A list whose file would take more than the profile's share of its subscribed addresses off it (opt-outs and
    tombstones) is held back in held/ and exits 1, unless --force.
    """
    sync = Sync(load_profile(profile_path))
    result = sync.export(_mode(full), dry_run=dry_run, force=force)
    echo_export(result)
    if result.stopped:
        raise SystemExit(EXIT_FAILED)


@cli.command("import")
@profile_option
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Import this file (repeatable) instead of looking in the inboxes.",
)
@click.option("--kind", help="The inbound kind of --file, when its name matches no pattern.")
@click.option(
    "--origin",
    type=click.Choice(["provider", "admin"]),
    help="Who reported the events of --file: 'provider' for a provider's file fetched by hand (its opt-outs are "
    "not sent back), 'admin' for a CRM-side change (its opt-outs go out in the next export). Default: the "
    "kind's origin, else admin.",
)
@click.option("--force", is_flag=True, help="Apply files even past the safety stop (policy.max_unsubscribe_share).")
@dry_run_option
def import_(
    profile_path: Path, files: tuple[Path, ...], kind: str | None, origin: str | None, force: bool, dry_run: bool
) -> None:
    """Collect the provider's files and the local inbox, and reconcile them into the CRM.

    Files from the provider's remote inbox are its reports; files in the local inbox or named with --file are
    an admin's (CRM-side changes), unless the kind's origin or --origin says otherwise.
    """
    if origin is not None and not files:
        raise ConfigError("--origin applies to files named with --file")
    sync = Sync(load_profile(profile_path))
    report = sync.import_files(files, kind=kind, origin=origin, dry_run=dry_run, force=force)  # type: ignore[arg-type]
    echo_import(report)
    _exit_for(report)


@cli.command()
@profile_option
@mode_option
@click.option("--force", is_flag=True, help="Pass both safety stops: apply files and upload exports past them.")
@dry_run_option
def run(profile_path: Path, full: bool | None, force: bool, dry_run: bool) -> None:
    """Import, then export: one whole run, recorded in bs_runs."""
    report = Sync(load_profile(profile_path)).run(_mode(full), dry_run=dry_run, force=force)
    assert report is not None and report.imported is not None  # no slot given: always runs
    echo_import(report.imported)
    if report.exported is not None:
        echo_export(report.exported)
        if report.exported.stopped:
            raise SystemExit(EXIT_FAILED)
    _exit_for(report.imported)


@cli.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--tick", default=1.0, show_default=True, help="Seconds between looks at schedules and inboxes.")
@click.option(
    "--listen",
    envvar="BATCHSYNC_LISTEN",
    metavar="HOST:PORT",
    help="Serve /healthz, /metrics (Prometheus), a status page at / and the providers' callbacks at "
    "/hooks/PROFILE/CALLBACK on this address (env BATCHSYNC_LISTEN).",
)
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Serve HTTPS: cert.")
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Serve HTTPS: key.")
def daemon(
    profiles: tuple[Path, ...], tick: float, listen: str | None, tls_cert: Path | None, tls_key: Path | None
) -> None:
    """Run unattended: each profile's nightly run, inbox polls and watched local inbox.

    PROFILES are profile files or folders of them. A profile that cannot be loaded is reported and skipped; a
    database or server that is down is tried again with back-off. SIGTERM or SIGINT: finish the file in hand,
    then exit 0; a second one: stop at once. SIGHUP: reload the profiles (files added to a folder are taken up,
    removed ones dropped; a file now broken keeps its old profile).
    """
    _listen_and_run(Daemon(list(profiles), tick_seconds=tick), listen, tls_cert, tls_key)


@cli.command()
@click.option(
    "--profile",
    "-p",
    "profile_paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="A profile file or folder of them (repeatable).",
)
@click.option("--listen", envvar="BATCHSYNC_LISTEN", required=True, metavar="HOST:PORT", help="Where to listen.")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Serve HTTPS: cert.")
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Serve HTTPS: key.")
def serve(profile_paths: tuple[Path, ...], listen: str, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Take the providers' callbacks alone (e.g. in a DMZ): journal them and cut them into the profiles' inbox
    folders, which a daemon elsewhere shares and imports. No database is needed here.

    Serves POST /hooks/PROFILE/CALLBACK (and the providers' validation GET or HEAD), /healthz and /metrics.
    """
    _listen_and_run(Daemon(list(profile_paths), receive_only=True), listen, tls_cert, tls_key)


def _listen_and_run(runner: Daemon, listen: str | None, tls_cert: Path | None, tls_key: Path | None) -> None:
    listener = None
    if listen:
        from batchsync.web import Listener, listen_address, tls_context  # aiohttp only where a process listens

        host, port = listen_address(listen)
        listener = Listener(runner, host, port, tls=tls_context(tls_cert, tls_key))
        listener.start()
    try:
        code = runner.run_forever()
    finally:
        if listener is not None:
            listener.close()
    raise SystemExit(code)


@cli.command()
@profiles_option
@json_option
def status(profile_paths: tuple[Path, ...], as_json_output: bool) -> None:
    """Per profile: problems, last runs, next scheduled run, files waiting, files in quarantine, rows rejected.

    Exits 4 when a profile needs attention: its last nightly run failed or held exports back, its nightly slot
    was missed, a file is stuck in staging, a file sat in quarantine for over a day, or it cannot be loaded.
    """
    statuses = []
    for path in find_profile_paths(list(profile_paths) or [Path("profiles")]):
        try:
            statuses.append(profile_status(load_profile(path), Clock()))
        except BatchsyncError as exc:
            statuses.append(broken_status(str(path), str(exc)))
    click.echo(as_json(statuses) if as_json_output else as_table(statuses).rstrip())
    if not all(item.healthy for item in statuses):
        raise SystemExit(EXIT_ATTENTION)


@cli.command()
@click.argument("email")
@profiles_option
@json_option
def history(email: str, profile_paths: tuple[Path, ...], as_json_output: bool) -> None:
    """Everything known of EMAIL: its changes, activities, exported rows and the provider's opt-outs, in time order.

    EMAIL is matched as contacts.email_key is made (trimmed, lower-cased), with the contacts an email change moved
    to or from it.
    """
    found = address_history(_profiles(profile_paths), email)
    click.echo(audit_json(found) if as_json_output else audit_table(found))


@cli.command()
@click.argument("target", metavar="FILE_OR_SHA")
@profile_option
@click.option("--dry-run", is_flag=True, help="Print what it would undo and what it would leave; change nothing.")
def revert(target: str, profile_path: Path, dry_run: bool) -> None:
    """Undo the changes one applied inbound file made, where nothing newer changed the same subscription.

    FILE_OR_SHA: the file's name, the path it was archived at, a copy of it, or its sha256 (or its start). What is
    undone is audited (rule 'revert', origin admin) and goes out in the next export; suppressions and the
    provider's remembered opt-outs are never undone. The file is marked reverted and is not applied again.
    """
    plan = Sync(load_profile(profile_path)).revert(target, dry_run=dry_run)
    echo_revert(plan, dry_run)


@cli.command()
@profile_option
def check(profile_path: Path) -> None:
    """Check a profile: database, server, host key or certificate, and every folder (exit 0 only if all pass)."""
    results = run_checks(load_profile(profile_path))
    for result in results:
        click.echo(f"{'ok  ' if result.ok else 'FAIL'} {result.name}: {result.detail}")
    if not all(result.ok for result in results):
        raise SystemExit(1)


@cli.command()
@click.option(
    "--dir",
    "folder",
    default=Path("batchsync-demo"),
    type=click.Path(path_type=Path),
    show_default=True,
    help="The demo's working folder (replaced on each demo).",
)
@click.option("--contacts", default=2_000, show_default=True, help="Size of the sample CRM.")
def demo(folder: Path, contacts: int) -> None:
    """Run the whole loop on a sample SQLite CRM, with a local FTP server playing MailUp."""
    echo_demo(run_demo(folder, contacts=contacts))


def _profiles(paths: tuple[Path, ...]) -> list[Profile]:
    """The profiles of -p files and folders (default: profiles/)."""
    return [load_profile(path) for path in find_profile_paths(list(paths) or [Path("profiles")])]


def _mode(full: bool | None) -> Any:
    return None if full is None else ("full" if full else "diff")


def _exit_for(report: ImportReport) -> None:
    if report.has_rejections:
        raise SystemExit(EXIT_REJECTED)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the one place where errors become messages and exit codes."""
    try:
        cli.main(args=argv, prog_name="batchsync", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        if json_output():
            click.echo(final_line(exc.format_message(), exc.exit_code), err=True)
        else:
            exc.show()
        return exc.exit_code
    except BatchsyncError as exc:
        click.echo(final_line(str(exc), exc.exit_code), err=True)
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # a defect, not the user's doing: one line, the traceback at --log-level debug
        log.debug("unexpected error", exc_info=exc)
        message = f"unexpected {type(exc).__name__}: {exc} (run with --log-level debug for the traceback)"
        click.echo(final_line(message, EXIT_FAILED), err=True)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
