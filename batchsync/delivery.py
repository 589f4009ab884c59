"""Getting an export's files to the provider whole, keeping a copy of each one sent, and tidying up after a
process that was stopped halfway.

Each file goes up under ``NAME.part``, its size is checked, and it is renamed to ``NAME`` (the provider never
sees half a file). Before it goes up, a note beside it in the outbox (``.NAME.remote``) says where to, so that
a process stopped between the remote rename and the move into ``sent/`` loses no copy: the next export finds
the note, asks the server, and keeps the file in ``sent/`` when the provider has it whole::

    delivery = Delivery(profile, clock, work)
    delivery.recover(transport_factory)           # before an export writes its files
    delivery.remove_partial_uploads(transport, folders)
    kept = delivery.send(transport, files, folder)
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from batchsync.clock import Clock
from batchsync.config import Profile
from batchsync.errors import RemoteFolderMissing, TransportError
from batchsync.transport import RetryPolicy, Transport, upload_confirmed
from batchsync.workdir import WorkDir

log = logging.getLogger(__name__)
PART = ".part"


class Delivery:
    """Gets an export's files to the provider whole (see the module docstring), under the transport's retry policy."""

    def __init__(self, profile: Profile, clock: Clock, work: WorkDir) -> None:
        self.profile, self.work = profile, work
        self.retry = RetryPolicy.of(profile.transport, clock)  # its waits are the only use of the clock here

    def send(self, transport: Transport, files: list[Path], folder: str) -> list[Path]:
        """Upload ``files`` into the remote ``folder`` in order, each confirmed whole; returns their copies in
        ``sent/``."""
        for local in files:
            remote = f"{folder}/{local.name}"
            _note(local).write_text(remote, encoding="utf-8")
            # Tried again as a whole (upload, size, rename): a rename whose answer was lost cannot be repeated alone.
            self.retry.call(partial(upload_confirmed, transport, local, remote, PART), what=f"upload of {remote}")
            log.info("sent %s to %s", local.name, remote)
        kept = self.work.keep_sent(files)
        for local in files:
            _note(local).unlink(missing_ok=True)
        return kept

    def recover(self, transport_factory: Callable[[Profile], Transport]) -> None:
        """Empty the outbox a stopped export left: a file the provider has whole under its final name was sent,
        so its copy goes to ``sent/``; any other is dropped (the ledger did not move: its rows go out again)."""
        notes = sorted(self.work.outbox.glob(".*.remote")) if self.work.outbox.is_dir() else []
        if notes:
            transport = transport_factory(self.profile)
            try:
                for note in notes:
                    self._recover_one(transport, note)
            finally:
                transport.close()
        self.work.clear(self.work.outbox)

    def _recover_one(self, transport: Transport, note: Path) -> None:
        """One file a stopped export was sending: the server holds it whole under its final name (sent), or still
        as ``NAME.part`` or not at all as it was (not sent: dropped, its rows go out again); when neither name is
        there the provider may have taken it already, so its copy is kept, marked unconfirmed."""
        local = note.with_name(note.name[1 : -len(".remote")])
        remote = note.read_text(encoding="utf-8").strip()
        if local.exists():
            final, partial = self._size(transport, remote), self._size(transport, remote + PART)
            if final == local.stat().st_size:
                [kept] = self.work.keep_sent([local])
                log.warning("%s reached the provider before the last export stopped: kept as %s", remote, kept)
            elif final is None and partial is None:
                [kept] = self.work.keep_sent([local.rename(local.with_name(local.name + ".unconfirmed"))])
                log.warning("%s may have reached the provider before the last export stopped: kept as %s", remote, kept)
        note.unlink()

    def remove_partial_uploads(self, transport: Transport, folders: Mapping[str, str]) -> None:
        """Remove the ``NAME.part`` files an export stopped mid-upload left in the export folders (``folders``:
        list code -> remote folder). Only names this profile's file-name template makes for the list are
        touched: another sender's files are not ours to remove."""
        for code, folder in folders.items():
            pattern = partial_upload_pattern(self.profile, code)
            try:
                listing = self.retry.call(partial(transport.list, folder), what=f"listing {folder}")
            except RemoteFolderMissing:
                continue
            except TransportError as exc:  # tidying up is no reason to hold back tonight's files
                log.warning("could not look for partial uploads in %s: %s", folder, exc)
                return
            for entry in listing:
                if pattern.fullmatch(entry.name):
                    remote = posixpath.join(folder, entry.name)
                    try:
                        self.retry.call(partial(transport.delete, remote), what=f"removing {remote}")
                        log.warning("removed %s/%s, left by an upload that was stopped", folder, entry.name)
                    except TransportError as exc:
                        log.warning("could not remove the partial upload %s/%s: %s", folder, entry.name, exc)

    def _size(self, transport: Transport, remote: str) -> int | None:
        """The size of a remote file, None where it is not there (or the server cannot say after every try)."""
        try:
            return self.retry.call(partial(transport.size, remote), what=f"the size of {remote}")
        except TransportError:
            return None


def _note(local: Path) -> Path:
    return local.with_name(f".{local.name}.remote")


# What each placeholder of a file-name template can become (export.placeholders).
VARYING = {"stamp": r"\d{8}T\d{6}Z", "mailup_stamp": r"\d{18}", "mode": r"(?:full|diff)"}


def partial_upload_pattern(profile: Profile, code: str) -> re.Pattern[str]:
    """The names of a list's partial uploads: its file-name template's stem with the stamp and mode as what they
    can be, then anything (an opt-out file, a zip, a map, a numbered name), then ``.part``."""
    stem = profile.export.file_name.split(".", 1)[0]
    fixed = {"profile": profile.name, "list": code, "list_id": profile.lists[code].id}
    parts = re.split(r"\{(\w+)\}", stem)  # text, name, text, name, ... text
    pattern = "".join(
        re.escape(part) if index % 2 == 0 else VARYING.get(part, re.escape(fixed.get(part, part)))
        for index, part in enumerate(parts)
    )
    return re.compile(pattern + r"(?:[-_.].*)?" + re.escape(PART))
