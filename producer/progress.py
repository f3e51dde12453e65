"""A rich progress bar for a job of any kind: done / failed / running / queued / waiting, rate and ETA."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jobs.model import UNITS
from jobs.status import JobStatus


class JobProgress:
    """Call it with each :class:`JobStatus` read; shows the counts, the rate units finish at, and ``notes()``
    (what running units report, e.g. a training epoch)."""

    def __init__(self, progress: Progress, job_id: str, notes: Callable[[], str] | None = None) -> None:
        self.progress = progress
        self.task = progress.add_task(job_id, total=None, done=0, failed=0, running=0, queued=0, rate="", notes="")
        self.start = time.monotonic()
        self.first: int | None = None  # units finished when following started
        self.notes = notes

    def __call__(self, status: JobStatus) -> None:
        c = status.counts
        finished = c["done"] + c["failed"] + c["lost"]
        if self.first is None:
            self.first = finished
        notes = self.notes() if self.notes and not status.finished else ""
        self.progress.update(self.task, total=status.manifest.total, completed=finished, done=c["done"],
                             failed=c["failed"], running=c["running"], queued=c["queued"] + c["waiting"],
                             rate=self.rate(status, finished), notes=notes)

    def rate(self, status: JobStatus, finished: int) -> str:
        """Units per second seen while following; for a job that finished before the first look, its whole
        run (from its creation)."""
        unit = {"image": "img"}.get(UNITS[status.manifest.kind], UNITS[status.manifest.kind])
        elapsed = time.monotonic() - self.start
        if finished > (self.first or 0) and elapsed > 0.5:
            return f"{(finished - (self.first or 0)) / elapsed:.2f} {unit}/s"
        if status.finished:
            age = time.time() - datetime.fromisoformat(status.manifest.created).timestamp()
            return f"{finished / age:.2f} {unit}/s overall" if age > 0 else ""
        return f"-- {unit}/s"


@contextmanager
def job_progress(job_id: str, *, console: Console | None = None,
                 notes: Callable[[], str] | None = None) -> Iterator[JobProgress]:
    """A live progress bar on stderr while the block runs."""
    console = console or Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("[green]{task.fields[done]} done"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("{task.fields[running]} running, {task.fields[queued]} queued"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[notes]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield JobProgress(progress, job_id, notes)
