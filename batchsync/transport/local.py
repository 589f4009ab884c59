"""A local folder standing in for the provider's server (tests, the demo, a mounted share)."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from batchsync.errors import RemoteFolderMissing, TransportError, disk_full
from batchsync.transport.base import RemoteEntry, Transport


class LocalTransport(Transport):
    """A folder standing in for the server; paths may not leave it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, remote: str) -> Path:
        path = (self.root / remote.lstrip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise TransportError(f"remote path {remote!r} leaves the transport's root")
        return path

    def connect(self) -> None:
        if not self.root.is_dir():
            raise TransportError(f"the folder {self.root} standing in for the provider is gone")

    def list(self, folder: str) -> list[RemoteEntry]:
        base = self._path(folder)
        if not base.is_dir():
            raise RemoteFolderMissing(folder)
        with _os_errors(folder):
            entries = []
            for item in os.scandir(base):
                if item.is_file(follow_symlinks=False):
                    stat = item.stat()
                    entries.append(RemoteEntry(item.name, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC)))
        return sorted(entries, key=lambda entry: entry.name)

    def upload(self, local: Path, remote: str) -> None:
        target = self._path(remote)
        with _os_errors(remote):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)

    def download(self, remote: str, local: Path) -> None:
        with _os_errors(remote):
            shutil.copyfile(self._path(remote), local)

    def size(self, remote: str) -> int:
        with _os_errors(remote):
            return self._path(remote).stat().st_size

    def rename(self, source: str, target: str) -> None:
        destination = self._path(target)
        with _os_errors(source):
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._path(source), destination)

    def delete(self, remote: str) -> None:
        with _os_errors(remote):
            self._path(remote).unlink()

    def close(self) -> None:
        return None


class _os_errors:
    """Translate OS errors into TransportError (a busy file may pass: retryable); a full disk is DiskFull."""

    def __init__(self, remote: str) -> None:
        self.remote = remote

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: object) -> None:
        full = disk_full(value, self.remote) if value is not None else None
        if full is not None:
            raise full from value
        if isinstance(value, OSError):
            retryable = not isinstance(value, FileNotFoundError | PermissionError | IsADirectoryError)
            raise TransportError(f"{self.remote}: {value.strerror or value}", retryable=retryable) from value
