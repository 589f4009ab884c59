"""Finding the profile files a command or the daemon is given: files named directly, or every ``*.toml`` in a
named folder (read with ``config.load_profile``).

    paths = profile_paths([Path("profiles/")])
"""

from __future__ import annotations

from pathlib import Path

from batchsync.errors import ConfigError


def profile_paths(arguments: list[Path]) -> list[Path]:
    """Profile files named directly, or every ``*.toml`` in a named folder (sorted); none at all is a usage
    error."""
    found: list[Path] = []
    for path in arguments:
        found += sorted(path.glob("*.toml")) if path.is_dir() else [path]
    if not found:
        raise ConfigError("no profile files given (name files, or a folder of *.toml)")
    return found
