"""The Dockerfile (docker build cannot run on these machines): parsed and checked for what the daemon needs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

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


def test_the_entry_point_is_the_daemon_and_the_healthcheck_asks_healthz_or_status() -> None:
    [entry] = values("ENTRYPOINT")
    [command] = values("CMD")
    assert json.loads(entry) == ["batchsync", "daemon"]
    assert json.loads(command) == ["/profiles"]
    assert "BATCHSYNC_LISTEN=0.0.0.0:8080" in " ".join(values("ENV"))
    [health] = values("HEALTHCHECK")
    options, _, probe = health.partition("CMD ")
    assert "--interval=" in options
    shell, flag, script = json.loads(probe)
    assert (shell, flag) == ("sh", "-c")
    listening, _, otherwise = script.partition("; else ")
    assert "/healthz" in listening and "BATCHSYNC_LISTEN" in listening
    assert shlex.split(otherwise)[:5] == ["batchsync", "--log-level", "error", "status", "--profile"]


def test_the_healthcheck_script_fails_on_a_503_and_passes_on_a_200(tmp_path: Path) -> None:
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = [503]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            self.send_response(answer[0] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    [health] = values("HEALTHCHECK")
    script = json.loads(health.partition("CMD ")[2])[2].replace("python -c", "python3 -c")
    env = {"PATH": "/usr/bin:/bin", "BATCHSYNC_LISTEN": f"0.0.0.0:{server.server_address[1]}"}
    try:
        assert subprocess.run(["sh", "-c", script], env=env, capture_output=True).returncode != 0
        answer[0] = 200
        assert subprocess.run(["sh", "-c", script], env=env, capture_output=True).returncode == 0
    finally:
        server.shutdown()


def test_the_image_installs_the_package_it_copies() -> None:
    copied = " ".join(values("COPY"))
    for part in ("pyproject.toml", "batchsync", "profiles"):
        assert part in copied
    assert any(shlex.split(run)[:2] == ["pip", "install"] for run in values("RUN"))
