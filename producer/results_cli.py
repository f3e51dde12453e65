"""``slip results`` and ``slip gallery``: a job's results as files, and as an HTML page to look at.

Command functions only: the root ``slip`` app mounts them (``app.command("results")(results)``)::

    slip results JOB --format coco|coco-results|jsonl|yolo|polygons --out PATH
                 [--image-ids-from GT.json]   (coco-results: the ground truth's image and category ids)
                 [--copy-images]              (yolo: also write OUT/images/<name>)
    slip gallery JOB [--out DIR] [--limit N] [--truth GT.json]

The job's items come from the queue (:func:`open_job`: the manifest's prompts and models, and
``QueueClient.export_items``), streamed into :func:`producer.exports.write_export` /
:func:`producer.gallery.write_gallery`. Every user error (and an unreachable Redis) ends as one line on
stderr (exit code 2; :func:`producer.common.queue_errors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import typer

from producer.common import client_from_env, queue_errors
from slip.cli.common import fail

FORMAT_HELP = "coco | coco-results | jsonl | yolo | polygons (producer.exports.FORMATS)."

DEFAULT_GALLERY_LIMIT = 200  # images in a gallery unless --limit says otherwise


@dataclass(frozen=True)
class JobExport:
    """What the exporters need from the queue about one job."""

    job_id: str
    prompts: tuple[str, ...]  # the job's prompts, in order (categories / classes)
    models: str  # e.g. "SAM vit_b, ranker openai/clip-vit-base-patch32"
    items: Iterable  # producer.exports.ExportItem, streamed from the ledger


def open_job(job_id: str) -> JobExport:
    """The job from the queue named by the environment (``SLIP_STORE``, ``SLIP_BROKER_URL``, ...)."""
    from worker.ledger import load_manifest

    client = client_from_env()
    spec = load_manifest(client.store, job_id).spec
    return JobExport(job_id, tuple(spec.prompts), f"SAM {spec.sam}, ranker {spec.clip}", client.export_items(job_id))


def results(
    job: str = typer.Argument(..., help="Job id."),
    format: str = typer.Option("jsonl", "--format", "-f", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (a folder for yolo)."),
    image_ids_from: Optional[Path] = typer.Option(
        None, "--image-ids-from", help="coco-results: take image ids (by file_name) and category ids (by name = "
        "prompt) from this COCO ground-truth file, so COCO(GT).loadRes and COCOeval accept the results."),
    copy_images: bool = typer.Option(False, "--copy-images", help="yolo: also copy the images to OUT/images/."),
) -> None:
    """Write a job's results as COCO, COCO results, JSON Lines, YOLO labels or polygons."""
    from producer.exports import FORMATS, read_coco_ids, write_export  # numpy and OpenCV: only when exporting

    if format not in FORMATS:
        fail(f"unknown --format {format!r}: use one of {', '.join(FORMATS)}")
    with queue_errors():
        ids = read_coco_ids(image_ids_from) if image_ids_from is not None else None
        source = open_job(job)
        summary = write_export(
            source.items, format=format, out=out, prompts=source.prompts, job_id=source.job_id,
            image_ids=None if ids is None else ids.image_ids, category_ids=None if ids is None else ids.category_ids,
            copy_images=copy_images)
    _report(summary)


def gallery(
    job: str = typer.Argument(..., help="Job id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: gallery-JOB)."),
    limit: int = typer.Option(DEFAULT_GALLERY_LIMIT, "--limit", "-n", min=1, help="Show at most this many images."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="COCO ground-truth file (category name = prompt): "
                                         "mark each answer hit or miss (IoU > 0.5)."),
) -> None:
    """Write an HTML gallery of a job: thumbnails with each prompt's masks outlined, scores, failures."""
    from producer.gallery import coco_truth, write_gallery

    out = out or Path(f"gallery-{job}")
    with queue_errors():
        judge = coco_truth(truth) if truth is not None else None
        source = open_job(job)
        page = write_gallery(source.items, out=out, prompts=source.prompts, job_id=source.job_id,
                             title=f"SLIP job {source.job_id}", note=f"Models: {source.models}.", truth=judge,
                             limit=limit)
    typer.echo(f"wrote {page} (open it in a browser; thumbnails in {out / 'thumbs'})")


def _report(summary) -> None:
    paths = ", ".join(str(p) for p in summary.paths)
    skipped = f", {summary.skipped} skipped" if summary.skipped else ""
    typer.echo(f"wrote {summary.written} images, {summary.instances} instances ({summary.format}){skipped}: {paths}")
    for note in summary.notes:
        typer.echo(f"  {note}")
