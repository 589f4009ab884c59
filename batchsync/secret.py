"""Secrets by reference: a profile names the environment variable or the file that holds a password, a
passphrase or a callback's secret, never the secret itself (``config.py`` refuses one written inline).

    password = read_secret(profile, config.password_env, config.password_file, "transport password")
"""

from __future__ import annotations

import os

from batchsync.config import Profile
from batchsync.errors import ConfigError


def read_secret(profile: Profile, env: str | None, file: str | None, what: str) -> str:
    """The secret named by an environment variable or a file (relative to the profile's folder), else ``""``;
    a reference that cannot be read is a ConfigError naming it. The value is never logged."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"profile {profile.name}: {what}: environment variable {env} is not set")
        return value
    if file:
        path = profile.path(file)
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"profile {profile.name}: {what}: cannot read {path}: {exc.strerror}") from None
    return ""
