"""The ``batchsync`` command: parse arguments, call the library, print, and map errors to exit codes.

Nothing else in batchsync prints or exits. Exit codes: 0 done, 1 failed, 2 usage or configuration error,
3 done with rejected rows or files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from batchsync.audit import address_history
from batchsync.audit import as_json as audit_json
from batchsync.audit import as_table as audit_table
from batchsync.check import run_checks
from batchsync.clock import Clock
from batchsync.config import Profile, load_profile
from batchsync.daemon import Daemon
from batchsync.daemon import profile_paths as daemon_profile_paths
from batchsync.demo import DemoSummary, run_demo
from batchsync.errors import BatchsyncError, ConfigError
from batchsync.export import ExportResult
from batchsync.logs import setup_logging
from batchsync.progress import TerminalProgress, set_listener
from batchsync.revert import RevertPlan
from batchsync.revert import Step as RevertStep
from batchsync.revert import describe as describe_file
from batchsync.samples import write_sample_crm, write_unsubscribers_file
from batchsync.status import as_json, as_table, profile_status
from batchsync.sync import ImportReport, Sync

EXIT_FAILED = 1
EXIT_REJECTED = 3
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
    _echo_export(result)
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
    _echo_import(report)
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
    _echo_import(report.imported)
    if report.exported is not None:
        _echo_export(report.exported)
        if report.exported.stopped:
            raise SystemExit(EXIT_FAILED)
    _exit_for(report.imported)


@cli.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--tick", default=1.0, show_default=True, help="Seconds between looks at schedules and inboxes.")
def daemon(profiles: tuple[Path, ...], tick: float) -> None:
    """Run unattended: each profile's nightly run, inbox polls and watched local inbox.

    PROFILES are profile files or folders of them. SIGTERM or SIGINT: finish the file in hand, then exit 0;
    a second one: stop at once. SIGHUP: reload the profiles (a broken one is reported and the old one kept).
    """
    raise SystemExit(Daemon(list(profiles), tick_seconds=tick).run_forever())


@cli.command()
@profiles_option
@json_option
def status(profile_paths: tuple[Path, ...], as_json_output: bool) -> None:
    """Per profile: last runs, next scheduled run, files waiting, files in quarantine, rows rejected."""
    statuses = [profile_status(profile, Clock()) for profile in _profiles(profile_paths)]
    click.echo(as_json(statuses) if as_json_output else as_table(statuses).rstrip())


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
    _echo_revert(plan, dry_run)


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
    _echo_demo(run_demo(folder, contacts=contacts))


def _profiles(paths: tuple[Path, ...]) -> list[Profile]:
    """The profiles of -p files and folders (default: profiles/)."""
    return [load_profile(path) for path in daemon_profile_paths(list(paths) or [Path("profiles")])]


def _mode(full: bool | None) -> Any:
    return None if full is None else ("full" if full else "diff")


def _echo_export(result: ExportResult) -> None:
    verb = "would send" if result.dry_run else "sent"
    for item in result.files:
        where = f"{item.local_path} -> {item.remote_path}" if item.local_path else "nothing to send"
        if item.stopped and not result.dry_run:
            where = f"held back in {item.local_path}" if item.local_path else "nothing uploaded"
        click.echo(
            f"export {result.mode} {item.list_code}: {item.rows} rows ({item.tombstones} tombstones), "
            f"{item.duplicates} duplicate emails, {item.invalid} invalid emails; {where}"
        )
        for report in item.reports:
            click.echo(f"  report: {report}")
        if item.stopped:
            click.echo(f"  {item.stopped}", err=True)
    sent = [f for f in result.files if f.local_path and (result.dry_run or f.uploaded)]
    click.echo(f"export: {verb} {sum(f.rows for f in sent)} rows in {len(sent)} files")


WOULD = {"applied": "would be applied", "duplicate": "would be a duplicate", "quarantined": "would be quarantined"}


def _echo_import(report: ImportReport) -> None:
    for item in report.files:
        outcome = WOULD.get(item.outcome, item.outcome) if report.dry_run else item.outcome
        warnings = f", {item.warnings} warnings" if item.warnings else ""
        click.echo(
            f"import {item.name} ({item.origin}): {outcome}; {item.rows} rows, {item.changed} changed, "
            f"{item.rejected} rejected{warnings}" + (f" ({item.reason})" if item.reason else "")
        )
        for label, path in (("kept", item.kept_at), ("result", item.result_path), ("errors", item.errors_path)):
            if path is not None:
                click.echo(f"  {label}: {path}")
    for name in report.refused:
        click.echo(f"refused: {name}", err=True)
    for name in report.waiting:
        click.echo(f"waiting (too new): {name}")
    if not report.files:
        click.echo("import: no new files")


def _echo_demo(summary: DemoSummary) -> None:
    counts = summary.imported.counts()
    click.echo("")
    click.echo("batchsync demo: done")
    click.echo(f"  CRM:            {summary.crm_url} ({summary.samples.contacts} contacts)")
    click.echo(
        f"  exported:       {summary.exported.rows} rows in {len(summary.exported.files)} files "
        f"to {summary.provider_root / 'import'}"
    )
    click.echo(f"  provider file:  {summary.returned_file.name} (MailUp unsubscribers)")
    click.echo(f"  events applied: {counts['changed']} of {counts['rows']} rows changed the CRM")
    click.echo(f"  rows rejected:  {counts['rejected']}")
    for item in summary.imported.files:
        click.echo(f"  result file:    {item.result_path}")
        click.echo(f"  errors file:    {item.errors_path}")
        click.echo(f"  archived:       {item.kept_at}")
    click.echo(f"  sent copies:    {summary.folder / 'work' / 'sent'}")


def _echo_revert(plan: RevertPlan, dry_run: bool) -> None:
    would = "would be " if dry_run else ""
    click.echo(
        f"{'would revert' if dry_run else 'reverted'} {describe_file(plan.file)}: {len(plan.undone)} changes "
        f"{would}undone, {len(plan.left)} left"
    )
    for step in plan.undone:
        click.echo(f"  undone: {_step(step)}")
    for step in plan.left:
        click.echo(f"  left:   {_step(step)}: {step.why_left}")
    if plan.older:
        click.echo(
            f"  {plan.older} changes were recorded before batchsync kept the state before them: their status is "
            "put back with the revert's time, source admin and no reason"
        )
    for note in plan.notes:
        click.echo(f"  note: {note}")
    click.echo("  never undone by a revert: suppressions, the provider's remembered opt-outs, activities")


def _step(step: RevertStep) -> str:
    """``line 3 contact 2 bob@example.com newsletter: unsubscribed -> subscribed``; a change left: its state."""
    change = step.change
    line = f"line {change['source_line']} contact {change['contact_id']} {step.address}"
    made = (
        f"address {change['new_email']}"
        if change["list_code"] == ""
        else f"{change['list_code']}: {change['new_status']}"
    )
    return f"{line} {made} -> {step.restored}" if not step.why_left else f"{line} {made} stays"


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
        exc.show()
        return 2
    except BatchsyncError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
