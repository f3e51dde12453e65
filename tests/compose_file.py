"""docker-compose files as the tests read them: compose-style interpolation and override merging for the few
keys this project's files use, and ``docker-compose config`` itself where the binary is installed.

    config = load_compose(COMPOSE, TLS_OVERRIDE, env={"REDIS_PASSWORD": "pw", ...})
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
TLS_OVERRIDE = ROOT / "docker-compose.tls.yml"


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` substitution."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name, "")
        if op == ":-":
            return value or arg
        if op == ":?" and not value:
            raise ValueError(f"{name}: {arg}")
        return value

    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", one, text.replace("$$", "\0"))
    return text.replace("\0", "$")


def load_compose(*paths: Path, env: dict[str, str]) -> dict:
    """The files read by PyYAML (anchors and merge keys resolved), interpolated with ``env``, later files
    merged over earlier ones as compose does for these keys: ``command`` replaced, ``environment`` merged,
    ``ports`` appended, ``volumes`` merged by mount target."""
    config: dict = {}
    for path in paths:
        layer = yaml.safe_load(interpolate(Path(path).read_text(), env))
        for name, service in layer.get("services", {}).items():
            _merge_service(config.setdefault("services", {}).setdefault(name, {}), service)
        config.setdefault("volumes", {}).update(layer.get("volumes") or {})
    return config


def _merge_service(base: dict, over: dict) -> None:
    for key, value in over.items():
        if key == "environment":
            base.setdefault(key, {}).update(value)
        elif key == "ports":
            base[key] = [*base.get(key, []), *value]
        elif key == "volumes":
            targets = {_target(v): v for v in [*base.get(key, []), *value]}
            base[key] = list(targets.values())
        else:
            base[key] = value


def _target(volume) -> str:
    return volume.split(":")[1] if isinstance(volume, str) else volume["target"]
