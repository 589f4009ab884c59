"""What the ``batchsync`` commands print: their results as lines on the terminal (``cli.py`` decides when)."""

from __future__ import annotations

import click

from batchsync.demo import DemoSummary
from batchsync.export import ExportResult
from batchsync.revert import RevertPlan
from batchsync.revert import Step as RevertStep
from batchsync.revert import describe as describe_file
from batchsync.sync import ImportReport


def echo_export(result: ExportResult) -> None:
    verb = "would send" if result.dry_run else "sent"
    for item in result.files:
        where = f"{item.local_path} -> {item.remote_path}" if item.local_path else "nothing to send"
        if item.stopped and not result.dry_run:
            where = f"held back in {item.local_path}" if item.local_path else "nothing uploaded"
        api = f"; {item.rejected} refused by the provider, {item.api_calls} API calls" if item.api_calls else ""
        click.echo(
            f"export {result.mode} {item.list_code}: {item.rows} rows ({item.tombstones} tombstones), "
            f"{item.duplicates} duplicate emails, {item.invalid} invalid emails; {where}{api}"
        )
        for report in item.reports:
            click.echo(f"  report: {report}")
        if item.stopped:
            click.echo(f"  {item.stopped}", err=True)
    sent = [f for f in result.files if f.local_path and (result.dry_run or f.uploaded)]
    click.echo(f"export: {verb} {sum(f.rows for f in sent)} rows in {len(sent)} files")


WOULD = {"applied": "would be applied", "duplicate": "would be a duplicate", "quarantined": "would be quarantined"}


def echo_import(report: ImportReport) -> None:
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


def echo_demo(summary: DemoSummary) -> None:
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


def echo_revert(plan: RevertPlan, dry_run: bool) -> None:
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
