"""docker-compose.yml's Redis, run for real: its own command line on a loopback port. Without the password
nothing gets in; the password never shows in the process list; the compose health check passes only when it
authenticates; a client with a wrong password gets one line that does not echo the URL's password."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis
from PIL import Image

from compose_file import COMPOSE, load_compose
from ops_helpers import COMPOSE_ENV, PASSWORD, base_env, compose_redis, slip

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with compose_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_clients_without_the_password_are_refused(server):
    for password in (None, "wrong"):
        client = server.client(password=password)
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.set("slip:probe", "1")
        client.close()
    client = server.client()
    assert client.ping() and client.set("slip:probe", "1") and client.delete("slip:probe")
    client.close()


def test_the_password_is_not_in_the_process_list(server):
    cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline, "redis-server keeps its arguments readable: use a config file"
    assert b"redis-server" in cmdline


def test_compose_health_check_needs_the_password(server):
    redis_service = load_compose(COMPOSE, env=COMPOSE_ENV)["services"]["redis"]
    kind, script = redis_service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    script = script.replace("redis-cli", f"redis-cli -p {server.port}")

    def check(env: dict[str, str]) -> int:
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=20).returncode

    assert check(base_env(REDISCLI_AUTH=redis_service["environment"]["REDISCLI_AUTH"])) == 0
    assert check(base_env()) != 0, "an unauthenticated ping must fail the health check"
    assert check(base_env(REDISCLI_AUTH="wrong")) != 0


def test_a_wrong_password_is_one_line_without_the_secret(server, tmp_path):
    wrong = "wrong-" + PASSWORD[:8]
    env = base_env(SLIP_BROKER_URL=server.url(password=wrong), SLIP_STORE=str(tmp_path / "store"))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    done = slip(["submit", "segment", str(tmp_path / "images"), "--prompt", "x"], env, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert wrong not in done.stderr + done.stdout, "error lines must not print the Redis password"
