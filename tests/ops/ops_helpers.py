"""Helpers of the ops tests: certificates made on the spot, a real ``redis-server`` run from docker-compose's own
command line, the ``slip`` and ``celery`` commands as subprocesses. Every process is started in its own session
and stopped by its id.

    certs = make_certs(tmp)                       # ca.crt, redis.crt (localhost, 127.0.0.1), redis.key
    with compose_redis(tmp, tls=certs) as server: # docker-compose.yml (+ .tls.yml) Redis, loopback ports
        server.url(tls=True)                      # rediss://:PASSWORD@localhost:PORT/0?ssl_cert_reqs=required&...
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

import redis

from compose_file import COMPOSE, TLS_OVERRIDE, load_compose

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "9f3c2a7be51d48c6a0d4e2b1c3f5a7d9"  # hex, as the README tells users to make one
COMPOSE_ENV = {"REDIS_PASSWORD": PASSWORD, "FLOWER_USER": "ops", "FLOWER_PASSWORD": "flower-s3cret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA certificate clients trust
    cert: Path  # the server's certificate, for localhost and 127.0.0.1, signed by the CA
    key: Path  # the server's private key


def make_certs(folder: Path) -> Certs:
    """A throw-away CA and a server certificate it signs (RSA 2048, valid for a day), PEM files in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def build(subject: str, key, issuer: str, signer, *, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certs = Certs(folder / "ca.crt", folder / "redis.crt", folder / "redis.key")
    pem = serialization.Encoding.PEM
    certs.ca.write_bytes(build("slip test CA", ca_key, "slip test CA", ca_key, ca=True).public_bytes(pem))
    certs.cert.write_bytes(build("localhost", server_key, "slip test CA", ca_key, ca=False).public_bytes(pem))
    certs.key.write_bytes(server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()))
    return certs


@dataclass(frozen=True)
class RedisServer:
    process: subprocess.Popen
    port: int  # plain port (loopback)
    tls_port: int | None  # TLS port (loopback), when started with certificates
    ca: Path | None

    def url(self, *, tls: bool = False, password: str | None = PASSWORD, db: int = 0) -> str:
        auth = "" if password is None else f":{quote(password, safe='')}@"
        if not tls:
            return f"redis://{auth}127.0.0.1:{self.port}/{db}"
        return f"rediss://{auth}localhost:{self.tls_port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url(**kwargs), socket_connect_timeout=2)


def compose_command(*, tls: bool) -> list[str]:
    """The ``redis`` service's command as docker-compose.yml (and docker-compose.tls.yml) set it."""
    files = (COMPOSE, TLS_OVERRIDE) if tls else (COMPOSE,)
    return [str(a) for a in load_compose(*files, env=COMPOSE_ENV)["services"]["redis"]["command"]]


@contextmanager
def compose_redis(folder: Path, *, tls: Certs | None = None) -> Iterator[RedisServer]:
    """``redis-server`` with the exact command line of the compose file(s), moved to this machine: the
    container's /tls files are ``tls``'s, its ports free loopback ports, its /data ``folder``."""
    port, tls_port = free_port(), free_port() if tls else None
    swap = {"6379": str(port), "6380": str(tls_port)}
    if tls:
        swap.update({"/tls/ca.crt": str(tls.ca), "/tls/redis.crt": str(tls.cert), "/tls/redis.key": str(tls.key)})
    command = [swap.get(a, a) for a in compose_command(tls=tls is not None)]
    if "--port" not in command:
        command += ["--port", str(port)]
    command += ["--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "redis.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = RedisServer(process, port, tls_port, tls.ca if tls else None)
    try:
        _wait_redis(server, folder / "redis.log")
        yield server
    finally:
        stop(process)
        log.close()


def _wait_redis(server: RedisServer, log: Path, timeout_s: float = 20.0) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
    finally:
        client.close()


def stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL to the process group when it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def base_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without SLIP_* / FLOWER_*, the repo importable, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLIP_", "FLOWER_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(overrides)
    return env


def slip(args: Sequence[str], env: dict[str, str], *, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """The ``slip`` console command (``python -m producer``)."""
    return subprocess.run([sys.executable, "-m", "producer", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def start(command: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A long-running process (worker, Flower) in its own session, output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(command), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
