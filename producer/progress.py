"""A rich progress bar for a job: done / failed / rate / ETA, fed by the client's progress callbacks."""

from __future__ import annotations

import time
from typing import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class JobProgress:
    """Call it with a counts dict (``total`` + ``done``/``failed``/``lost`` or ``finished``)."""

    def __init__(self, progress: Progress, job_id: str) -> None:
        self.progress = progress
        self.task = progress.add_task(job_id, total=None, done=0, failed=0, rate=0.0)
        self.start = time.monotonic()
        self.first_finished: int | None = None

    def __call__(self, counts: dict) -> None:
        total = counts["total"]
        finished = counts.get("finished", counts.get("done", 0) + counts.get("failed", 0) + counts.get("lost", 0))
        if self.first_finished is None:
            self.first_finished = finished  # images already done before this run do not count in the rate
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = (finished - self.first_finished) / elapsed
        self.progress.update(
            self.task, total=total, completed=finished,
            done=counts.get("done", finished), failed=counts.get("failed", 0), rate=rate,
        )


@contextmanager
def job_progress(job_id: str, *, console: Console | None = None) -> Iterator[JobProgress]:
    """A live progress bar on stderr while the block runs."""
    console = console or Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} finished"),
        TextColumn("[green]{task.fields[done]} done"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]:.2f} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield JobProgress(progress, job_id)
