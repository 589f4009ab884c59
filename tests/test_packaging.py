"""The Dockerfile (docker build cannot run on these machines): parsed and checked for what the daemon needs."""

from __future__ import annotations

import json
import shlex

from .conftest import ROOT


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def values(keyword: str) -> list[str]:
    return [rest for key, rest in instructions() if key == keyword]


def test_the_image_is_slim_python_and_runs_as_a_non_root_user() -> None:
    [base] = values("FROM")
    assert base.startswith("python:3.") and base.endswith("-slim")
    users = values("USER")
    assert users and users[-1] not in ("root", "0")
    assert any("useradd" in run and users[-1] in run for run in values("RUN"))


def test_data_inboxes_and_profiles_are_volumes() -> None:
    volumes = [path for rest in values("VOLUME") for path in json.loads(rest)]
    assert {"/data", "/inboxes", "/profiles"} <= set(volumes)


def test_the_entry_point_is_the_daemon_and_the_healthcheck_asks_status() -> None:
    [entry] = values("ENTRYPOINT")
    [command] = values("CMD")
    assert json.loads(entry) == ["batchsync", "daemon"]
    assert json.loads(command) == ["/profiles"]
    [health] = values("HEALTHCHECK")
    options, _, probe = health.partition("CMD ")
    assert "--interval=" in options
    assert json.loads(probe)[:1] == ["batchsync"] and "status" in json.loads(probe)


def test_the_image_installs_the_package_it_copies() -> None:
    copied = " ".join(values("COPY"))
    for part in ("pyproject.toml", "batchsync", "profiles"):
        assert part in copied
    assert any(shlex.split(run)[:2] == ["pip", "install"] for run in values("RUN"))
