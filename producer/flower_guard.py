"""Flower with every page behind its auth, ``/metrics`` and ``/healthcheck`` included.

    python -m producer.flower_guard --port=5555 --address=127.0.0.1     # = celery -A worker flower ..., guarded

Flower checks its basic auth (``FLOWER_BASIC_AUTH`` / ``--basic-auth``) or OAuth on every page but two:
``/metrics`` (Prometheus: task names, counts and runtimes, worker names) and ``/healthcheck`` answer anyone
who reaches the port. This launcher puts those two behind the same check (401 without valid credentials),
then runs ``celery -A worker flower`` with the given options in this process. Without any auth configured
Flower stays open, as it is. A Prometheus scraper passes the credentials (``basic_auth`` in its job).
"""

from __future__ import annotations

import sys
from typing import Sequence

GUARDED = ("/metrics", "/healthcheck")  # Flower's routes that skip its auth


def guard_flower_routes() -> None:
    """Swap Flower's unauthenticated handlers for subclasses that require its logged-in user. Call before
    Flower builds its application (it reads ``flower.urls.handlers`` then)."""
    import tornado.web
    from flower import urls
    from flower.views.monitor import Healthcheck, Metrics

    class GuardedMetrics(Metrics):
        @tornado.web.authenticated
        async def get(self):
            await super().get()

    class GuardedHealthcheck(Healthcheck):
        @tornado.web.authenticated
        async def get(self):
            await super().get()

    guarded, replaced = {"/metrics": GuardedMetrics, "/healthcheck": GuardedHealthcheck}, set()
    for i, route in enumerate(urls.handlers):
        if isinstance(route, tuple) and route[0] in guarded:
            urls.handlers[i] = (route[0], guarded[route[0]], *route[2:])
            replaced.add(route[0])
    if replaced != set(GUARDED):
        raise RuntimeError(f"this Flower has no route {sorted(set(GUARDED) - replaced)} to guard (flower.urls changed)")


def main(argv: Sequence[str] | None = None) -> None:
    """``celery -A worker flower ARGV`` with :func:`guard_flower_routes` applied."""
    from celery.__main__ import main as celery_main

    guard_flower_routes()
    sys.argv = ["celery", "-A", "worker", "flower", *(sys.argv[1:] if argv is None else argv)]
    celery_main()


if __name__ == "__main__":
    main()
