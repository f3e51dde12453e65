"""Typed worker and producer settings, read once from the environment where a process starts.

Every ``SLIP_*`` variable the queue understands is a field of :class:`Settings`, with its default and
a one-line meaning beside it. Invalid values raise :class:`slip.errors.ConfigError` naming the variable;
only the commands that need the settings read them (``slip --help`` reads none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from slip.errors import ConfigError

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_STORE = "./slip-store"
DEFAULT_SAM = "vit_b"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """Queue configuration; build it with :meth:`from_env` at the edge and pass it inward."""

    broker_url: str = DEFAULT_BROKER  # SLIP_BROKER_URL: Redis broker, redis://host:port/db
    result_backend: str = DEFAULT_BROKER  # SLIP_RESULT_BACKEND: task states; default = the broker
    store: str = DEFAULT_STORE  # SLIP_STORE: object store root, a directory or fsspec URL (s3://b/p)
    device: str = "auto"  # SLIP_DEVICE: auto | cpu | cuda | cuda:N (one GPU per worker)
    dtype: str = "fp32"  # SLIP_DTYPE: compute precision, fp32 | bf16 (CPU and GPU) | fp16 (GPU only)
    sam: str = DEFAULT_SAM  # SLIP_SAM: SAM spec, vit_h | vit_l | vit_b | synth | tiny-random | PATH
    clip: str = DEFAULT_CLIP  # SLIP_CLIP: ranker spec, HF hub id | DIR | synth | tiny-random
    cache_dir: Path | None = None  # SLIP_CACHE: weights cache; None = ~/.cache/slip
    visibility_timeout_s: int = 3600  # SLIP_VISIBILITY_TIMEOUT: unacked message redelivered after this
    task_time_limit_s: int = 1800  # SLIP_TASK_TIME_LIMIT: hard limit per task; soft limit is 90 % of it
    result_expires_s: int = 7 * 24 * 3600  # SLIP_RESULT_EXPIRES: task states kept this long in Redis
    max_deliveries: int = 3  # SLIP_MAX_DELIVERIES: a message delivered more often is poison, failed
    max_retries: int = 5  # SLIP_MAX_RETRIES: retries of a transient failure before giving up
    retry_backoff_s: float = 2.0  # SLIP_RETRY_BACKOFF: first retry delay; doubles on each retry
    points_per_batch: int = 64  # SLIP_POINTS_PER_BATCH: SAM point prompts per forward pass
    batch_size: int = 64  # SLIP_BATCH_SIZE: segment crops per ranker forward pass
    log_level: str = "INFO"  # SLIP_LOG_LEVEL: worker log level
    threads: int | None = None  # SLIP_THREADS: torch intra-op threads per worker process; None = cores / concurrency
    heartbeat_s: float = 2.0  # SLIP_HEARTBEAT: seconds between a worker's liveness beats
    dead_after_s: float = 15.0  # SLIP_DEAD_AFTER: a worker silent this long is dead; its running chunks are re-sent
    tick_s: float = 3.0  # SLIP_TICK: seconds between feeder/reconciler passes (one worker at a time runs them)
    lost_after_s: float = 30.0  # SLIP_LOST_AFTER: a sent chunk found nowhere (queue, worker) this long is re-sent
    max_resends: int = 3  # SLIP_MAX_RESENDS: re-sends of a chunk that failed transiently or vanished

    def __post_init__(self) -> None:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ConfigError(
                f"SLIP_VISIBILITY_TIMEOUT ({self.visibility_timeout_s} s) must exceed SLIP_TASK_TIME_LIMIT "
                f"({self.task_time_limit_s} s), or running tasks get delivered twice"
            )
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"SLIP_BROKER_URL {self.broker_url!r} is not a Redis URL (redis://host:port/db)")
        if self.dead_after_s <= 2 * self.heartbeat_s:
            raise ConfigError(f"SLIP_DEAD_AFTER ({self.dead_after_s} s) must exceed twice SLIP_HEARTBEAT "
                              f"({self.heartbeat_s} s), or live workers are declared dead")

    @property
    def soft_time_limit_s(self) -> float:
        """Soft limit: the task gets SoftTimeLimitExceeded and can record a clean failure."""
        return round(self.task_time_limit_s * 0.9, 3)

    @staticmethod
    def from_env(env: Mapping[str, str]) -> "Settings":
        """Settings from ``SLIP_*`` variables (missing ones take the defaults above)."""
        read = _Reader(env)
        broker = read.str("SLIP_BROKER_URL", DEFAULT_BROKER)
        return Settings(
            broker_url=broker,
            result_backend=read.str("SLIP_RESULT_BACKEND", broker),
            store=read.str("SLIP_STORE", DEFAULT_STORE),
            device=read.choice("SLIP_DEVICE", "auto", r"auto|cpu|cuda|cuda:\d+|mps"),
            dtype=read.choice("SLIP_DTYPE", "fp32", r"fp32|fp16|bf16"),
            sam=read.str("SLIP_SAM", DEFAULT_SAM),
            clip=read.str("SLIP_CLIP", DEFAULT_CLIP),
            cache_dir=read.path("SLIP_CACHE"),
            visibility_timeout_s=read.number("SLIP_VISIBILITY_TIMEOUT", 3600, int, minimum=1),
            task_time_limit_s=read.number("SLIP_TASK_TIME_LIMIT", 1800, int, minimum=1),
            result_expires_s=read.number("SLIP_RESULT_EXPIRES", 7 * 24 * 3600, int, minimum=60),
            max_deliveries=read.number("SLIP_MAX_DELIVERIES", 3, int, minimum=1),
            max_retries=read.number("SLIP_MAX_RETRIES", 5, int, minimum=0),
            retry_backoff_s=read.number("SLIP_RETRY_BACKOFF", 2.0, float, minimum=0.0),
            points_per_batch=read.number("SLIP_POINTS_PER_BATCH", 64, int, minimum=1),
            batch_size=read.number("SLIP_BATCH_SIZE", 64, int, minimum=1),
            log_level=read.choice("SLIP_LOG_LEVEL", "INFO", r"DEBUG|INFO|WARNING|ERROR|CRITICAL"),
            threads=read.number("SLIP_THREADS", None, int, minimum=1),
            heartbeat_s=read.number("SLIP_HEARTBEAT", 2.0, float, minimum=0.1),
            dead_after_s=read.number("SLIP_DEAD_AFTER", 15.0, float, minimum=1.0),
            tick_s=read.number("SLIP_TICK", 3.0, float, minimum=0.1),
            lost_after_s=read.number("SLIP_LOST_AFTER", 30.0, float, minimum=1.0),
            max_resends=read.number("SLIP_MAX_RESENDS", 3, int, minimum=0),
        )

    def to_json(self) -> dict:
        """JSON-friendly view (for the health task); no secrets are kept in settings beyond URLs."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return data


class _Reader:
    """Typed access to an environment mapping; every error names the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def path(self, name: str) -> Path | None:
        value = self._raw(name)
        return None if value is None else Path(value).expanduser()

    def choice(self, name: str, default: str, pattern: str) -> str:
        value = self._raw(name) or default
        if not re.fullmatch(pattern, value):
            raise ConfigError(f"{name}={value!r} is invalid: expected {pattern.replace('|', ' | ')}")
        return value

    def number(self, name: str, default: T, kind: Callable[[str], T], *, minimum: float) -> T:
        value = self._raw(name)
        if value is None:
            return default
        try:
            parsed = kind(value)
        except ValueError as e:
            raise ConfigError(f"{name}={value!r} is not a valid {kind.__name__}") from e
        if parsed < minimum:  # type: ignore[operator]
            raise ConfigError(f"{name}={value!r} must be at least {minimum}")
        return parsed
