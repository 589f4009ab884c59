"""Transports: one contract (``base.Transport``), one implementation per protocol."""

from __future__ import annotations

from batchsync.clock import Clock
from batchsync.config import Profile, TransportConfig
from batchsync.secret import read_secret
from batchsync.transport.acoustic import AcousticTransport, OAuthCredentials
from batchsync.transport.api import Rejected, Submission, Submitter
from batchsync.transport.base import RemoteEntry, Transport, check_remote_name, upload_confirmed
from batchsync.transport.flexmail import FlexmailTransport
from batchsync.transport.ftp import FtpsTransport, FtpTransport
from batchsync.transport.local import LocalTransport
from batchsync.transport.mailchimp import MailchimpTransport
from batchsync.transport.retry import RetryPolicy
from batchsync.transport.sftp import SftpCredentials, SftpTransport

__all__ = [
    "Rejected",
    "RemoteEntry",
    "RetryPolicy",
    "Submission",
    "Submitter",
    "Transport",
    "check_remote_name",
    "open_transport",
    "upload_confirmed",
]


def open_transport(profile: Profile, clock: Clock | None = None) -> Transport:
    """A transport for the profile; it connects on first use. An API's waits (retries, polls) go through
    ``clock``."""
    config: TransportConfig = profile.transport
    if config.kind == "local":
        return LocalTransport(profile.path(config.path or "."))
    if config.kind == "mailchimp":
        api_key = read_secret(profile, config.api_key_env, config.api_key_file, "Mailchimp API key")
        return MailchimpTransport(profile, clock or Clock(), api_key)
    if config.kind == "flexmail":
        token = read_secret(profile, config.api_key_env, config.api_key_file, "Flexmail access token")
        return FlexmailTransport(profile, clock or Clock(), config.user or "", token)
    if config.kind == "acoustic":
        secret = read_secret(profile, config.client_secret_env, config.client_secret_file, "Acoustic client secret")
        refresh = read_secret(profile, config.refresh_token_env, config.refresh_token_file, "Acoustic refresh token")
        credentials = OAuthCredentials(config.client_id or "", secret, refresh)
        return AcousticTransport(profile, clock or Clock(), _file_transport(profile), credentials)
    return _file_transport(profile)


def _file_transport(profile: Profile) -> Transport:
    """FTP, FTPS or SFTP by the profile's [transport] (Acoustic's files go over SFTP)."""
    config = profile.transport
    password = read_secret(profile, config.password_env, config.password_file, "transport password")
    host, port, user = config.host or "", config.port_or_default, config.user or "anonymous"
    common = {"root": config.path or "", "timeout": config.timeout_seconds}
    if config.kind == "ftp":
        return FtpTransport(host, port, user, password, **common)  # type: ignore[arg-type]
    if config.kind == "ftps":
        ca_file = profile.path(config.ca_file) if config.ca_file else None
        return FtpsTransport(host, port, user, password, ca_file=ca_file, **common)  # type: ignore[arg-type]
    passphrase = read_secret(profile, config.key_passphrase_env, config.key_passphrase_file, "key passphrase")
    credentials = SftpCredentials(
        user, password or None, profile.path(config.key_file) if config.key_file else None, passphrase or None
    )
    known_hosts = profile.path(config.known_hosts or "known_hosts")
    return SftpTransport(
        host,
        port,
        credentials,
        known_hosts,
        keepalive=config.keepalive_seconds,
        **common,  # type: ignore[arg-type]
    )
