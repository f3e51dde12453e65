"""Plumbing shared by the queue commands: settings read at the edge, one-line errors, following a job."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import typer

from slip.cli.common import EXIT_PARTIAL, fail, user_errors

EXIT_INTERRUPTED = 130  # Ctrl-C


def settings_from_env():
    """:class:`jobs.settings.Settings` from the environment, read here, at the command's edge (of the model
    settings, only what a job names: ``SLIP_ENGINE``, ``SLIP_SAM``, ``SLIP_CLIP``)."""
    from jobs.settings import PRODUCER_MODELS, Settings

    return Settings.from_env(os.environ, models=PRODUCER_MODELS)


def client_from_env():
    """A :class:`producer.client.QueueClient` for the environment's settings."""
    from producer.client import QueueClient

    return QueueClient(settings_from_env())


@contextmanager
def queue_errors() -> Iterator[None]:
    """SLIP errors, unreachable Redis and timeouts become one line on stderr and a non-zero exit."""
    import redis
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError

    from jobs.settings import DEFAULT_BROKER
    from producer.client import redis_hint

    try:
        with user_errors():
            yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError) as e:
        fail(redis_hint(os.environ.get("SLIP_BROKER_URL") or DEFAULT_BROKER, e))
    except CeleryTimeout as e:
        fail(f"no worker answered in time: start one with `celery -A worker worker -Q gpu,cpu` ({e})")


def print_summary(client, status) -> int:
    """One line of counts, one line per failed unit (up to 20), the exit code."""
    from jobs.model import UNITS

    counts = status.counts
    shown = ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("done", "failed"))
    unit = UNITS[status.manifest.kind]
    typer.echo(f"job {status.manifest.job_id}: {status.manifest.total} {unit}s: {shown}")
    if counts["failed"]:
        for index, name, reason in client.failed_units(status):
            typer.echo(f"  failed: {name or index}: {reason}")
        if status.retryable:
            typer.echo(f"  {status.retryable} failed for now (the cluster gave up re-sending them); "
                       f"`slip retry {status.manifest.job_id}` runs them again")
    if counts["lost"]:
        typer.echo(f"  {counts['lost']} {unit}s are not handed to the cluster (its Redis lost the job): "
                   f"`slip retry {status.manifest.job_id}` hands them over again")
    if counts["waiting"] or counts["queued"] or counts["running"]:
        typer.echo(f"  the job is still running on the cluster: follow it with `slip wait {status.manifest.job_id}`")
    return EXIT_PARTIAL if counts["failed"] or counts["lost"] else 0


def follow(client, job_id: str, timeout: Optional[float]) -> int:
    """A progress bar until the job is finished, then its summary; Ctrl-C leaves the job running. The exit code."""
    return print_summary(client, watch(client, job_id, timeout))


def watch(client, job_id: str, timeout: Optional[float], *, detail: Optional[Callable[[dict], str]] = None):
    """A progress bar until the job is finished (``detail`` words what a running unit reports, e.g. a training
    epoch); Ctrl-C leaves the job running. The last status read."""
    from producer.progress import job_progress

    def trouble(e: Exception) -> None:
        typer.echo(f"warning: cannot read the job's status right now ({type(e).__name__}: {e}); retrying", err=True)

    def notes() -> str:
        return "; ".join(filter(None, map(detail, client.progress_notes(job_id)[:3])))

    client.status(job_id)  # an unknown job is one line, before any progress bar is drawn
    try:
        with job_progress(job_id, notes=notes if detail else None,
                          run_rate=lambda: client.job(job_id).rate) as progress:
            status = client.wait(job_id, timeout_s=timeout, on_progress=progress, on_trouble=trouble)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: job {job_id} keeps running on the cluster; follow it with `slip wait {job_id}`",
                   err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if not status.finished:
        typer.echo(f"job {job_id}: still running after {timeout} s; follow it with `slip wait {job_id}`", err=True)
    return status
