"""The review loop's commands: ``slip labels import`` and ``slip review``.

::

    slip labels import EXPORT --from label-studio|cvat|coco --out LABELS (--job JOB | --images DIR -p P ...)
                       [--heldout 0.2] [--seed 0]
    slip labels calibrate LABELS --ranker SPEC [--write]        (the threshold, on the reviewed images)
    slip review JOB --out DIR [--limit 50] [--format label-studio|cvat] [--image-base URL]      (1. export)
                [--skip-reviewed EARLIER_DIR ...]              (a later round: leave out what was reviewed)
    slip review JOB --out DIR --corrections EXPORT [--from label-studio] [--ranker SPEC]
                [--no-reanswer | --requery PATH ...]                                           (2. learn)

``slip review`` without ``--corrections`` writes the ``--limit`` most doubtful images of the job
(:mod:`producer.doubt`) as pre-annotations for the labelling tool (``DIR/review.label-studio.json`` and its
labelling config, or ``DIR/review.cvat.xml``). With ``--corrections`` (the tool's export of that review)
it imports them (``DIR/labels``, a seeded 80/20 train / held-out split of the reviewed images), scores
the current ranker on the held-out reviewed images, fine-tunes it on the train split's crops
(``DIR/ranker``, :func:`slip.train.finetune.fine_tune`), calibrates the new ranker's threshold on the
train split, scores it on the held-out images, prints both, and re-answers the job with the new ranker:
``slip submit segment --from-job JOB --clip DIR/ranker`` (the job's images, already in the store; the new
ranker uploaded to the store content-addressed; any worker serving the job's SAM loads it on first use and
re-answers from the cached proposals: no SAM work, new keys, the old results kept). ``--no-reanswer`` stops
before that; ``--requery PATH ...`` (the paths the job was submitted with) submits those files instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import typer

from producer.common import client_from_env, queue_errors
from slip.cli.common import fail

labels_app = typer.Typer(name="labels", help="Reviewed labels: bring a labelling tool's corrections back.",
                         no_args_is_help=True, add_completion=False)


@labels_app.callback()
def _labels() -> None:
    """Reviewed labels: bring a labelling tool's corrections back (a group, even with one command)."""


FROM_HELP = "label-studio (JSON export) | cvat (CVAT for images 1.1 XML) | coco (COCO instances JSON)."


def register(root: typer.Typer) -> None:
    """Put ``slip labels ...`` and ``slip review`` on the ``slip`` root."""
    root.add_typer(labels_app, name="labels")
    root.command("review")(review)


def _job_images(job: Optional[str], images: Optional[Path], prompts: Optional[List[str]]):
    from producer.labels import JobImages, folder_images

    if (job is None) == (images is None):
        fail("give the job the export came from (--job JOB) or the image folder (--images DIR with --prompt)")
    if images is not None:
        if not prompts:
            fail("--images needs the prompts (labels) too: --prompt P, repeated")
        return folder_images(images, prompts)
    client = client_from_env()
    spec = _spec(client, job)
    return JobImages(job, tuple(spec.prompts), lambda: client.export_items(job))


def _spec(client, job: str):
    """The segment job's spec (``jobs.segment.SegmentSpec``: prompts, sam, clip, options)."""
    from jobs.ledger import load_manifest
    from jobs.segment import SegmentSpec
    from slip.errors import ConfigError

    manifest = load_manifest(client.store, job)
    if manifest.kind != "segment":
        raise ConfigError(f"job {job} is a {manifest.kind} job: only segment jobs are reviewed")
    return SegmentSpec.model_validate(manifest.spec)


@labels_app.command("import")
def import_labels(
    export: Path = typer.Argument(..., help="The labelling tool's export of a reviewed job."),
    source: str = typer.Option(..., "--from", help=FROM_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="New labels folder (the ranker's training format)."),
    job: Optional[str] = typer.Option(None, "--job", help="The job the export came from (its images, prompts, proposals)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Or: the image folder (item names relative to it)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="With --images: the prompts (labels)."),
    heldout: float = typer.Option(0.2, min=0.0, max=0.9, help="Share of the reviewed images held out of training."),
    seed: int = typer.Option(0, help="Seed of the held-out split."),
) -> None:
    """Turn a reviewed export into ground truth: COCO instances + class folders of object crops."""
    from producer.labels import import_labels as run

    with queue_errors():
        target, reviewed, unreviewed = run(export, source=source, out=out, job=_job_images(job, images, prompt),
                                           heldout=heldout, seed=seed)
    typer.echo(f"imported {reviewed} reviewed image(s) ({unreviewed} not reviewed, left out) into {target}; "
               f"train a ranker on it: slip train-ranker {target} --init RANKER --out NEW")


@labels_app.command("calibrate")
def calibrate_labels(
    labels: Path = typer.Argument(..., help="A `slip labels import` folder (imported with --job: it keeps the proposals)."),
    ranker: str = typer.Option(..., "--ranker", "-r", help="Ranker spec to calibrate (e.g. the fine-tuned one)."),
    write: bool = typer.Option(False, "--write", help="Write threshold.json beside the ranker."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
) -> None:
    """Pick the ranker's threshold on the reviewed images' train split; report it on the held-out ones."""
    from slip.calibrate import check_writable, ranker_directory, save_calibration
    from slip.cli.common import cache_dir_from_env, user_errors
    from slip.review import calibrate_reviewed

    with user_errors():
        if write:  # refuse before the work, not after it
            check_writable(ranker_directory(ranker, cache_dir_from_env()), ranker)
        run = calibrate_reviewed(labels, ranker, device=device, cache_dir=cache_dir_from_env())
        h = run.heldout
        typer.echo(f"threshold {run.point.threshold:.4f} (train split, {run.record['images']} images); on the "
                   f"{run.record['heldout']['split']} images: precision {h.precision:.1%}, recall {h.recall:.1%}, "
                   f"F1 {h.f1:.3f}, absent classes answered {h.absent_false_match_rate:.1%}")
        if write:
            typer.echo(f"wrote {save_calibration(run)}")


def review(
    job: str = typer.Argument(..., help="Job id."),
    out: Path = typer.Option(..., "--out", "-o", help="The review's folder (export, labels, new ranker)."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="Images to review: the most doubtful first."),
    format: str = typer.Option("label-studio", "--format", "-f", help="label-studio | cvat."),
    image_base: str = typer.Option("/data/local-files/?d=", help="label-studio: put in front of each item name "
                                   "(Label Studio local storage, or a URL prefix where the images are served)."),
    corrections: Optional[Path] = typer.Option(None, "--corrections", help="The tool's export of the reviewed "
                                               "images: import, fine-tune, calibrate, re-query."),
    source: str = typer.Option("label-studio", "--from", help=FROM_HELP),
    ranker: Optional[str] = typer.Option(None, "--ranker", help="Ranker to fine-tune (default: the job's)."),
    heldout: float = typer.Option(0.2, min=0.0, max=0.9, help="Share of the reviewed images held out for the figures."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs (default: the review recipe's)."),
    reanswer: bool = typer.Option(True, "--reanswer/--no-reanswer", help="Re-answer the job with the new ranker "
                                  "(slip submit segment --from-job JOB --clip NEW)."),
    requery: Optional[List[str]] = typer.Option(None, "--requery", help="Re-answer from these paths instead (the "
                                                "files the job was submitted with; repeat)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (fine-tuning and scoring)."),
    skip_reviewed: Optional[List[Path]] = typer.Option(None, "--skip-reviewed", help="Export: leave out the images "
                                                       "reviewed in an earlier round (its review folder, or the labels "
                                                       "folder in it; repeat)."),
) -> None:
    """The review loop: export the most doubtful images; after review, learn from the corrections."""
    with queue_errors():
        if corrections is not None and skip_reviewed:
            fail("--skip-reviewed leaves images out of an export: give it without --corrections")
        if corrections is None:
            _export(job, out, limit=limit, format=format, image_base=image_base, skip=skip_reviewed or ())
        else:
            _learn(job, out, corrections=corrections, source=source, ranker=ranker, heldout=heldout, epochs=epochs,
                   reanswer=reanswer, requery=requery, device=device)


def _export(job: str, out: Path, *, limit: int, format: str, image_base: str, skip: Sequence[Path]) -> None:
    from producer.doubt import ordered
    from producer.exports_cvat import write_cvat
    from producer.exports_items import Tally
    from producer.exports_labelstudio import config_path, write_label_studio
    from producer.labels import reviewed_before
    from producer.results_cli import open_job

    if format not in ("label-studio", "cvat"):
        fail(f"unknown --format {format!r}: use label-studio or cvat")
    before = reviewed_before(skip)  # a wrong folder is one line before the job is read
    source, left_out = open_job(job), 0

    def unreviewed(items):
        nonlocal left_out
        for item in items:
            if item.name in before:
                left_out += 1
            else:
                yield item

    items = ordered(unreviewed(source.items), order="doubt", limit=limit, prompts=source.prompts)
    tally = Tally()
    if format == "label-studio":
        path = out / "review.label-studio.json"
        write_label_studio(items, out=path, prompts=source.prompts, job_id=job, tally=tally, image_base=image_base)
        then = (f"create a Label Studio project with {config_path(path)}, import the tasks, review them, export the "
                f"project as JSON, then: slip review {job} --out {out} --corrections EXPORT.json")
    else:
        path = out / "review.cvat.xml"
        write_cvat(items, out=path, prompts=source.prompts, job_id=job, tally=tally)
        then = (f"upload it to a CVAT task of those images (CVAT 1.1), review, export as 'CVAT for images 1.1', then: "
                f"slip review {job} --out {out} --corrections EXPORT.xml --from cvat")
    skipped = f" ({left_out} reviewed before left out)" if before else ""
    typer.echo(f"wrote the {tally.written} most doubtful images of job {job}{skipped} to {path}: {then}")
    if before and not left_out:
        typer.echo(f"warning: none of the {len(before)} images reviewed in {', '.join(map(str, skip))} is an image of "
                   f"job {job}: is that the right review?", err=True)


def _learn(job: str, out: Path, *, corrections: Path, source: str, ranker: Optional[str], heldout: float,
           epochs: Optional[int], reanswer: bool, requery: Optional[List[str]], device: str) -> None:
    from dataclasses import replace

    from producer.labels import REVIEW_LABELS
    from producer.labels import import_labels as run_import
    from slip.calibrate import save_calibration
    from slip.rankers.loading import load_ranker
    from slip.review import calibrate_reviewed, read_labels, score_reviewed
    from slip.train.finetune import REVIEW_RECIPE, fine_tune

    client = client_from_env()
    spec = _spec(client, job)
    current = _loadable(client, ranker or spec.clip, job)
    labels_dir, reviewed, _ = run_import(corrections, source=source, out=out / REVIEW_LABELS,
                                         job=_job_images(job, None, None), heldout=heldout)
    labels = read_labels(labels_dir)
    split = "heldout" if labels.split("heldout") else "train"
    before = score_reviewed(load_ranker(current, device=device), labels, split=split)
    config = replace(REVIEW_RECIPE, device=device, epochs=epochs or REVIEW_RECIPE.epochs)
    result = fine_tune(labels_dir, out / "ranker", init=current, config=config)
    save_calibration(calibrate_reviewed(labels_dir, str(result.out), device=device))
    after = score_reviewed(load_ranker(str(result.out), device=device), labels, split=split)
    typer.echo(f"{reviewed} reviewed images ({len(labels.split('train'))} trained on, {before.images} {split}): "
               f"object-level accuracy on the {split} reviewed images {before.accuracy:.1%} with {current} -> "
               f"{after.accuracy:.1%} with {result.out} ({before.queries} objects)")
    if requery:
        new_job = client.submit_segment(list(requery), list(spec.prompts), spec.options, engine=spec.engine,
                                        sam=spec.sam, clip=str(result.out))
    elif reanswer:
        new_job = client.submit_from_job(job, clip=str(result.out))
    else:
        typer.echo(f"re-answer the job with it: slip submit segment --from-job {job} --clip {result.out}")
        return
    typer.echo(f"re-answering job {job} with {result.out} as job {new_job} (from the cached proposals: no SAM work; "
               f"any worker serving sam={spec.sam} loads the new ranker): slip wait {new_job}")


def _loadable(client, spec: Optional[str], job: str) -> str:
    """A ranker spec this machine can load: a ``store:`` ranker (a re-answered job's) fetched from the store."""
    from jobs.rankers import local_ranker
    from slip.cli.common import cache_dir_from_env
    from slip.errors import ConfigError
    from slip.weights import resolve_cache_dir

    if spec is None:
        raise ConfigError(f"job {job} was answered by SAM 3 itself (engine sam3): it has no ranker to fine-tune; "
                          f"name one with --ranker")
    return local_ranker(client.store, spec, resolve_cache_dir(cache_dir_from_env()))
