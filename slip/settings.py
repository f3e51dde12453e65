"""The model-side settings, declared once: which models a process loads and how it runs them.

Every command that loads models (``slip segment``, ``slip calibrate``, ``slip evaluate-local``, ``slip
compare``, the workers) takes its defaults from :class:`ModelSettings`, validated here and nowhere else:

=====================  ===================  ================================================================
field                  variable             meaning
=====================  ===================  ================================================================
sam                    SLIP_SAM             SAM spec (vit_h | vit_l | vit_b | synth | PATH | hub id ...)
clip                   SLIP_CLIP            ranker spec (hub id | DIR | synth | ...)
engine                 SLIP_ENGINE          how prompts become masks: slip (SAM + ranker) | sam3 | sam3-rank
device                 SLIP_DEVICE          auto | cpu | cuda | cuda:N | mps
dtype                  SLIP_DTYPE           compute precision: fp32 | bf16 (CPU and GPU) | fp16 (GPU)
threads                SLIP_THREADS         torch intra-op threads per process (None: the process decides)
cache_dir              SLIP_CACHE           weights cache (None: ~/.cache/slip)
points_per_batch       SLIP_POINTS_PER_BATCH  SAM point prompts per forward pass (speed and memory only)
batch_size             SLIP_BATCH_SIZE      segment crops per ranker forward pass (speed and memory only)
log_level              SLIP_LOG_LEVEL       DEBUG | INFO | WARNING | ERROR | CRITICAL
=====================  ===================  ================================================================

Precedence: a command-line flag > its ``SLIP_*`` variable > the default here. A process reads only the
variables it uses (:meth:`ModelSettings.from_env` with ``fields``), so a bad value of one it ignores never
stops it. Each error names the flag and the variable. :class:`EnvReader` is the typed reader the queue's
own settings use too. This module imports no model code.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from slip.errors import ConfigError

T = TypeVar("T")
DEFAULT_SAM = "vit_b"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
ENGINES = ("slip", "sam3", "sam3-rank")  # slip: SAM proposals ranked by a CLIP-style model (the paper)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICE = r"auto|cpu|cuda|cuda:\d+|mps"
DTYPE = r"fp32|fp16|bf16"
ENV = {  # field -> variable
    "sam": "SLIP_SAM", "clip": "SLIP_CLIP", "engine": "SLIP_ENGINE", "device": "SLIP_DEVICE",
    "dtype": "SLIP_DTYPE", "threads": "SLIP_THREADS", "cache_dir": "SLIP_CACHE",
    "points_per_batch": "SLIP_POINTS_PER_BATCH", "batch_size": "SLIP_BATCH_SIZE", "log_level": "SLIP_LOG_LEVEL",
}
HELP = {
    "sam": "SAM spec: vit_h | vit_l | vit_b | synth | tiny-random | sam2.1-hiera-* | edgetam | sam3-tracker | PATH | "
           "Hugging Face model dir or cached id.",
    "clip": "Ranker spec: Hugging Face hub id | DIR | synth | tiny-random.",
    "engine": "How prompts become masks: slip (SAM proposals ranked by the ranker) | sam3 | sam3-rank.",
    "device": "auto | cpu | cuda | cuda:N | mps.",
    "dtype": "Compute precision: fp32 | bf16 (CPU and GPU) | fp16 (GPU).",
    "threads": "torch intra-op threads (default: torch's, or cores / concurrency in a worker).",
    "cache_dir": "Weights cache directory (default ~/.cache/slip).",
    "points_per_batch": "SAM point prompts per forward pass (speed and memory only).",
    "batch_size": "Segment crops per ranker forward pass (speed and memory only).",
    "log_level": "Log level: DEBUG | INFO | WARNING | ERROR | CRITICAL.",
}


@dataclass(frozen=True)
class ModelSettings:
    """Which models a process loads and how it runs them; validated on construction."""

    sam: str = DEFAULT_SAM  # SAM spec
    clip: str = DEFAULT_CLIP  # ranker spec
    engine: str = "slip"  # slip | sam3 | sam3-rank
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    threads: int | None = None  # torch intra-op threads; None = the process decides
    cache_dir: Path | None = None  # weights cache; None = ~/.cache/slip
    points_per_batch: int = 64  # SAM point prompts per forward pass
    batch_size: int = 64  # crops per ranker forward pass
    log_level: str = "INFO"  # logging level name

    def __post_init__(self) -> None:
        for name in ("sam", "clip"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{_where(name)} is empty: name a model spec")
        _check(self.engine, "|".join(re.escape(e) for e in ENGINES), "engine")
        _check(self.device, DEVICE, "device")
        _check(self.dtype, DTYPE, "dtype")
        _check(self.log_level, "|".join(LOG_LEVELS), "log_level")
        for name in ("threads", "points_per_batch", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{_where(name)}={value!r} must be at least 1")

    @staticmethod
    def from_env(env: Mapping[str, str], fields: Iterable[str] | None = None, **flags: Any) -> "ModelSettings":
        """Settings from the ``SLIP_*`` variables of ``fields`` (default: all; the others keep their defaults),
        under the command-line ``flags`` that were given (None = not given: its variable is read)."""
        given_flags = {k: v for k, v in flags.items() if v is not None}
        wanted = tuple(n for n in (tuple(ENV) if fields is None else tuple(fields)) if n not in given_flags)
        unknown = set(wanted) - set(ENV)
        if unknown:
            raise ValueError(f"not model settings: {sorted(unknown)}")
        read = EnvReader(env)
        parse: dict[str, Callable[[str], Any]] = {
            "threads": lambda v: read.number(v, None, int, minimum=1),
            "points_per_batch": lambda v: read.number(v, 64, int, minimum=1),
            "batch_size": lambda v: read.number(v, 64, int, minimum=1),
            "cache_dir": read.path,
        }
        given = {}
        for name in wanted:
            value = parse.get(name, read.text)(ENV[name])
            if value is not None:
                given[name] = value.upper() if name == "log_level" else value
        return ModelSettings(**given, **given_flags)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return data


def configure_logging(level: str) -> None:
    """Apply ``level`` (a :data:`LOG_LEVELS` name) to the ``slip`` loggers of a command-line process; their
    records go to stderr, one line each (a worker's logging is Celery's: the worker passes the level on)."""
    logger = logging.getLogger("slip")
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def model_flag(name: str, *flags: str) -> Any:
    """A ``typer.Option`` for the setting ``name``: default None (then ``SLIP_*``, then the default here),
    with the variable named in its help. Pass the values to :meth:`ModelSettings.with_flags`."""
    import typer

    default = getattr(ModelSettings, name, None)
    shown = f" Default: ${ENV[name]}, else {default}." if default is not None else f" Default: ${ENV[name]}."
    return typer.Option(None, *(flags or (f"--{name.replace('_', '-')}",)), help=HELP[name] + shown,
                        show_default=False)


class EnvReader:
    """Typed access to an environment mapping; every error names the variable (and its flag, if any)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None or not value.strip() else value.strip()

    def text(self, name: str, default: str | None = None) -> str | None:
        return self.raw(name) or default

    def path(self, name: str) -> Path | None:
        value = self.raw(name)
        return None if value is None else Path(value).expanduser()

    def choice(self, name: str, default: str, pattern: str) -> str:
        value = self.raw(name) or default
        if not re.fullmatch(pattern, value):
            raise ConfigError(f"{name}={value!r} is invalid: expected {pattern.replace('|', ' | ')}")
        return value

    def number(self, name: str, default: T, kind: Callable[[str], T], *, minimum: float) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            parsed = kind(value)
        except ValueError as e:
            raise ConfigError(f"{name}={value!r} is not a valid {kind.__name__}") from e
        if parsed < minimum:  # type: ignore[operator]
            raise ConfigError(f"{name}={value!r} must be at least {minimum}")
        return parsed


def _where(name: str) -> str:
    return f"--{name.replace('_', '-')} / {ENV[name]}"


def _check(value: str, pattern: str, name: str) -> None:
    if not re.fullmatch(pattern, value):
        choices = pattern.replace(r"\d+", "N").replace("\\", "").replace("|", " | ")
        raise ConfigError(f"{_where(name)}={value!r} is invalid: expected {choices}")
