"""Typed queue settings, read once from the environment where a process starts.

Every ``SLIP_*`` variable the queue understands is a field of :class:`Settings`, with its default and a
one-line meaning beside it; the model-side variables (``SLIP_SAM``, ``SLIP_DEVICE``, ...) are
:class:`slip.settings.ModelSettings`, held in ``models``. Invalid values raise
:class:`slip.errors.ConfigError` naming the variable; a process reads only what it uses (a producer reads
``SLIP_ENGINE``, ``SLIP_SAM`` and ``SLIP_CLIP`` of the model side, a worker all of it; ``slip --help`` reads
nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping

from slip.errors import ConfigError
from slip.settings import EnvReader, ModelSettings

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_STORE = "./slip-store"
BEATS_PER_DEATH = 6  # heartbeats a worker may miss in SLIP_DEAD_AFTER before it counts as dead
PRODUCER_MODELS = ("engine", "sam", "clip")  # the model settings a producer uses: what a job names


@dataclass(frozen=True)
class Settings:
    """Queue configuration; build it with :meth:`from_env` at the edge and pass it inward."""

    broker_url: str = DEFAULT_BROKER  # SLIP_BROKER_URL: Redis broker, redis://host:port/db
    result_backend: str = DEFAULT_BROKER  # SLIP_RESULT_BACKEND: task states; default = the broker
    store: str = DEFAULT_STORE  # SLIP_STORE: object store root, a directory or fsspec URL (s3://b/p)
    visibility_timeout_s: int = 3600  # SLIP_VISIBILITY_TIMEOUT: an unacknowledged message comes back after this
    task_time_limit_s: int = 1800  # SLIP_TASK_TIME_LIMIT: hard limit per task; soft limit is 90 % of it
    result_expires_s: int = 7 * 24 * 3600  # SLIP_RESULT_EXPIRES: task states and finished jobs kept this long in Redis
    dead_after_s: float = 10.0  # SLIP_DEAD_AFTER: a worker silent this long is dead; its chunks are sent again
    lost_after_s: float = 30.0  # SLIP_LOST_AFTER: a job idle this long, nothing queued or running: sent again
    max_attempts: int = 3  # SLIP_MAX_ATTEMPTS: sends of a chunk (worker deaths, lost messages, failures for now)
    models: ModelSettings = field(default_factory=ModelSettings)  # SLIP_SAM, SLIP_DEVICE, ...: slip.settings

    def __post_init__(self) -> None:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ConfigError(
                f"SLIP_VISIBILITY_TIMEOUT ({self.visibility_timeout_s} s) must exceed SLIP_TASK_TIME_LIMIT "
                f"({self.task_time_limit_s} s), or running tasks get delivered twice"
            )
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"SLIP_BROKER_URL {self.broker_url!r} is not a Redis URL (redis://host:port/db)")

    @property
    def soft_time_limit_s(self) -> float:
        """Soft limit: the task gets SoftTimeLimitExceeded and can record a clean failure."""
        return round(self.task_time_limit_s * 0.9, 3)

    @property
    def heartbeat_s(self) -> float:
        """Seconds between a worker's beats (and reaper passes): SLIP_DEAD_AFTER / 6."""
        return self.dead_after_s / BEATS_PER_DEATH

    @staticmethod
    def from_env(env: Mapping[str, str], *, models: Iterable[str] | None = None) -> "Settings":
        """Settings from ``SLIP_*`` variables (missing ones take the defaults above); ``models``: the model
        settings to read (default: all; :data:`PRODUCER_MODELS` for a producer)."""
        read = EnvReader(env)
        broker = read.text("SLIP_BROKER_URL", DEFAULT_BROKER)
        return Settings(
            broker_url=broker,
            result_backend=read.text("SLIP_RESULT_BACKEND", broker),
            store=read.text("SLIP_STORE", DEFAULT_STORE),
            visibility_timeout_s=read.number("SLIP_VISIBILITY_TIMEOUT", 3600, int, minimum=1),
            task_time_limit_s=read.number("SLIP_TASK_TIME_LIMIT", 1800, int, minimum=1),
            result_expires_s=read.number("SLIP_RESULT_EXPIRES", 7 * 24 * 3600, int, minimum=60),
            dead_after_s=read.number("SLIP_DEAD_AFTER", 10.0, float, minimum=1.0),
            lost_after_s=read.number("SLIP_LOST_AFTER", 30.0, float, minimum=1.0),
            max_attempts=read.number("SLIP_MAX_ATTEMPTS", 3, int, minimum=1),
            models=ModelSettings.from_env(env, models),
        )

    def to_json(self) -> dict:
        """JSON-friendly view (for the health task), the URLs' passwords hidden."""
        from kombu.utils.url import maybe_sanitize_url

        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(broker_url=maybe_sanitize_url(self.broker_url), result_backend=maybe_sanitize_url(self.result_backend),
                    models=self.models.to_json())
        return data
