"""Bench: upload and download of a large file over SFTP (OpenSSH's sshd) and FTP/FTPS (pyftpdlib), with peak RSS.

Each transfer runs in a fresh process, so its peak RSS is the transfer's own; the servers run in processes of
their own. Prints seconds, MB/s and peak RSS. Not a test: it asserts nothing.

    python bench/bench_transfer.py                 # 300 MB
    python bench/bench_transfer.py --mb 50
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchsync.transport.base import Transport, upload_confirmed  # noqa: E402
from batchsync.transport.ftp import FtpsTransport, FtpTransport  # noqa: E402
from batchsync.transport.sftp import SftpCredentials, SftpTransport  # noqa: E402
from tests.peers import free_port, give_to, make_certificates, start_sshd, wait_for_port  # noqa: E402

FTP_SERVER = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from batchsync.ftpserver import LoopbackFtpServer
tls = ({cert!r}, {key!r}) if {tls!r} else None
server = LoopbackFtpServer(Path({folder!r}), "bench", "bench", tls=tls)
import pyftpdlib.servers as s
handler = server.handler
srv = s.ThreadedFTPServer(("127.0.0.1", {port}), handler)
srv.serve_forever(handle_exit=True)
"""


def client_for(spec: dict[str, Any]) -> Transport:
    if spec["kind"] == "sftp":
        credentials = SftpCredentials(spec["user"], key_file=Path(spec["key"]))
        return SftpTransport("127.0.0.1", spec["port"], credentials, Path(spec["known_hosts"]), root=spec["root"])
    if spec["kind"] == "ftps":
        return FtpsTransport("127.0.0.1", spec["port"], "bench", "bench", ca_file=Path(spec["ca"]))
    return FtpTransport("127.0.0.1", spec["port"], "bench", "bench")


def step(spec: dict[str, Any]) -> dict[str, Any]:
    local = Path(spec["local"])
    with client_for(spec) as client:
        started = time.perf_counter()
        if spec["step"] == "upload":
            size = upload_confirmed(client, local, "bench/big.bin")
        else:
            target = local.with_name("downloaded.bin")
            client.download("bench/big.bin", target)
            size = target.stat().st_size
            target.unlink()
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"bytes": size, "seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1)}


def run_step(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--step", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec['kind']} {spec['step']} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def start_ftp(folder: Path, tls: bool, certs: Any) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    code = FTP_SERVER.format(
        root=str(ROOT), folder=str(folder), port=port, tls=tls, cert=str(certs.cert), key=str(certs.key)
    )
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wait_for_port(port, process)
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="file size in MB")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(json.loads(args.step))))
        return
    scratch = Path(tempfile.mkdtemp(prefix="batchsync-bench-"))
    scratch.chmod(0o755)
    big = scratch / "big.bin"
    with big.open("wb") as handle:
        for _ in range(args.mb):
            handle.write(os.urandom(1024 * 1024))
    big.chmod(0o644)
    ssh = start_sshd(scratch / "ssh")
    certs = make_certificates(scratch / "tls")
    servers = []
    try:
        folder = ssh.root / "bench-root"
        folder.mkdir()
        give_to(folder, ssh.user)
        specs = [
            {
                "kind": "sftp",
                "port": ssh.port,
                "user": ssh.user,
                "key": str(ssh.keys["ed25519"]),
                "known_hosts": str(ssh.known_hosts),
                "root": str(folder),
            }
        ]
        for kind in ("ftp", "ftps"):
            process, port = start_ftp(scratch / kind, kind == "ftps", certs)
            servers.append(process)
            specs.append({"kind": kind, "port": port, "ca": str(certs.ca)})
        print(f"{'transport':>10} {'step':>9} {'MB':>6} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12}")
        for spec in specs:
            for name in ("upload", "download"):
                result = run_step({**spec, "step": name, "local": str(big)})
                rate = result["bytes"] / 1e6 / result["seconds"] if result["seconds"] else 0
                print(
                    f"{spec['kind']:>10} {name:>9} {result['bytes'] / 1e6:>6.0f} {result['seconds']:>8} "
                    f"{rate:>7.1f} {result['peak_rss_mb']:>12}",
                    flush=True,
                )
    finally:
        ssh.stop()
        for process in servers:
            process.terminate()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
