"""Real servers on loopback for the transport tests: OpenSSH's sshd, pyftpdlib with TLS, and vsftpd.

Each is started with its own config, keys and certificates in a temporary folder, on a free port. As root
(CI), sshd and vsftpd log in a dedicated test user with a random password; as another user, sshd runs as that
user and accepts its key only.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TEST_USER = "bstest"
IS_ROOT = os.geteuid() == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}"
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "batchsync test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths.key.chmod(0o600)
    return paths


@functools.cache
def test_account() -> tuple[str, str | None]:
    """(user, password): as root a dedicated user with a random password set once per session, else the
    current user (whose password the tests do not know)."""
    if not IS_ROOT:
        return pwd.getpwuid(os.geteuid()).pw_name, None
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--home-dir", "/tmp", "--shell", "/bin/sh", TEST_USER],
            check=True,
            capture_output=True,
        )
    password = secrets.token_urlsafe(16)
    subprocess.run(["chpasswd"], input=f"{TEST_USER}:{password}".encode(), check=True, capture_output=True)
    return TEST_USER, password


def give_to(path: Path, user: str) -> None:
    if IS_ROOT:
        shutil.chown(path, user, user)


@dataclass
class SshServer:
    port: int
    root: Path  # the folder the transport works in
    user: str
    password: str | None
    known_hosts: Path
    keys: dict[str, Path]  # kind -> private key file; "encrypted" has passphrase PASSPHRASE
    host_public_key: str
    process: subprocess.Popen[bytes]
    config: Path

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def start(self) -> None:
        self.process = _run_sshd(self.config)
        wait_for_port(self.port, self.process)


PASSPHRASE = "correct horse battery staple"


def start_sshd(folder: Path) -> SshServer:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    user, password = test_account()
    keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
    keys: dict[str, Path] = {}
    for kind, extra in (("ed25519", []), ("ecdsa", ["-b", "256"]), ("rsa", ["-b", "3072"])):
        keys[kind] = folder / f"id_{kind}"
        subprocess.run([keygen, "-q", "-t", kind, *extra, "-N", "", "-f", str(keys[kind])], check=True)
    keys["encrypted"] = folder / "id_encrypted"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(keys["encrypted"])], check=True)
    authorized = folder / "authorized_keys"
    authorized.write_text("".join(Path(f"{key}.pub").read_text() for key in keys.values()))
    authorized.chmod(0o644)
    root = folder / "sftp"
    root.mkdir()
    give_to(root, user)
    port = free_port()
    host_public = (folder / "host_key.pub").read_text().split()
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
        f"AllowUsers {user}\n"
    )
    if IS_ROOT:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    process = _run_sshd(config)
    wait_for_port(port, process)
    return SshServer(
        port, root, user, password, known_hosts, keys, f"{host_public[0]} {host_public[1]}", process, config
    )


def _run_sshd(config: Path) -> subprocess.Popen[bytes]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    return subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)


@dataclass
class Vsftpd:
    port: int
    root: Path
    user: str
    password: str
    certificates: Certificates
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_vsftpd(folder: Path) -> Vsftpd:
    """vsftpd with explicit TLS required on both channels and TLS session reuse required (its default)."""
    if not IS_ROOT:
        raise RuntimeError("vsftpd needs root for password logins; CI runs the tests as root")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    user, password = test_account()
    assert password is not None
    certificates = make_certificates(folder / "tls")
    root = folder / "ftp"
    root.mkdir()
    give_to(root, user)
    empty = folder / "empty"
    empty.mkdir(mode=0o755)
    port = free_port()
    config = folder / "vsftpd.conf"
    config.write_text(
        "\n".join(
            [
                "listen=YES",
                "listen_ipv6=NO",
                "listen_address=127.0.0.1",
                f"listen_port={port}",
                "background=NO",
                "anonymous_enable=NO",
                "local_enable=YES",
                "write_enable=YES",
                f"local_root={root}",
                "local_umask=022",
                "chroot_local_user=NO",
                "pasv_enable=YES",
                "pasv_address=127.0.0.1",
                "port_enable=NO",
                "ssl_enable=YES",
                f"rsa_cert_file={certificates.cert}",
                f"rsa_private_key_file={certificates.key}",
                "force_local_logins_ssl=YES",
                "force_local_data_ssl=YES",
                "require_ssl_reuse=YES",
                "ssl_ciphers=HIGH",
                "allow_anon_ssl=NO",
                f"secure_chroot_dir={empty}",
                "nopriv_user=nobody",
                "pam_service_name=vsftpd",
                "seccomp_sandbox=NO",
                "isolate=NO",
                "isolate_network=NO",
                "userlist_enable=NO",
                "use_localtime=NO",
                "xferlog_enable=NO",
                "dirmessage_enable=NO",
                "",
            ]
        )
    )
    process = subprocess.Popen([shutil.which("vsftpd") or "/usr/sbin/vsftpd", str(config)], stderr=subprocess.PIPE)
    wait_for_port(port, process)
    return Vsftpd(port, root, user, password, certificates, process)
