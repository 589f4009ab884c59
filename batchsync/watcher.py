"""Which files of a watched local inbox are complete, from the file-system events watchdog reports.

watcher = InboxWatcher(clock)
observer.schedule(watcher, str(inbox))
watcher.ready(inbox)    # names whose writer has finished
watcher.busy()          # names some process still has open: never taken
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from batchsync.clock import Clock

log = logging.getLogger(__name__)
SETTLE_SECONDS = 3.0  # an inbox file whose size has not changed this long counts as complete
OPEN_GIVE_UP_SECONDS = 6 * 3600  # open this long with no event: its close was missed (an inotify overflow)


class InboxWatcher(FileSystemEventHandler):
    """Remembers which inbox files changed when, which are open, and which were closed after writing.

    Where the platform reports opens and closes (Linux's inotify), a file is complete when its writer closes
    it, and a file still open is never taken, however long its writer pauses. Elsewhere a file counts as
    complete once unchanged for SETTLE_SECONDS.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._changed: dict[str, float] = {}
        self._closed: set[str] = set()
        self._open: Counter[str] = Counter()  # opens not yet closed (a reader's too: it may be the writer's)
        self._touched: dict[str, float] = {}  # when each file's last event came

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        name = Path(str(path)).name
        with self._lock:
            self._touched[name] = self.clock.monotonic()
            if event.event_type == "opened":
                self._open[name] += 1
            elif event.event_type in ("closed", "closed_no_write"):
                self._open[name] = max(self._open[name] - 1, 0)
                if event.event_type == "closed":
                    self._closed.add(name)
            elif event.event_type in ("created", "modified", "moved"):
                self._changed[name] = self.clock.monotonic()
                self._closed.discard(name)

    def ready(self, inbox: Path) -> set[str]:
        """Names of inbox files that are complete: closed after writing, or unchanged for a few seconds and
        open nowhere."""
        now = self.clock.monotonic()
        with self._lock:
            present = {p.name for p in inbox.iterdir() if p.is_file()} if inbox.is_dir() else set()
            for name in list(self._changed):
                if name not in present:
                    del self._changed[name]
            self._closed &= present
            self._open = Counter({name: count for name, count in self._open.items() if count and name in present})
            settled = {name for name, at in self._changed.items() if now - at >= SETTLE_SECONDS}
            return (self._closed | settled) - {name for name, count in self._open.items() if count}

    def pending(self) -> bool:
        with self._lock:
            return bool(self._changed or self._closed)

    def busy(self) -> set[str]:
        """Names of inbox files some process still has open: no import takes them, whatever their age; after
        OPEN_GIVE_UP_SECONDS without an event, a close is taken to have been missed and the minimum age rules."""
        now = self.clock.monotonic()
        with self._lock:
            for name in [name for name in self._open if now - self._touched.get(name, now) >= OPEN_GIVE_UP_SECONDS]:
                log.warning("inbox file %s open for hours with nothing heard of it: taken as closed", name)
                del self._open[name]
            return {name for name, count in self._open.items() if count}
