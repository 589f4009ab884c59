"""The transport layer's one retry policy: how many times an operation is tried again, how long it waits
between tries, and which failures are worth a new try.

Every transport operation batchsync makes goes through :meth:`RetryPolicy.call`, each caller choosing the unit
that is safe to repeat (a confirmed upload whole, a download into its temporary file, a probe)::

    retry = RetryPolicy.of(profile.transport, clock)
    retry.call(partial(transport.list, folder), what=f"listing {folder}")

Whether a failure is worth a new try is the backend's to say, as it translates its native error into a
:class:`~batchsync.errors.TransportError`: ``retryable`` is set for a reset connection, a timeout or an FTP
4xx reply, never for a refused login, host key, certificate or permission, a missing file or folder. Any other
error (a full local disk included) is raised at once. Waits go through the clock, so tests set time instead of
sleeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from batchsync.clock import Clock
from batchsync.config import TransportConfig
from batchsync.errors import TransportError

log = logging.getLogger(__name__)
T = TypeVar("T")
FIRST_DELAY = 1.0  # seconds before the first new try; doubled before each next one
MAX_DELAY = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """Try an operation again, up to ``retries`` more times with exponential back-off (1, 2, 4 ... s, at most
    60 s), when it fails with a retryable :class:`TransportError`; raise any other failure at once."""

    retries: int
    clock: Clock

    @classmethod
    def of(cls, config: TransportConfig, clock: Clock) -> RetryPolicy:
        """The policy a profile's ``[transport]`` settings ask for (``retries``)."""
        return cls(config.retries, clock)

    def delay(self, retry: int) -> float:
        """The wait before new try number ``retry`` (0 for the first)."""
        return min(FIRST_DELAY * 2.0**retry, MAX_DELAY)

    def call(self, action: Callable[[], T], *, what: str) -> T:
        """Run ``action`` and return what it returns; ``what`` names it in the log line of each new try."""
        for retry in range(self.retries):
            try:
                return action()
            except TransportError as exc:
                if not exc.retryable:
                    raise
                delay = max(self.delay(retry), exc.wait)
                log.warning("%s failed (%s); trying again in %.0f s", what, exc, delay)
                self.clock.sleep(delay)
        return action()  # the last try: whatever it raises is the caller's
