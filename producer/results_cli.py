"""``slip results`` and ``slip gallery``: a job's results as files, and as an HTML page to look at.

Command functions only: the root ``slip`` app mounts them (``app.command("results")(results)``)::

    slip results JOB --format coco|coco-results|jsonl|yolo|polygons --out PATH
                 [--image-ids-from GT.json]   (coco-results: the ground truth's image and category ids)
                 [--copy-images | --link-images]   (yolo, one required: the images of the dataset)
                 [--val-fraction 0.1] [--seed 0]   (yolo: the seeded train / val split)
                 [--min-score S]              (coco, yolo: leave out images with an answer under S)
                 [--order job|doubt] [--limit N]   (doubt: the most expected corrections first)
                 [--image-base URL] [--shape brush|polygon|mask]   (label-studio, cvat)
    slip gallery JOB [--out DIR] [--limit N] [--truth GT.json] [--order job|doubt]

The job's items come from the queue (:func:`open_job`: the manifest's prompts and models, and
``QueueClient.export_items``), streamed into :func:`producer.exports.write_export` /
:func:`producer.gallery.write_gallery`. Every user error (and an unreachable Redis) ends as one line on
stderr (exit code 2; :func:`producer.common.queue_errors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import typer

from producer.common import client_from_env, queue_errors
from slip.cli.common import fail
from slip.errors import ConfigError

FORMAT_HELP = "coco | coco-results | jsonl | yolo | polygons | label-studio | cvat (producer.exports.FORMATS)."
ORDER_HELP = ("job: the job's order | doubt: the most doubtful first: doubtful answers plus segments no prompt claims "
              "(producer.doubt); done images only.")

DEFAULT_GALLERY_LIMIT = 200  # images in a gallery unless --limit says otherwise


@dataclass(frozen=True)
class JobExport:
    """What the exporters need from the queue about one job."""

    job_id: str
    prompts: tuple[str, ...]  # the job's prompts, in order (categories / classes)
    models: str  # e.g. "SAM vit_b, ranker openai/clip-vit-base-patch32"
    items: Iterable  # producer.exports.ExportItem, streamed from the ledger
    names: Callable[[], list[str]]  # every item's name, in index order, without reading results


def open_job(job_id: str, *, client=None) -> JobExport:
    """The segment job from ``client`` (default: the queue named by the environment, ``SLIP_STORE``,
    ``SLIP_BROKER_URL``, ...)."""
    from jobs.ledger import load_manifest

    client = client or client_from_env()
    manifest = load_manifest(client.store, job_id)
    spec = manifest.spec
    if manifest.kind != "segment" or not spec.get("prompts"):
        raise ConfigError(f"job {job_id} is a {manifest.kind} job: results and galleries are of segment jobs")
    return JobExport(job_id, tuple(spec["prompts"]), _models(spec), client.export_items(job_id),
                     lambda: client.item_names(job_id))


def _models(spec: dict) -> str:
    """The models a job names, for people: "SAM vit_b, ranker openai/...", "SAM 3 sam3" (its own answers)."""
    engine, sam = spec.get("engine", "slip"), spec.get("sam", "?")
    if engine == "sam3":
        return f"SAM 3 {sam}"
    return f"SAM {sam}, ranker {spec.get('clip', '?')}" + ("" if engine == "slip" else f" ({engine})")


def results(
    job: str = typer.Argument(..., help="Job id."),
    format: str = typer.Option("jsonl", "--format", "-f", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output file (a folder for yolo)."),
    image_ids_from: Optional[Path] = typer.Option(
        None, "--image-ids-from", help="coco-results: take image ids (by file_name) and category ids (by name = "
        "prompt) from this COCO ground-truth file, so COCO(GT).loadRes and COCOeval accept the results."),
    copy_images: bool = typer.Option(False, "--copy-images", help="yolo: copy the images into OUT/images/."),
    link_images: bool = typer.Option(False, "--link-images", help="yolo: symlink OUT/images/ to the store's image "
                                     "files (a directory store only; nothing copied)."),
    val_fraction: Optional[float] = typer.Option(
        None, "--val-fraction", min=0.0, max=0.99, help="yolo: share of the images put in val, chosen by a seeded "
        "hash of the image name (default 0.1; 0 = val is train)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="yolo: seed of the train / val split (default 0)."),
    min_score: Optional[float] = typer.Option(
        None, "--min-score", help="coco, yolo: leave out every image with an answer scoring under this "
        "(the whole image, so an object that was there never becomes background)."),
    order: str = typer.Option("job", "--order", help=ORDER_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Export at most this many images."),
    image_base: Optional[str] = typer.Option(None, "--image-base", help="label-studio: put in front of each item "
                                             "name (default /data/local-files/?d= : Label Studio local storage; or a "
                                             "URL prefix where the submitted folder is served)."),
    shape: Optional[str] = typer.Option(None, "--shape", help="label-studio: brush (default) | polygon; cvat: mask "
                                        "(default) | polygon."),
) -> None:
    """Write a job's results as COCO, COCO results, JSON Lines, a YOLO dataset or polygons."""
    from producer.exports import FORMATS, read_coco_ids, write_export  # numpy and OpenCV: only when exporting
    from slip.inputs import keyed_by_names

    if format not in FORMATS:
        fail(f"unknown --format {format!r}: use one of {', '.join(FORMATS)}")
    if copy_images and link_images:
        fail("--copy-images and --link-images exclude each other: pick one")
    with queue_errors():
        ids = read_coco_ids(image_ids_from) if image_ids_from is not None else None
        source = open_job(job)
        from producer.doubt import ordered  # the review loop's order (issue 18)

        items = ordered(source.items, order=order, limit=limit, prompts=source.prompts)
        summary = write_export(
            items, format=format, out=out, prompts=source.prompts, job_id=source.job_id,
            image_ids=None if ids is None else keyed_by_names(ids.image_ids, source.names()),
            category_ids=None if ids is None else ids.category_ids,
            images="copy" if copy_images else "link" if link_images else None, val_fraction=val_fraction,
            seed=seed, min_score=min_score, image_base=image_base, shape=shape)
    _report(summary)


def gallery(
    job: str = typer.Argument(..., help="Job id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: gallery-JOB)."),
    limit: int = typer.Option(DEFAULT_GALLERY_LIMIT, "--limit", "-n", min=1, help="Show at most this many images."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="COCO ground-truth file (category name = prompt): "
                                         "mark each answer hit or miss (IoU > 0.5; of boxes, for detection "
                                         "labels)."),
    order: str = typer.Option("job", "--order", help=ORDER_HELP),
) -> None:
    """Write an HTML gallery of a job: thumbnails with each prompt's masks outlined, scores, failures."""
    from producer.gallery import coco_truth, write_gallery

    out = out or Path(f"gallery-{job}")
    with queue_errors():
        source = open_job(job)
        judge = coco_truth(truth).bind(source.names()) if truth is not None else None
        from producer.doubt import ordered  # the review loop's order (issue 18)

        items = ordered(source.items, order=order, prompts=source.prompts,  # doubt: a bounded heap of the limit
                        limit=limit if order == "doubt" else None)
        boxes = judge is not None and judge.shape == "box"
        note = f"Models: {source.models}." + (" Judged on boxes: the truth has boxes only." if boxes else "")
        page = write_gallery(items, out=out, prompts=source.prompts, job_id=source.job_id,
                             title=f"SLIP job {source.job_id}", note=note, truth=judge, truth_boxes=boxes,
                             limit=limit)
    typer.echo(f"wrote {page} (open it in a browser; thumbnails in {out / 'thumbs'})")


def _report(summary) -> None:
    paths = ", ".join(str(p) for p in summary.paths)
    skipped = f", {summary.skipped} skipped" if summary.skipped else ""
    typer.echo(f"wrote {summary.written} images, {summary.instances} instances ({summary.format}){skipped}: {paths}")
    if summary.uncertain:
        typer.echo(f"  {summary.uncertain} images left out: an answer scored under --min-score")
    for note in summary.notes:
        typer.echo(f"  {note}")
