"""What happened to the rows of one inbound file: the counts a file's outcome carries (``reconcile.FileOutcome``)
and the import adds to, batch by batch (``setimport.FileImport``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    """What happened to the rows of one file."""

    rows: int = 0
    changed: int = 0
    unchanged: int = 0
    no_contact: int = 0
    rejected: int = 0
    warnings: int = 0
    bounced: list[str] = field(default_factory=list)
