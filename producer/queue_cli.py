"""Queue commands (settings read here, at the edge: ``SLIP_BROKER_URL``, ``SLIP_STORE``, ``SLIP_SAM``, ...)::

    slip submit segment PATH... --prompt TEXT [--prompt ...] [--engine E] [--sam S] [--clip C] [--wait] ...
    slip submit segment --from-job JOB [--clip NEW] [--prompt TEXT ...] [options]   (the old job's images again)
    slip status JOB [--json]
    slip jobs [--state active|finished|lost] [--kind KIND] [--limit N] [--json]
    slip wait JOB [--timeout S]
    slip retry JOB [--wait]
    slip demo --out DIR [--images N] [--sam SPEC --clip SPEC]

``submit`` returns as soon as the cluster has the job (the workers feed it from then on); ``--wait`` and
``slip wait`` only follow it. Every error a user can cause ends as one line on stderr and a non-zero exit.
Model code is imported by no command here, so they start fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from producer.common import client_from_env, follow, print_summary, queue_errors
from slip.cli.common import synth_warning
from slip.errors import InputError
from slip.options import SegmentOptions, with_segment_options


@with_segment_options()
def submit_segment(
    ctx: typer.Context,
    paths: Optional[List[str]] = typer.Argument(None, help="Image files, directories (recursive) or glob patterns "
                                                "(not with --from-job)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Text prompt; repeat for several (at "
                                               "most 32). With --from-job: default, the old job's prompts."),
    from_job: Optional[str] = typer.Option(None, "--from-job", help="Segment the images of this segment job again "
                                           "(already in the store): its prompts, engine, models and options unless "
                                           "given here; e.g. --clip NEW re-answers it from the cached proposals."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it is finished."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-k", min=1, max=64,
                                             help="Images per task (K; default 4, or the old job's)."),
    max_in_flight: int = typer.Option(32, "--max-in-flight", "-m", min=1,
                                      help="Tasks in flight at once (M); the cluster keeps the job topped up."),
    engine: Optional[str] = typer.Option(None, help="Engine the workers must serve: slip | sam3 | sam3-rank "
                                         "(default: $SLIP_ENGINE, else slip)."),
    sam: Optional[str] = typer.Option(None, help="SAM spec the workers must serve: SAM 1 / 2, or SAM 3 for the "
                                      "sam3 engines (default: $SLIP_SAM or vit_b)."),
    clip: Optional[str] = typer.Option(None, help="Ranker spec: a hub id, synth, store:PREFIX, job:TRAIN_JOB or a "
                                       "local directory (uploaded to the store); workers load it on first use "
                                       "(default: $SLIP_CLIP)."),
    keep_features: bool = typer.Option(False, "--keep-features", help="--engine sam3: store every image's vision "
                                       "features (fp16, ~56 MB per image for SAM 3) so later prompts skip the "
                                       "backbone."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: stop following after this many seconds."),
    options: SegmentOptions = SegmentOptions(),
) -> None:
    """Upload images (or reuse a job's, --from-job), hand the job to the cluster and print its id."""
    with queue_errors():
        client = client_from_env()
        if from_job is not None:
            if paths:
                raise InputError("--from-job takes the old job's images: give no PATH")
            job_id = client.submit_from_job(
                from_job, prompts=prompt or None, options=_given_options(ctx, options), engine=engine, sam=sam,
                clip=clip,
                keep_features=keep_features or None, batch_size=batch_size, max_in_flight=max_in_flight,
                on_job=typer.echo)
        else:
            if not paths or not prompt:
                raise InputError("give the images (PATH ...) and at least one --prompt, or --from-job JOB")
            synth_warning(sam or client.settings.models.sam, clip or client.settings.models.clip)
            job_id = client.submit_segment(paths, prompt, options, engine=engine, sam=sam, clip=clip,
                                           keep_features=keep_features, batch_size=batch_size or 4,
                                           max_in_flight=max_in_flight, on_job=typer.echo)
        code = follow(client, job_id, timeout) if wait else 0
    raise typer.Exit(code)


def _given_options(ctx: typer.Context, options: SegmentOptions) -> dict:
    """The segment options given on this command line, as overrides of the old job's."""
    sources = {name: ctx.get_parameter_source(name) for name in SegmentOptions.model_fields}
    given = {name for name, source in sources.items()
             if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}
    return {k: v for k, v in options.model_dump(mode="json").items() if k in given}


def status(
    job: str = typer.Argument(..., help="Job id printed by `slip submit`."),
    as_json: bool = typer.Option(False, "--json", help="Counts and failures grouped by reason, as one JSON object."),
) -> None:
    """Counts by state: done, failed, running, queued, waiting (not sent yet: normal), lost."""
    from jobs.status import failure_groups

    with queue_errors():
        client = client_from_env()
        client.check_broker()  # one line at once when Redis is away (not after the client's ~40 s of retries)
        st = client.status(job)
        if as_json:
            groups = failure_groups(client.store, st) if st.counts["failed"] else []
            typer.echo(json.dumps({**st.summary(), "failures": [g.to_json() for g in groups]}))
            return
        code = print_summary(client, st)
    raise typer.Exit(code)


def jobs(
    state: Optional[str] = typer.Option(None, help="Only jobs in this state: active | finished | lost."),
    kind: Optional[str] = typer.Option(None, help="Only jobs of this kind: segment | train | evaluate | train-sam."),
    limit: int = typer.Option(50, min=1, max=10_000, help="The newest jobs to look at."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list of jobs."),
) -> None:
    """Jobs of every kind, newest first: state, progress, rate, ETA, age."""
    with queue_errors():
        if state not in (None, "active", "finished", "lost"):
            raise InputError(f"--state {state!r}: use active, finished or lost")
        client = client_from_env()
        client.check_broker()
        rows = client.jobs(state=state, kind=kind, limit=limit)
        if as_json:
            typer.echo(json.dumps([r.to_json() for r in rows]))
            return
        typer.echo(f"{'job':<24} {'kind':<9} {'state':<8} {'progress':>15} {'failed':>7} {'rate':>12} {'eta':>8} {'age':>8}")
        for r in rows:
            rate = f"{r.rate:.2f} {r.unit}/s" if r.rate else "-"
            typer.echo(f"{r.job_id:<24} {r.kind:<9} {r.state:<8} {f'{r.done + r.failed}/{r.total}':>15} {r.failed:>7} "
                       f"{rate:>12} {_duration(r.eta_s):>8} {_duration(r.age_s):>8}")
        if not rows:
            typer.echo("no jobs" + (f" in state {state}" if state else "") + (f" of kind {kind}" if kind else ""))


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def wait(
    job: str = typer.Argument(..., help="Job id printed by `slip submit`."),
    timeout: Optional[float] = typer.Option(None, help="Stop following after this many seconds."),
) -> None:
    """Follow a job with a progress bar until it is finished (Ctrl-C leaves it running)."""
    with queue_errors():
        client = client_from_env()
        code = follow(client, job, timeout)
    raise typer.Exit(code)


def retry(
    job: str = typer.Argument(..., help="Job id."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job until every image is finished."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: stop following after this many seconds."),
) -> None:
    """Run a job's failed units again, on purpose (failures that pass by themselves are re-run automatically)."""
    with queue_errors():
        client = client_from_env()
        count = client.retry(job)
        typer.echo(f"job {job}: sent {count} failed unit(s) again")
        code = follow(client, job, timeout) if wait and count else 0
    raise typer.Exit(code)


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where results and the gallery go."),
    images: int = typer.Option(24, "--images", "-n", min=1, max=10_000, help="Generated images to segment."),
    sam: Optional[str] = typer.Option(None, help="SAM spec for the demo worker (default: the bundled synth SAM)."),
    clip: Optional[str] = typer.Option(None, help="Ranker spec for the demo worker (default: the bundled synth ranker)."),
    timeout: float = typer.Option(900.0, help="Give up after this many seconds."),
) -> None:
    """Run the whole queue locally: a worker, a batch of generated images, progress, results, a gallery."""
    from producer.demo import run_demo

    with queue_errors():
        code = run_demo(out=out, images=images, sam=sam, clip=clip, timeout_s=timeout, env=dict(os.environ))
    raise typer.Exit(code)

