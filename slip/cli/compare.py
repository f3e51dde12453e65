"""``slip compare``: run several engine configurations on labelled images and say which to pick.

    slip compare data/ --truth data/instances.coco.json \\
        --config slip=sam=vit_b,clip=openai/clip-vit-base-patch32 \\
        --config sam3=engine=sam3,sam=facebook/sam3 --sample 50 --out compare/

``--queue`` runs each configuration as a job on the workers (``SLIP_BROKER_URL``, ``SLIP_STORE``): a worker must
serve each configuration's engine and SAM (one line names the worker to start otherwise); rankers are loaded by
the workers on demand. Model code is imported inside the command, so ``slip --help`` does not pay for torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from slip.cli.common import user_errors
from slip.settings import ModelSettings, model_flag


def compare(
    images: List[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns; each is "
                                       "the truth's image whose file_name ends its path."),
    truth: Path = typer.Option(..., "--truth", help="COCO instances file (categories = prompts; masks, or boxes "
                               "for detection labels), e.g. a labelling tool's COCO export or the "
                               "instances.coco.json of `slip data synth --coco`."),
    config: List[str] = typer.Option(..., "--config", help="NAME=SPEC, repeat per candidate; SPEC like "
                                     "sam=vit_b,clip=openai/clip-vit-base-patch32 or engine=sam3,sam=facebook/sam3 "
                                     "(keys: engine, sam, clip, dtype, propose, threshold, instances, filters, "
                                     "points_per_side, pred_iou_thresh, stability_score_thresh)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: compare.json, index.html, examples/."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Only these categories (default: all)."),
    sample: Optional[int] = typer.Option(None, min=1, help="Evaluate N images picked at random (seeded)."),
    seed: int = typer.Option(0, help="Seed of --sample."),
    job_size: int = typer.Option(10_000, min=1, help="Images of the job whose wall time is projected."),
    workers: int = typer.Option(1, min=1, help="Workers the projected job runs on."),
    examples: int = typer.Option(4, min=0, help="Example images shown side by side on the page."),
    device: Optional[str] = model_flag("device"),
    queue: bool = typer.Option(False, "--queue", help="Run each configuration as a job on the workers (default: "
                               "in this process)."),
    timeout: Optional[float] = typer.Option(None, help="With --queue: give up waiting for a job after this many "
                                            "seconds."),
) -> None:
    """Compare engine configurations on labelled images: AP, AP50, presence-aware F1, seconds per image."""
    from slip.compare import check_candidates, load_truth, parse_config, run_comparison
    from slip.compare_page import write_report
    from slip.inputs import expand_paths

    with user_errors():
        settings = ModelSettings.from_env(os.environ, ("device", "cache_dir", "threads"), device=device)
        if settings.threads is not None:
            import torch

            torch.set_num_threads(settings.threads)
        checked = check_candidates([parse_config(c) for c in config], device=settings.device,
                                   cache_dir=settings.cache_dir)
        files = expand_paths(images)
        labelled = load_truth(truth, files, prompts=prompt, sample=sample, seed=seed)
        typer.echo(f"{len(labelled.images)} images, {len(labelled.prompts)} prompts, {len(checked)} configurations")
        if labelled.groups:
            typer.echo(f"not queried: {', '.join(map(repr, labelled.groups))}, the supercategory of other categories "
                       "and of no annotation (a group's name, as Roboflow exports the dataset's); --prompt NAME "
                       "queries it")
        if labelled.shape == "box":
            typer.echo(f"the truth has boxes only ({labelled.boxed} annotations without a segmentation): scored on "
                       "boxes, each answer by its mask's bounding box (COCO bbox AP, box IoU)")
        if queue:
            from producer.common import client_from_env, queue_errors
            from slip.compare_queue import run_queue_comparison

            with queue_errors():  # Redis away: one line
                scores, shown = run_queue_comparison(checked, labelled, client_from_env(), job_size=job_size,
                                                     workers=workers, examples=examples, timeout_s=timeout,
                                                     log=typer.echo)
        else:
            scores, shown = run_comparison(checked, labelled, job_size=job_size, workers=workers, examples=examples,
                                           log=typer.echo)
        report, page = write_report(out, scores, labelled, shown, truth_path=truth, job_size=job_size,
                                    workers=workers, command=["slip", *sys.argv[1:]])
    typer.echo(f"wrote {report} and {page}")
