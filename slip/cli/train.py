"""``slip train-ranker``, ``slip train-judge`` and ``slip evaluate-local``: fine-tune a ranker, train the
paper's classifier judge, score rankers — no queue involved.

The lead's app mounts these functions as commands (``app.command("train-ranker")(train_ranker)``).
"""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path
from typing import List, Optional

import typer

from slip.cli.common import cache_dir_from_env, fail, user_errors
from slip.settings import ModelSettings, model_flag


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _threads(count: int | None) -> None:
    if count:
        import torch

        torch.set_num_threads(count)


def train_ranker(
    dataset: Path = typer.Argument(..., help="Labelled image folder: one sub-directory per class."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Checkpoint directory (best validation loss) + "
                                       "curve.json/png; required unless --bundle."),
    image_backbone: str = typer.Option("resnet50", help="timm image backbone (pooled features)."),
    text_encoder: str = typer.Option("distilbert-base-uncased", help="HF hub id | DIR | minilm (offline, pretrained) | tiny-random."),
    text_pooling: Optional[str] = typer.Option(None, help="cls | mean; default: mean for MiniLM, cls otherwise."),
    proj_dim: int = typer.Option(128, help="Projection dimension (the paper's grid: 128, 512)."),
    image_size: int = typer.Option(224, help="Crop side in pixels the image backbone sees."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the projection heads (the grid's lr); default "
                                       "1e-3, with --init 5e-4 (the review recipe)."),
    image_lr: Optional[float] = typer.Option(None, help="Learning rate of the image backbone; default 1e-4, with "
                                             "--init 2e-4."),
    text_lr: Optional[float] = typer.Option(None, help="Learning rate of the text encoder; default 1e-5."),
    loss: Optional[str] = typer.Option(None, help="Dual-encoder loss: paper (temperature 1, soft targets) | clip (unit "
                                       "norm, learnt temperature); default paper, with --init the one the ranker "
                                       "was trained with."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs; default 10, with --init 15 or as many as 200 "
                                         "optimiser steps need (a review is small)."),
    batch_size: Optional[int] = typer.Option(None, help="Image-caption pairs per step; default 64, with --init 32."),
    caption_template: str = typer.Option("{name}", help="Caption template; {name} is the class name."),
    segment_view_prob: float = typer.Option(0.5, help="Share of cut-out segment views for images with masks."),
    init: Optional[str] = typer.Option(None, help="Fine-tune this ranker from its current weights instead (HF CLIP "
                                       "id/DIR, dual-encoder DIR, synth, tiny-random), e.g. on a `slip labels import` "
                                       "folder, with the review recipe (slip/train/finetune.py)."),
    pretrained_image: bool = typer.Option(True, "--pretrained-image/--random-image",
                                          help="Start the image backbone from its pretrained weights (an error when "
                                               "they are not on disk), or from random init on purpose."),
    pretrained_text: bool = typer.Option(True, "--pretrained-text/--random-text",
                                         help="Start the text encoder from its pretrained weights (an error when they "
                                              "are not on disk), or from random init on purpose (tiny-random needs "
                                              "--random-text)."),
    freeze_text: bool = typer.Option(False, "--freeze-text/--train-text",
                                     help="Keep the text encoder fixed (LiT-style); a frozen MiniLM is referenced, not "
                                          "stored, in the checkpoint."),
    save_initial: bool = typer.Option(False, help="Also save the untrained starting point to OUT/initial."),
    bundle: bool = typer.Option(False, "--bundle", help="Train the bundled synth ranker with its fixed recipe "
                                "(slip/train/synth_clip.py; the model and training options above are not used) and "
                                "install it as --clip synth."),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and augmentation."),
    split_seed: int = typer.Option(0, help="Seed of the 80/20 train/validation split."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's choice)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
) -> None:
    """Fine-tune a ranker on DATASET with the SLIP paper's recipe; the best checkpoint loads with --clip OUT."""
    from dataclasses import replace

    from slip.rankers.dual_encoder import DualEncoderConfig
    from slip.train import synth_clip
    from slip.train.finetune import MIN_STEPS, REVIEW_RECIPE, fine_tune
    from slip.train.ranker import TrainConfig
    from slip.train.ranker import train_ranker as run

    _logging(quiet)
    _threads(threads)
    if out is None and not bundle:
        fail("give --out DIR for the checkpoint (or --bundle to rebuild the bundled synth ranker)")
    with user_errors():
        if bundle:
            model, init = synth_clip.SYNTH_CLIP_MODEL, None
            config = replace(synth_clip.SYNTH_CLIP_RECIPE, device=device, progress=not quiet)
            out = synth_clip.BUNDLE_DIR.with_name(f".{synth_clip.BUNDLE_DIR.name}.partial")
        else:
            model = None
            if init is None:
                from slip.rankers.dual_encoder import MINILM_ALIASES

                pooling = text_pooling or ("mean" if text_encoder in MINILM_ALIASES else "cls")
                model = DualEncoderConfig(image_backbone=image_backbone, text_encoder=text_encoder,
                                          text_pooling=pooling, proj_dim=proj_dim, image_size=image_size,
                                          pretrained_image=pretrained_image, pretrained_text=pretrained_text,
                                          freeze_text=freeze_text)
            base = REVIEW_RECIPE if init is not None else TrainConfig()
            given = {k: v for k, v in dict(epochs=epochs, batch_size=batch_size, lr=lr, image_lr=image_lr,
                                            text_lr=text_lr, loss=loss).items() if v is not None}
            config = replace(base, **given, seed=seed, split_seed=split_seed, caption_template=caption_template,
                             segment_view_prob=segment_view_prob, device=device, progress=not quiet,
                             save_initial=save_initial)
        if init is not None and not bundle:
            result = fine_tune(dataset, out, init=init, config=config, min_steps=0 if epochs else MIN_STEPS,
                               keep_loss=loss is not None, cache_dir=cache_dir_from_env())
            config = replace(config, epochs=len(result.history))
        else:
            result = run(dataset, out, model=model, init=init, config=config, cache_dir=cache_dir_from_env())
        target = synth_clip.install_bundle(result.out) if bundle else result.out
    typer.echo(f"best validation loss {result.best_val_loss:.4f} at epoch {result.best_epoch}/{config.epochs} "
               f"({result.seconds:.0f} s); checkpoint: {target} (use --clip {'synth' if bundle else target})")


def evaluate_local(
    dataset: Path = typer.Argument(..., help="Labelled image folder (the held-out 20 % are composited)."),
    ranker: List[str] = typer.Option(..., "--ranker", "-r", help="Ranker spec to score; repeat to compare."),
    composites: int = typer.Option(200, help="Number of 2x2 composites (4 queries each)."),
    seed: int = typer.Option(0, help="Composite seed."),
    split_seed: int = typer.Option(0, help="Seed of the train/validation split (as in training)."),
    split: str = typer.Option("val", help="val: the validation images of the training split (the seed as in training); all: every image of a dataset neither training nor checkpoint selection saw (a separately generated one) — the honest choice."),
    caption_template: str = typer.Option("{name}", help="Caption template; {name} is the class name."),
    tile_size: int = typer.Option(128, help="Side of each composite tile in pixels."),
    proposals: str = typer.Option("oracle", help="oracle (known segments + distractors) | sam (SAM + filters)."),
    sam: Optional[str] = model_flag("sam"),
    filters: Optional[str] = typer.Option(None, help="Filter chain for --proposals sam, e.g. 'containment:0.8' or "
                                          "'none'; default: the SAM's recommended chain (filters.json beside the "
                                          "checkpoint), else the paper's 'containment'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the summary per ranker as JSON here."),
    report: Optional[Path] = typer.Option(None, help="Write a self-contained HTML report here."),
    judge: Optional[Path] = typer.Option(None, help="Also score with this classifier judge (slip train-judge)."),
    device: Optional[str] = model_flag("device"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Score rankers judge-free on seeded 2x2 composites: every class of every composite is queried."""
    from slip.evaluate import evaluate_rankers, format_table

    _logging(quiet)
    with user_errors():
        models = ModelSettings.from_env(os.environ, ("sam", "device", "cache_dir"), sam=sam, device=device)
        runs = evaluate_rankers(dataset, ranker, composites=composites, seed=seed, split_seed=split_seed, split=split,
                                caption_template=caption_template, tile_size=tile_size, proposals=proposals,
                                sam=models.sam, device=models.device, cache_dir=models.cache_dir,
                                progress=not quiet, judge=judge, filters=filters)
        typer.echo(format_table(runs))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps([r.to_json() for r in runs], indent=2))
        if report is not None:
            from slip.report import report_from_runs

            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(report_from_runs(runs))
            typer.echo(f"report: {report}")


def train_judge(
    dataset: Path = typer.Argument(..., help="Labelled image folder: one sub-directory per class."),
    out: Path = typer.Option(..., "--out", "-o", help="Judge directory (config.json + model.safetensors)."),
    backbone: str = typer.Option("resnet18", help="timm classifier (the paper: ResNet-18)."),
    image_size: int = typer.Option(64, help="Crop side in pixels."),
    epochs: int = typer.Option(10, help="Training epochs."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    seed: int = typer.Option(0, help="Training seed."),
    split_seed: int = typer.Option(0, help="80/20 split seed: use the ranker's, so the judge never sees test images."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Train the paper's classifier judge (random init, offline) and report its held-out accuracy."""
    from slip.train.judge import JudgeConfig
    from slip.train.judge import train_judge as run

    _logging(quiet)
    with user_errors():
        config = JudgeConfig(backbone=backbone, image_size=image_size, epochs=epochs, lr=lr, seed=seed,
                             split_seed=split_seed, device=device, progress=not quiet)
        judge = run(dataset, out, config=config)
    typer.echo(f"judge held-out accuracy {judge.val_accuracy:.1%} ({len(judge.class_names)} classes); saved to {out} "
               f"(use --judge {out})")
