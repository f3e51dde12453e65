"""docker-compose.yml, Dockerfile and .dockerignore: what the deployment promises, checked without a Docker
engine.

Every structural check runs twice: on the file as PyYAML reads it (anchors and merge keys resolved, ``${VAR}``
interpolated by ``tests/compose_file.py``) and on the output of ``docker-compose config`` (Debian's
``docker-compose`` package; that half is skipped only when the binary is missing). The checks tie the compose
file to the real settings: every ``SLIP_*`` variable it sets must be one that ``jobs.settings`` or
``slip.settings`` reads, and the resolved environment must build valid :class:`jobs.settings.Settings`.
Redis's password and TLS options are run for real against ``redis-server`` in tests/ops/.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from urllib.parse import urlsplit

import pytest
import yaml

from compose_file import COMPOSE, TLS_OVERRIDE, interpolate, load_compose

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
WORKER_CMD = ["celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "--concurrency", "1",
              "--hostname", "worker@%h", "--loglevel", "INFO"]
# what the tests export; nothing else from the caller's shell leaks into the interpolation
TEST_ENV = {"FLOWER_USER": "ops", "FLOWER_PASSWORD": "s3cret", "REDIS_PASSWORD": "0123abcd"}
FLOWER_CMD = ["python", "-m", "producer.flower_guard", "--port=5555"]
TLS_OPTIONS = ["--port", "6379", "--tls-port", "6380", "--tls-cert-file", "/tls/redis.crt", "--tls-key-file",
               "/tls/redis.key", "--tls-ca-cert-file", "/tls/ca.crt", "--tls-auth-clients", "no"]
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


# ---------------------------------------------------------------------------------------------- loading


def _load_pyyaml() -> dict:
    return load_compose(COMPOSE, env=TEST_ENV)


def _compose_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLIP_", "FLOWER_", "REDIS_", "COMPOSE_", "AWS_", "WORKER_"))}
    env.update(TEST_ENV if extra is None else extra)
    return env


def _docker_compose(*args: str, env: dict[str, str] | None = None,
                    files: tuple[Path, ...] = (COMPOSE,)) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose); CI installs it")
    return subprocess.run([exe, *(a for f in files for a in ("-f", str(f))), "--project-directory", str(ROOT), *args],
                          capture_output=True, text=True, timeout=60, env=_compose_env(env), cwd=ROOT)


def _load_docker_compose(*files: Path) -> dict:
    done = _docker_compose("--profile", "producer", "--profile", "multi-gpu", "config", files=files or (COMPOSE,))
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(params=["pyyaml", "docker-compose"], scope="module")
def config(request) -> dict:
    """The compose model, as read by PyYAML or resolved by ``docker-compose config``."""
    return _load_pyyaml() if request.param == "pyyaml" else _load_docker_compose()


# ---------------------------------------------------------------------------------------------- helpers


def _seconds(duration) -> float:
    """Compose duration ('11m', '1m30s', '90s', '1h', or a number of seconds) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(duration))
    assert parts and "".join(a + b for a, b in parts) == str(duration), f"bad duration {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(a) * scale[b] for a, b in parts)


def _volumes(service: dict) -> dict[str, str]:
    """Mount target -> source for a service's volumes (short 'src:dst[:mode]' or long syntax)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out[dst] = src
    return out


def _env(service: dict) -> dict[str, str | None]:
    """The service's environment; None for a variable passed through from the host (``NAME:`` or
    ``- NAME``), which is left unset in the container when the host has no value."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command")
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _published_ports(service: dict) -> list[tuple[str, str, str]]:
    """(host ip, published port, container port) of each port mapping ('' for an unset host ip:
    every interface); short syntax ``[ip:]published:target[/proto]`` or the long one."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((str(p.get("host_ip", "")), str(p.get("published", "")), str(p["target"])))
        else:
            parts = str(p).split("/")[0].split(":")
            ip = ":".join(parts[:-2]) if len(parts) > 2 else ""
            out.append((ip, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return out


def _gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _workers(config: dict) -> dict[str, dict]:
    return {name: s for name, s in config["services"].items() if name == "worker" or name.startswith("worker-")}


# ---------------------------------------------------------------------------------------------- compose


def test_redis_is_persistent_and_never_evicts(config):
    redis = config["services"]["redis"]
    assert str(redis["image"]).split(":")[0] == "redis" and str(redis["image"]).split(":")[1].startswith("7")
    cmd = _command(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--maxmemory" in cmd, "noeviction only means something with a memory cap"
    data = _volumes(redis)["/data"]
    assert data in config["volumes"], "the AOF must live on a named volume"
    test = redis["healthcheck"]["test"]
    assert test == ["CMD-SHELL", "redis-cli ping | grep -q PONG"], "redis-cli exits 0 on NOAUTH: grep for PONG"
    assert _env(redis)["REDISCLI_AUTH"] == TEST_ENV["REDIS_PASSWORD"], "the health check authenticates"


def test_redis_requires_its_password_and_is_not_published(config):
    redis = config["services"]["redis"]
    cmd = _command(redis)
    assert cmd[cmd.index("--requirepass") + 1] == TEST_ENV["REDIS_PASSWORD"]
    assert not redis.get("ports"), "Redis stays on the Docker network (docker-compose.tls.yml publishes TLS)"


def _broker_users(config: dict) -> dict[str, dict]:
    """Every service that talks to Redis (all but Redis itself)."""
    return {name: s for name, s in config["services"].items() if name != "redis"}


def test_every_redis_url_carries_the_password(config):
    users = _broker_users(config)
    assert {"worker", "flower", "producer"} <= set(users)
    for name, svc in users.items():
        env = _env(svc)
        for var in ("SLIP_BROKER_URL", "SLIP_RESULT_BACKEND"):
            if env.get(var) is None:
                continue
            url = urlsplit(env[var])
            assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379), (name, var)
            assert url.password == TEST_ENV["REDIS_PASSWORD"], f"{name}: {var} has no Redis password"


def test_workers_reserve_one_distinct_gpu_each(config):
    workers = _workers(config)
    assert "worker" in workers
    seen = []
    for name, svc in workers.items():
        devices = _gpu_devices(svc)
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        if name == "worker":
            assert int(dev["count"]) == 1 and "device_ids" not in dev
            seen.append("0")  # Docker resolves count 1 to device 0
        else:
            assert "count" not in dev and len(dev["device_ids"]) == 1, name
            seen.extend(str(d) for d in dev["device_ids"])
        assert _env(svc)["SLIP_DEVICE"] == "cuda:0", "a container sees only its own GPU, as cuda:0"
    assert len(seen) == len(set(seen)), f"two worker services share a GPU: {seen}"
    assert all(workers[n].get("profiles") == ["multi-gpu"] for n in workers if n != "worker")


def test_worker_is_scalable_and_stops_gracefully(config):
    for name, svc in _workers(config).items():
        assert "container_name" not in svc and "ports" not in svc, f"{name} cannot be scaled"
        assert _command(svc) == WORKER_CMD
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["stop_signal"] == "SIGTERM"
        grace = _seconds(svc["stop_grace_period"])
        env = _env(svc)
        limit = int(env["SLIP_TASK_TIME_LIMIT"])
        assert grace > limit, f"{name}: stop_grace_period {grace} s does not cover a {limit} s task"
        assert int(env["SLIP_VISIBILITY_TIMEOUT"]) > grace > limit


def test_time_limits_are_the_worker_defaults(config):
    """The README documents the worker's defaults; compose must not quietly run with others."""
    from jobs.settings import Settings

    defaults = Settings()
    for name, svc in [*_workers(config).items(), ("producer", config["services"]["producer"])]:
        env = _env(svc)
        assert int(env["SLIP_TASK_TIME_LIMIT"]) == defaults.task_time_limit_s, name
        assert int(env["SLIP_VISIBILITY_TIMEOUT"]) == defaults.visibility_timeout_s, name


def _store_users(config: dict) -> list[tuple[str, dict]]:
    """Workers, the producer and the dashboard: the services that read or write the store."""
    return [*_workers(config).items(), *((n, config["services"][n]) for n in ("producer", "dashboard"))]


def test_aws_variables_pass_through_to_store_users_only(config):
    for name, svc in _store_users(config):
        env = _env(svc)
        assert {v: env.get(v, "missing") for v in AWS_VARS} == dict.fromkeys(AWS_VARS), (
            f"{name}: AWS variables must be passed through from the host without a default")
    assert not set(AWS_VARS) & set(_env(config["services"]["flower"])), "Flower needs no store credentials"


def test_aws_variables_reach_the_containers_when_set():
    aws = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "shh", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_ENDPOINT_URL": "http://minio:9000"}
    env = {**TEST_ENV, **aws, "SLIP_STORE": "s3://bucket/slip", "SLIP_THREADS": "4"}
    done = _docker_compose("--profile", "producer", "config", env=env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name in ("worker", "producer"):
        resolved = _env(services[name])
        assert {k: resolved[k] for k in aws} == aws and resolved["AWS_SESSION_TOKEN"] is None, name
        assert resolved["SLIP_STORE"] == "s3://bucket/slip" and resolved["SLIP_THREADS"] == "4", name


def test_store_and_model_cache_are_shared_volumes(config):
    workers = _workers(config)
    producer = config["services"]["producer"]
    for svc in [*workers.values(), producer]:
        env, vols = _env(svc), _volumes(svc)
        assert vols[env["SLIP_STORE"]] == "slip-store"
    for svc in workers.values():
        env, vols = _env(svc), _volumes(svc)
        assert vols[env["SLIP_CACHE"]] == "model-cache"
    assert {"slip-store", "model-cache"} <= set(config["volumes"])


def test_flower_has_basic_auth_and_port_5555(config):
    flower = config["services"]["flower"]
    assert _command(flower) == FLOWER_CMD, "Flower through the guard: /metrics and /healthcheck need auth too"
    assert _published_ports(flower) == [("127.0.0.1", "5555", "5555")], "Flower listens on loopback by default"
    assert _env(flower)["FLOWER_BASIC_AUTH"] == "ops:s3cret"
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"


def test_dashboard_is_read_only_behind_flowers_auth_on_loopback(config):
    dashboard = config["services"]["dashboard"]
    assert _command(dashboard) == ["slip", "dashboard", "--address", "0.0.0.0", "--port", "5556"]
    assert _published_ports(dashboard) == [("127.0.0.1", "5556", "5556")], "loopback by default"
    assert _env(dashboard)["FLOWER_BASIC_AUTH"] == _env(config["services"]["flower"])["FLOWER_BASIC_AUTH"]
    store = _env(dashboard)["SLIP_STORE"]
    mounts = {v["target"]: v for v in dashboard["volumes"]} if isinstance(dashboard["volumes"][0], dict) else \
        {v.split(":")[1]: {"source": v.split(":")[0], "read_only": v.endswith(":ro")} for v in dashboard["volumes"]}
    assert mounts[store]["source"] == "slip-store" and mounts[store]["read_only"], "the dashboard only reads"
    assert "deploy" not in dashboard, "no GPU for a web page"


def test_producer_runs_once(config):
    producer = config["services"]["producer"]
    assert producer["profiles"] == ["producer"]
    assert str(producer["restart"]) == "no"
    cmd = _command(producer)
    assert cmd[:4] == ["slip", "submit", "segment", "/data"] and "--wait" in cmd
    assert cmd[cmd.index("--prompt") + 1].strip()
    assert "/data" in _volumes(producer)


def test_compose_env_builds_valid_worker_settings(config):
    from jobs.settings import Settings

    known = {name for path in (ROOT / "jobs" / "settings.py", ROOT / "slip" / "settings.py")
             for name in re.findall(r'"(SLIP_[A-Z_]+)"', path.read_text())}
    for name, svc in _store_users(config):
        env = _env(svc)
        unknown = {k for k in env if k.startswith("SLIP_")} - known
        assert not unknown, f"{name} sets variables the settings never read: {unknown}"
        settings = Settings.from_env(env)
        assert settings.store == "/store" and str(settings.models.cache_dir) == "/cache"


def test_flower_can_be_published_on_purpose():
    done = _docker_compose("config", env={**TEST_ENV, "FLOWER_BIND": "0.0.0.0", "FLOWER_PORT": "8555"})
    assert done.returncode == 0, done.stderr
    assert _published_ports(yaml.safe_load(done.stdout)["services"]["flower"]) == [("0.0.0.0", "8555", "5555")]


@pytest.mark.parametrize("missing", ["FLOWER_USER", "FLOWER_PASSWORD", "REDIS_PASSWORD"])
def test_docker_compose_requires_the_credentials(missing):
    env = {k: v for k, v in TEST_ENV.items() if k != missing}
    done = _docker_compose("config", "-q", env=env)
    assert done.returncode != 0 and missing in done.stderr, done.stderr
    with pytest.raises(ValueError, match=missing):
        interpolate(COMPOSE.read_text(), env)


def test_docker_compose_config_is_valid_for_every_profile():
    for profiles in ([], ["producer"], ["multi-gpu"], ["producer", "multi-gpu"]):
        args = [a for p in profiles for a in ("--profile", p)]
        done = _docker_compose(*args, "config", "--services")
        assert done.returncode == 0, done.stderr
        assert {"redis", "worker", "flower", "dashboard"} <= set(done.stdout.split())


# ---------------------------------------------------------------------------------------------- TLS override


@pytest.fixture(params=["pyyaml", "docker-compose"], scope="module")
def tls_config(request) -> dict:
    """docker-compose.yml with docker-compose.tls.yml over it."""
    if request.param == "pyyaml":
        return load_compose(COMPOSE, TLS_OVERRIDE, env=TEST_ENV)
    return _load_docker_compose(COMPOSE, TLS_OVERRIDE)


def test_tls_override_is_the_same_redis_plus_a_tls_port(config, tls_config):
    base, tls = config["services"]["redis"], tls_config["services"]["redis"]
    assert _command(tls) == _command(base) + TLS_OPTIONS, "the override repeats the base command, TLS added"
    assert _published_ports(tls) == [("0.0.0.0", "6380", "6380")], "only the TLS port is published"
    assert _volumes(tls)["/tls"].endswith("tls") and _volumes(tls)["/data"] == "redis-data"
    assert tls["healthcheck"] == base["healthcheck"] and _env(tls) == _env(base)
    for name, svc in _broker_users(tls_config).items():  # the services beside Redis keep the plain port
        assert urlsplit(_env(svc)["SLIP_BROKER_URL"]).port == 6379, name


def test_tls_port_can_be_bound_to_one_interface():
    env = {**TEST_ENV, "REDIS_TLS_BIND": "10.0.0.5", "REDIS_TLS_PORT": "16380", "REDIS_TLS_DIR": "/etc/slip/tls"}
    done = _docker_compose("config", env=env, files=(COMPOSE, TLS_OVERRIDE))
    assert done.returncode == 0, done.stderr
    redis = yaml.safe_load(done.stdout)["services"]["redis"]
    assert _published_ports(redis) == [("10.0.0.5", "16380", "6380")]
    assert _volumes(redis)["/tls"] == "/etc/slip/tls"


# ---------------------------------------------------------------------------------------------- image


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_and_runs_a_worker_as_non_root():
    import json

    steps = _dockerfile()
    assert steps[0][0] == "FROM"
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    lock = re.search(r"uv pip install --system --compile-bytecode --require-hashes --no-deps -r (\S+)", runs)
    assert lock and lock.group(1).endswith("runtime.txt"), "the image installs the runtime lock, hash-checked"
    assert re.search(r"uv pip install --system --compile-bytecode --no-deps \.", runs), (
        "the project goes on top, without resolving")  # bytecode at build: the image's user cannot write it
    assert "useradd" in runs
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the worker must not run as root"
    volumes = json.loads(next(arg for op, arg in steps if op == "VOLUME"))
    assert {"/store", "/cache"} <= set(volumes)
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert "SLIP_STORE=/store" in env and "SLIP_CACHE=/cache" in env
    cmd = json.loads(next(arg for op, arg in reversed(steps) if op == "CMD"))
    assert cmd == WORKER_CMD
    copied = {arg.split()[0] for op, arg in steps if op == "COPY"}
    assert {"slip", "worker", "producer", "pyproject.toml"} <= copied
    for path in copied:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"


def test_dockerignore_keeps_the_context_small():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "tests", "slip-store"} <= patterns
    copied = {arg.split()[0] for op, arg in _dockerfile() if op == "COPY"}
    assert not copied & patterns, "the Dockerfile copies something .dockerignore excludes"
