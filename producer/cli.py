"""The ``slip`` console command: the library's commands plus the queue's.

Queue commands (environment read here, at the edge: ``SLIP_BROKER_URL``, ``SLIP_STORE``, ``SLIP_SAM``,
``SLIP_CLIP``, ...; see :mod:`worker.settings`)::

    slip submit segment PATH... --prompt TEXT [--prompt ...] [--wait] [--batch-size K] [--max-in-flight M]
    slip status JOB
    slip results JOB --format jsonl|coco --out FILE
    slip retry JOB [--wait]
    slip demo --out DIR [--images N] [--sam SPEC --clip SPEC]

Every error a user can cause ends as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from slip.cli import app
from slip.cli.common import EXIT_PARTIAL, fail, user_errors

submit_app = typer.Typer(help="Submit jobs to the queue (Redis + Celery workers).", no_args_is_help=True)
# SAM options left unset take the worker SAM's generator.json value, else segment_anything's default
RECOMMENDED_HELP = ("default: the worker SAM's recommended value (generator.json beside the checkpoint), "
                    "else SAM's default")


@contextmanager
def queue_errors() -> Iterator[None]:
    """SLIP errors, unreachable Redis and timeouts become one line on stderr."""
    import redis
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError

    try:
        with user_errors():
            yield
    except (redis.exceptions.ConnectionError, OperationalError) as e:
        url = os.environ.get("SLIP_BROKER_URL", "redis://127.0.0.1:6379/0")
        fail(f"cannot reach Redis at {url}: start it with `redis-server --daemonize yes` ({e})")
    except CeleryTimeout as e:
        fail(f"no worker answered in time: start one with `celery -A worker worker -Q gpu,cpu` ({e})")


def _client():
    """A QueueClient from the environment (imported here so a bad env var is reported, not raised)."""
    from producer.client import QueueClient
    from worker.settings import Settings

    return QueueClient(Settings.from_env(os.environ))


def _print_summary(status) -> int:
    """One line of counts, one line per failed or lost item; the exit code."""
    counts = status.counts
    typer.echo(f"job {status.manifest.job_id}: {len(status.items)} images: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for item in status.items:
        if item.state in ("failed", "lost"):
            typer.echo(f"  {item.state}: {item.name}: {item.reason}")
    if counts["lost"]:
        typer.echo(f"  run `slip retry {status.manifest.job_id}` to re-enqueue lost images")
    return EXIT_PARTIAL if counts["failed"] or counts["lost"] else 0


def _wait(client, job_id: str, timeout: Optional[float]) -> int:
    from producer.progress import job_progress

    with job_progress(job_id) as progress:
        status = client.wait(job_id, timeout_s=timeout, on_progress=progress)
    if not status.finished:
        typer.echo(f"job {job_id}: still running after {timeout} s; follow it with `slip status {job_id}`", err=True)
    return _print_summary(status)


@submit_app.command("segment")
def submit_segment(
    paths: list[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several."),
    wait: bool = typer.Option(False, "--wait", help="Show progress and wait until every image is finished."),
    batch_size: int = typer.Option(4, "--batch-size", "-k", min=1, max=64, help="Images per task (K)."),
    max_in_flight: int = typer.Option(32, "--max-in-flight", "-m", min=1, help="Tasks outstanding at once (M)."),
    sam: Optional[str] = typer.Option(None, help="SAM spec the workers must serve (default: $SLIP_SAM or vit_b)."),
    clip: Optional[str] = typer.Option(None, help="Ranker spec the workers must serve (default: $SLIP_CLIP)."),
    points_per_side: Optional[int] = typer.Option(None, help=f"SAM point grid side; {RECOMMENDED_HELP} 32."),
    pred_iou_thresh: Optional[float] = typer.Option(None, help=f"SAM predicted-IoU threshold; {RECOMMENDED_HELP} 0.88."),
    stability_score_thresh: Optional[float] = typer.Option(None, help=f"SAM stability-score threshold; {RECOMMENDED_HELP} 0.95."),
    box_nms_thresh: Optional[float] = typer.Option(None, help=f"SAM box NMS IoU threshold; {RECOMMENDED_HELP} 0.7."),
    filters: Optional[str] = typer.Option(None, help="Filter chain, e.g. 'containment:0.8,min_area:50' or 'none'; "
                                          "default: the worker SAM's recommended chain (filters.json beside the "
                                          "checkpoint), else the paper's 'containment'."),
    crop_background: str = typer.Option("black", help="Background of segment crops: black | gray | blur | none."),
    crop_padding: float = typer.Option(0.0, help="Crop padding as a fraction of the box side."),
    square: bool = typer.Option(True, "--square/--no-square", help="Pad crops to a square before resizing."),
    top_k: int = typer.Option(5, help="Candidates listed per prompt."),
    threshold: Optional[float] = typer.Option(None, help="Similarity below which a prompt gets 'no match'."),
    one_to_one: bool = typer.Option(False, help="One-to-one assignment: prompts never share a segment."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels than this."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up waiting after this many seconds."),
) -> None:
    """Upload images to the store and enqueue segment tasks; prints the job id."""
    from worker.jobs import SegmentParams, parse_model

    with queue_errors():
        raw = {
            "points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh, "box_nms_thresh": box_nms_thresh,
            "filters": filters, "crop_background": crop_background, "crop_padding": crop_padding,
            "square": square, "top_k": top_k, "threshold": threshold, "one_to_one": one_to_one,
        }
        if max_pixels is not None:
            raw["max_pixels"] = max_pixels
        params = parse_model(SegmentParams, raw)
        client = _client()
        job_id = client.submit_segment(
            paths, prompt, params, sam=sam, clip=clip, batch_size=batch_size, max_in_flight=max_in_flight,
            on_job=lambda j: typer.echo(j),
        )
        code = _wait(client, job_id, timeout) if wait else 0
    raise typer.Exit(code)


@app.command("status")
def status(
    job: str = typer.Argument(..., help="Job id printed by `slip submit`."),
    as_json: bool = typer.Option(False, "--json", help="Counts as one JSON object."),
) -> None:
    """Counts by state (done / failed / pending / lost), reconciled from the store and Redis."""
    with queue_errors():
        client = _client()
        client.check_broker()
        st = client.status(job)
        if as_json:
            typer.echo(json.dumps(st.summary()))
            return
        _print_summary(st)


@app.command("results")
def results(
    job: str = typer.Argument(..., help="Job id."),
    format: str = typer.Option("jsonl", "--format", "-f", help="jsonl (one record per image) | coco."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: stdout)."),
) -> None:
    """Write a job's results: JSON Lines per image, or one COCO annotation file for the batch."""
    with queue_errors():
        client = _client()
        client.check_broker()
        text = client.results(job, format=format)
        if out is None:
            sys.stdout.write(text)
            return
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        except OSError as e:
            fail(f"cannot write {out}: {e.strerror or e}")
        typer.echo(f"wrote {out}", err=True)


@app.command("retry")
def retry(
    job: str = typer.Argument(..., help="Job id."),
    wait: bool = typer.Option(False, "--wait", help="Wait with a progress bar until every image is finished."),
    max_in_flight: int = typer.Option(32, "--max-in-flight", "-m", min=1, help="Tasks outstanding at once."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up waiting after this many seconds."),
) -> None:
    """Re-enqueue a job's lost images and its failures that a retry can fix."""
    with queue_errors():
        client = _client()
        count = client.retry(job, max_in_flight=max_in_flight)
        typer.echo(f"job {job}: re-enqueued {count} image(s)")
        code = _wait(client, job, timeout) if wait and count else 0
    raise typer.Exit(code)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where results and the gallery go."),
    images: int = typer.Option(24, "--images", "-n", min=1, max=10_000, help="Generated images to segment."),
    sam: Optional[str] = typer.Option(None, help="SAM spec for the demo worker (default: synth if built, else tiny-random)."),
    clip: Optional[str] = typer.Option(None, help="Ranker spec for the demo worker (default: like --sam)."),
    timeout: float = typer.Option(900.0, help="Give up after this many seconds."),
) -> None:
    """Run the whole queue locally: a worker, a batch of generated images, progress, results, a gallery."""
    from producer.demo import run_demo

    with queue_errors():
        code = run_demo(out=out, images=images, sam=sam, clip=clip, timeout_s=timeout, env=dict(os.environ))
    raise typer.Exit(code)


def _register_training() -> None:
    from producer.training_cli import register

    register(submit_app, app)


app.add_typer(submit_app, name="submit")
_register_training()


def main() -> None:
    """Console entry point ``slip``."""
    app()


if __name__ == "__main__":
    main()
