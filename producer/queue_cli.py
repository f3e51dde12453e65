"""Queue commands (settings read here, at the edge: ``SLIP_BROKER_URL``, ``SLIP_STORE``, ``SLIP_SAM``, ...)::

    slip submit segment PATH... --prompt TEXT [--prompt ...] [--wait] [--batch-size K] [--max-in-flight M]
    slip status JOB [--json]
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
from slip.cli.common import synth_warning, thresholds

# SAM options left unset take the worker SAM's generator.json value, else segment_anything's default
RECOMMENDED_HELP = ("default: the worker SAM's recommended value (generator.json beside the checkpoint), "
                    "else SAM's default")
THRESHOLD_HELP = ("Similarity below which a segment is not an answer: one value, or one per --prompt (repeat); "
                  "default: the worker ranker's calibrated threshold.json, if any.")


def submit_segment(
    paths: List[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Text prompt; repeat for several (at most 32)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it is finished."),
    batch_size: int = typer.Option(4, "--batch-size", "-k", min=1, max=64, help="Images per task (K)."),
    max_in_flight: int = typer.Option(32, "--max-in-flight", "-m", min=1,
                                      help="Tasks in flight at once (M); the cluster keeps the job topped up."),
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
    threshold: Optional[List[float]] = typer.Option(None, help=THRESHOLD_HELP),
    calibrated: bool = typer.Option(True, "--calibrated/--no-threshold",
                                    help="Without --threshold, use the worker ranker's calibrated threshold (or none)."),
    instances: str = typer.Option("one", help="one: the best segment per prompt; all: every segment above the "
                                  "threshold (deduplicated)."),
    one_to_one: bool = typer.Option(False, help="One-to-one assignment: prompts never share a segment."),
    render: bool = typer.Option(False, "--render/--no-render", help="Workers also write mask_<i>.png and "
                                "overlay_<i>.png (else segments.json only; `slip gallery` renders on demand)."),
    max_pixels: Optional[int] = typer.Option(None, help="Refuse images with more pixels than this."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: stop following after this many seconds."),
) -> None:
    """Upload images, hand the job to the cluster and print its id; the workers do the rest."""
    from worker.jobs import SegmentParams, parse_model

    with queue_errors():
        raw = {
            "points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh, "box_nms_thresh": box_nms_thresh,
            "filters": filters, "crop_background": crop_background, "crop_padding": crop_padding,
            "square": square, "top_k": top_k, "threshold": thresholds(threshold), "calibrated": calibrated,
            "instances": instances, "one_to_one": one_to_one, "render": render,
        }
        if max_pixels is not None:
            raw["max_pixels"] = max_pixels
        params = parse_model(SegmentParams, raw)
        client = client_from_env()
        synth_warning(sam or client.settings.sam, clip or client.settings.clip)
        job_id = client.submit_segment(paths, prompt, params, sam=sam, clip=clip, batch_size=batch_size,
                                       max_in_flight=max_in_flight, on_job=typer.echo)
        code = follow(client, job_id, timeout) if wait else 0
    raise typer.Exit(code)


def status(
    job: str = typer.Argument(..., help="Job id printed by `slip submit`."),
    as_json: bool = typer.Option(False, "--json", help="Counts as one JSON object."),
) -> None:
    """Counts by state: done, failed, running, queued, waiting (not sent yet: normal), lost."""
    with queue_errors():
        client = client_from_env()
        client.check_broker()  # one line at once when Redis is away (not after the client's ~40 s of retries)
        st = client.status(job)
        if as_json:
            typer.echo(json.dumps(st.summary()))
            return
        code = print_summary(client, st)
    raise typer.Exit(code)


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
    """Run a job's failed images again, on purpose (failures that pass by themselves are re-run automatically)."""
    with queue_errors():
        client = client_from_env()
        count = client.retry(job)
        typer.echo(f"job {job}: sent {count} failed image(s) again")
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

