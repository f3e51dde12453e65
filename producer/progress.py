"""A job's progress, of any kind: done / failed / running / queued / waiting, rate and ETA — a rich progress bar
on a terminal, plain lines in a log (stderr redirected: a batch script's ``slip wait``, CI)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jobs.model import UNITS
from jobs.status import JobStatus

LOG_EVERY_S = 30.0  # a log's progress line at most this often (seconds)


class JobProgress:
    """Call it with each :class:`JobStatus` read: the counts, the rate units finish at and ``notes()`` (what
    running units report, e.g. a training epoch) go to :meth:`show` — a bar here, lines in :class:`LogProgress`."""

    def __init__(self, job_id: str, notes: Callable[[], str] | None = None,
                 run_rate: Callable[[], float | None] | None = None) -> None:
        self.job_id = job_id
        self.start = time.monotonic()
        self.first: int | None = None  # units finished when following started
        self.notes = notes
        self.run_rate = run_rate  # units per second over the job's own run (from its start to its end)

    def __call__(self, status: JobStatus) -> None:
        c = status.counts
        finished = c["done"] + c["failed"] + c["lost"]
        if self.first is None:
            self.first = finished
        self.show(status, finished)

    def show(self, status: JobStatus, finished: int) -> None:
        raise NotImplementedError

    def note(self, status: JobStatus) -> str:
        return self.notes() if self.notes and not status.finished else ""

    def rate(self, status: JobStatus, finished: int) -> str:
        """Units per second seen while following; for a job that finished before the first look, its run's
        (``run_rate``: from its start to its end, not to now), or nothing."""
        unit = {"image": "img"}.get(UNITS[status.manifest.kind], UNITS[status.manifest.kind])
        elapsed = time.monotonic() - self.start
        if finished > (self.first or 0) and elapsed > 0.5:
            return f"{(finished - (self.first or 0)) / elapsed:.2f} {unit}/s"
        if status.finished:
            rate = self.run_rate() if self.run_rate else None
            return f"{rate:.2f} {unit}/s over its run" if rate else "finished before this look"
        return f"-- {unit}/s"

    def eta_s(self, status: JobStatus, finished: int) -> float | None:
        """Seconds left at the rate seen while following (None before any unit finished)."""
        elapsed, seen = time.monotonic() - self.start, finished - (self.first or 0)
        return (status.manifest.total - finished) * elapsed / seen if seen > 0 and elapsed > 0.5 else None


class BarProgress(JobProgress):
    """A rich progress bar (a terminal)."""

    def __init__(self, progress: Progress, job_id: str, notes: Callable[[], str] | None = None,
                 run_rate: Callable[[], float | None] | None = None) -> None:
        super().__init__(job_id, notes, run_rate)
        self.progress = progress
        self.task = progress.add_task(job_id, total=None, done=0, failed=0, running=0, queued=0, rate="", notes="")

    def show(self, status: JobStatus, finished: int) -> None:
        c = status.counts
        self.progress.update(self.task, total=status.manifest.total, completed=finished, done=c["done"],
                             failed=c["failed"], running=c["running"], queued=c["queued"] + c["waiting"],
                             rate=self.rate(status, finished), notes=self.note(status))


class LogProgress(JobProgress):
    """Plain lines (a log): the first read, then a line at most every ``every_s`` seconds while the counts change,
    and the last read (a job that finished)."""

    def __init__(self, console: Console, job_id: str, notes: Callable[[], str] | None = None,
                 run_rate: Callable[[], float | None] | None = None, *, every_s: float = LOG_EVERY_S) -> None:
        super().__init__(job_id, notes, run_rate)
        self.console, self.every_s = console, every_s
        self.last: tuple[float, tuple] | None = None  # (when, counts) of the last line written

    def show(self, status: JobStatus, finished: int) -> None:
        c, now = status.counts, time.monotonic()
        counts = tuple(sorted(c.items()))
        if not (self.last is None or status.finished or (now - self.last[0] >= self.every_s and counts != self.last[1])):
            return
        self.last = (now, counts)
        eta, notes = self.eta_s(status, finished), self.note(status)
        line = (f"{self.job_id} {finished}/{status.manifest.total}: {c['done']} done, {c['failed']} failed, "
                f"{c['running']} running, {c['queued'] + c['waiting']} queued, {self.rate(status, finished)}"
                f"{'' if status.finished or eta is None else f', ETA {eta:.0f} s'}{f'; {notes}' if notes else ''}")
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def job_progress(job_id: str, *, console: Console | None = None, notes: Callable[[], str] | None = None,
                 run_rate: Callable[[], float | None] | None = None) -> Iterator[JobProgress]:
    """A live progress bar on stderr while the block runs; plain lines (:class:`LogProgress`) when stderr is not a
    terminal, where a bar would be drawn once, squeezed to 80 columns. ``run_rate`` reads the job's rate over its
    run, for a job that finished before the first look."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield LogProgress(console, job_id, notes, run_rate)
        return
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
        yield BarProgress(progress, job_id, notes, run_rate)
