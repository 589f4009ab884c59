"""The engine produces what the engine of aa1b5c6 produced: for every profile, the scenario of tests/sameness.py
on a seeded 100k-contact CRM (full export, the provider's opt-outs, scripted CRM changes, diff export, each
sample return file imported) gives the same files and CRM states as recorded in tests/sameness/<profile>.json.

Rows are compared sorted: their order may legitimately change between engines. The headers, the columns and
every row may not. A mismatch names the profile, step, file or table, the counts, and the first sorted lines
that differ; to see every line that differs, run ``python -m tests.sameness --dump DIR -p PROFILE --check`` on
this code and on aa1b5c6 and diff the two folders. An intended change of output is recorded again with
``python -m tests.sameness --record`` (and said so in its commit).

About 2 minutes in all on a 2-core machine with today's engine (seeding the 100k-contact CRMs is a third of it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import sameness

RECORDED_CONTACTS = 100_000


def test_every_profile_has_a_recording() -> None:
    recorded = sorted(path.stem for path in sameness.EXPECTED_DIR.glob("*.json"))
    assert recorded == sameness.profile_names(), "record the new profile: python -m tests.sameness --record -p NAME"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("profile", sameness.profile_names())
def test_the_engine_produces_the_recorded_files_and_states(profile: str, tmp_path: Path) -> None:
    expected = sameness.load_expected(profile)
    assert expected["contacts"] == RECORDED_CONTACTS, f"{profile} was recorded with {expected['contacts']} contacts"
    actual = sameness.run_profile(profile, tmp_path / profile, contacts=RECORDED_CONTACTS)
    problems = sameness.compare(expected, actual)
    assert not problems, f"{len(problems)} difference(s) from the recording:\n" + "\n".join(problems)
