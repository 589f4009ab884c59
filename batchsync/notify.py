"""The summary email after a run, as the providers' own sync modules send it: counts, the rows rejected (the
errors files attached), the addresses that hard-bounced, and anything quarantined.

SMTP credentials are read by reference; STARTTLS is used whenever the server offers it (``starttls = "auto"``),
demanded with ``"required"``, and the certificate is verified.
"""

from __future__ import annotations

import smtplib
import ssl
from datetime import datetime
from email.message import EmailMessage
from typing import Any

from batchsync.config import NotifyConfig, Profile
from batchsync.errors import BatchsyncError, ConfigError
from batchsync.reconcile import FileOutcome
from batchsync.secret import read_secret
from batchsync.sync import ImportReport, RunReport

MAX_ATTACHMENTS = 10


def summary_message(profile: Profile, report: RunReport | ImportReport) -> EmailMessage:
    imported = report.imported if isinstance(report, RunReport) else report
    exported = report.exported if isinstance(report, RunReport) else None
    files: list[FileOutcome] = imported.files if imported else []
    counts = imported.counts() if imported else {}
    lines = [f"batchsync, profile {profile.name}", ""]
    if imported is not None:
        lines.append(
            f"Imported: {counts['files']} files, {counts['rows']} rows, {counts['changed']} changed, "
            f"{counts['rejected']} rejected, {counts['duplicates']} duplicate files, "
            f"{counts['quarantined']} quarantined"
        )
        lines += [
            f"  {item.name} ({item.origin}): {item.outcome}, {item.rows} rows, {item.rejected} rejected"
            + (f", {item.warnings} warnings" if item.warnings else "")
            + (f" ({item.reason})" if item.reason else "")
            for item in files
        ]
    if exported is not None:
        lines.append(
            f"Exported ({exported.mode}): {exported.rows} rows in "
            f"{sum(1 for item in exported.files if item.uploaded)} files"
        )
        lines += [f"  HELD BACK, list {item.list_code}: {item.stopped}" for item in exported.files if item.stopped]
        lines += [
            f"  REFUSED by the provider, list {item.list_code}: {item.rejected} rows (sent again next run)"
            for item in exported.files
            if item.rejected
        ]
    calls = (imported.api_calls if imported else 0) + (exported.api_calls if exported else 0)
    if calls:
        lines.append(f"Provider API calls this run: {calls}")
    bounced = [email for item in files for email in item.bounced]
    if bounced:
        lines += ["", f"Hard bounces ({len(bounced)}):", *(f"  {email}" for email in bounced)]
    if imported is not None and imported.refused:
        lines += ["", "Refused names:", *(f"  {name}" for name in imported.refused)]
    rejected = counts.get("rejected", 0)
    quarantined = counts.get("quarantined", 0)
    message = EmailMessage()
    held = len(exported.stopped) if exported is not None else 0
    message["Subject"] = (
        f"batchsync {profile.name}: {counts.get('changed', 0)} changes, {rejected} rows rejected"
        + (f", {quarantined} files quarantined" if quarantined else "")
        + (f", {held} exports held back by the safety stop" if held else "")
        + (f", {exported.rejected} rows refused by the provider" if exported is not None and exported.rejected else "")
    )
    message.set_content("\n".join(lines) + "\n")
    attached = [item.errors_path for item in files if item.rejected and item.errors_path]
    if exported is not None:
        attached += [path for item in exported.files for path in item.reports if path.name.endswith(".rejected.csv")]
    for path in attached[:MAX_ATTACHMENTS]:
        assert path is not None
        message.add_attachment(path.read_bytes(), maintype="text", subtype="csv", filename=path.name)
    return message


def failure_message(profile: Profile, what: str, error: str, at: datetime) -> EmailMessage:
    """The mail of a failed run: what failed, when, the error, and where to look next."""
    message = EmailMessage()
    message["Subject"] = f"batchsync {profile.name}: {what} FAILED"
    message.set_content(
        f"batchsync, profile {profile.name}\n\n"
        f"{what} failed at {at:%Y-%m-%d %H:%M:%S} UTC:\n\n  {error}\n\n"
        "A failed nightly run is tried again later in the night (schedule.retry_minutes); the same kind of failure\n"
        "is mailed at most once a day. `batchsync status` shows the runs and what needs attention.\n"
    )
    return message


def send_failure(profile: Profile, what: str, error: str, at: datetime) -> None:
    _send(profile, failure_message(profile, what, error, at))


def send_summary(profile: Profile, report: Any) -> None:
    _send(profile, summary_message(profile, report))


def _send(profile: Profile, message: EmailMessage) -> None:
    config = profile.notify
    if config is None:
        return
    message["From"] = config.email_from
    message["To"] = ", ".join(config.email_to)
    password = read_secret(profile, config.smtp_password_env, config.smtp_password_file, "SMTP password")
    try:
        with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.timeout_seconds) as smtp:
            _secure(smtp, config, profile)
            if config.smtp_user:
                smtp.login(config.smtp_user, password)
            smtp.send_message(message)
    except smtplib.SMTPAuthenticationError:
        raise BatchsyncError(f"SMTP login as {config.smtp_user} refused by {config.smtp_host}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise BatchsyncError(f"cannot send the summary through {config.smtp_host}:{config.smtp_port}: {exc}") from None


def _secure(smtp: smtplib.SMTP, config: NotifyConfig, profile: Profile) -> None:
    smtp.ehlo()
    offered = smtp.has_extn("starttls")
    if config.starttls == "required" and not offered:
        raise ConfigError(f"{config.smtp_host} does not offer STARTTLS, and the profile requires it")
    if config.starttls != "off" and offered:
        context = ssl.create_default_context(cafile=str(profile.path(config.ca_file)) if config.ca_file else None)
        smtp.starttls(context=context)
        smtp.ehlo()
