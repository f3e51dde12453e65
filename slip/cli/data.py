"""``slip data``: datasets for training and evaluation (``slip data synth``, ``slip data info``)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from slip.cli.common import user_errors

data_app = typer.Typer(name="data", help="Create and inspect labelled image datasets.", no_args_is_help=True,
                       add_completion=False)


@data_app.command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (new or empty, or an earlier synthetic dataset)."),
    classes: int = typer.Option(20, help="Number of object classes (the first N of the catalogue, at most 27)."),
    per_class: int = typer.Option(50, help="Images per class."),
    size: int = typer.Option(128, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same dataset."),
    coco: bool = typer.Option(False, "--coco", help="Also write instances.coco.json: COCO ground truth (relative "
                              "file names, one category per class, RLE masks) for COCOeval."),
) -> None:
    """Generate a synthetic labelled dataset: one folder per class, every image with its object mask."""
    from slip.data.synth import COCO_FILE, generate_dataset

    with user_errors():
        start = time.perf_counter()
        generate_dataset(out, classes=classes, per_class=per_class, size=size, seed=seed, coco=coco)
    truth = f"; COCO ground truth in {out / COCO_FILE}" if coco else ""
    typer.echo(f"wrote {classes} classes x {per_class} images ({size}x{size} px, masks beside them) to {out} "
               f"in {time.perf_counter() - start:.1f} s{truth}")


@data_app.command()
def info(
    dataset: Path = typer.Argument(..., help="Labelled image folder (one sub-directory per class)."),
    caption_template: str = typer.Option("{name}", help="Caption template; {name} is the class name."),
    seed: int = typer.Option(0, help="Split seed."),
) -> None:
    """Show the classes, captions and the seeded 80/20 split of a labelled image folder."""
    from slip.data.folder import scan_folder, split_records

    with user_errors():
        folder = scan_folder(dataset, caption_template=caption_template)
        train, val = split_records(folder.records, seed=seed)
    typer.echo(f"{folder.root}: {len(folder.class_names)} classes, {len(folder.records)} images "
               f"({len(train)} train / {len(val)} validation), masks: {'yes' if folder.has_masks else 'no'}")
    for d, caption in zip(folder.class_dirs, folder.captions):
        typer.echo(f"  {d:<24} -> {caption!r}")
