"""The export ledger keeps what a provider refused: a generation committed with refused addresses puts their
rows of the generation before back (or removes a row that was not there), however many there are."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from batchsync.db import snapshots
from batchsync.db.schema import create_all, make_engine

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def generation(keys: list[str], status: str, at: datetime) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "email_key": keys,
            "email": keys,
            "contact_id": list(range(len(keys))),
            "fingerprint": [hash(status) % 1000] * len(keys),
            "status": [status] * len(keys),
            "origin": ["export"] * len(keys),
            "at": [at] * len(keys),
        },
        schema=snapshots.CHUNK_SCHEMA,
    )


@pytest.mark.parametrize("refused", [3, 120])  # a few keys: chunks by key range; many: every chunk of the list
def test_refused_addresses_keep_their_rows_of_the_generation_before(tmp_path: Path, refused: int) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'crm.sqlite'}")
    create_all(engine)
    old = [f"a{n:04d}@example.com" for n in range(300)]
    new = old + [f"b{n:04d}@example.com" for n in range(10)]
    with engine.begin() as connection:
        for code in ("newsletter", "offers"):  # another list's rows are not this one's
            writer = snapshots.SnapshotWriter.begin(connection, "p", code, "h", 0, T0)
            writer.add(generation(old, "subscribed", T0))
            writer.finish()
            snapshots.commit(connection, "p", code)
        writer = snapshots.SnapshotWriter.begin(connection, "p", "newsletter", "h", 0, T0)
        writer.add(generation(sorted(new), "unsubscribed", T0))
        writer.finish()
        refused_keys = [*old[:refused], "b0001@example.com"]
        snapshots.commit(connection, "p", "newsletter", refused_keys)

        held = snapshots.held_rows(connection, "p", "newsletter", new)

    statuses = dict(zip(held["email_key"].to_list(), held["status"].to_list(), strict=True))
    assert all(statuses[key] == "subscribed" for key in old[:refused])  # put back: they go out again
    assert all(statuses[key] == "unsubscribed" for key in old[refused:])  # accepted: the new generation's
    assert "b0001@example.com" not in statuses  # refused and never held before: removed, sent again as new
    assert statuses["b0002@example.com"] == "unsubscribed"
