"""``slip train-sam``: fine-tune a SAM on instance masks, or train the bundled synth-sam from scratch.

The lead's app mounts this function as a command (``app.command("train-sam")(train_sam)``).

The bundled model is rebuilt by (seeded; about 20 minutes on 2 CPU cores)::

    slip data synth --classes 27 --per-class 60 --size 128 --seed 0 --out data/synth
    slip train-sam data/synth --bundle
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import typer

from slip.cli.common import cache_dir_from_env, fail, user_errors


def train_sam(
    dataset: Path = typer.Argument(..., help="Mask folder (`slip data synth` layout: <class>/<id>.png + "
                                             "<id>.mask.png), or the image directory of --coco."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Checkpoint directory (sam.pth, config.json, "
                                       "curve.json/png); loads with --sam OUT."),
    sam: Optional[str] = typer.Option(None, "--sam", help="Start checkpoint to fine-tune: vit_b | vit_l | vit_h | "
                                      "synth | tiny-random | PATH (official .pth, slip checkpoint directory, or a "
                                      "Hugging Face SamModel directory)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Train a new model from scratch: synth-sam | tiny-random "
                                       "(or an official size)."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="COCO instances file (polygons or RLE); DATASET holds "
                                        "its images."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs (default 10; --bundle: the recipe's)."),
    scenes_per_epoch: Optional[int] = typer.Option(None, help="Scenes per epoch (default: one per training image)."),
    batch_images: Optional[int] = typer.Option(None, help="Images per step (default 8)."),
    prompts_per_image: Optional[int] = typer.Option(None, help="Prompts sampled per image and step (default 8)."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate (default 1e-4 fine-tuning, 1e-3 from scratch)."),
    background_points: Optional[float] = typer.Option(None, help="Share of prompts placed off every object, trained "
                                                      "to an empty mask; only for exhaustively annotated data "
                                                      "(default: 0.1 for --bundle, else 0)."),
    freeze_image_encoder: bool = typer.Option(False, "--freeze-image-encoder", help="Do not update the ViT "
                                              "(the usual decoder-only fine-tune of vit_b / vit_h)."),
    freeze_prompt_encoder: bool = typer.Option(False, "--freeze-prompt-encoder", help="Do not update the prompt encoder."),
    half: bool = typer.Option(False, "--half", help="Save fp16 weights (half the size; loading casts back to fp32)."),
    bundle: bool = typer.Option(False, "--bundle", help="Train the bundled synth-sam with its recipe and install it "
                                "in slip/weights/synth-sam (loads with --sam synth)."),
    seed: int = typer.Option(0, help="Seed of the split, initialisation, scenes and prompts."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: one per core; on a busy shared "
                                          "machine 1 avoids oversubscription)."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast for forward passes "
                                        "(default: on for --bundle; fast on CPUs with AVX512-BF16/AMX)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or per-epoch lines."),
) -> None:
    """Train a SAM on DATASET's instance masks: prompts from the ground truth, focal + dice + IoU loss."""
    from dataclasses import replace

    from slip.train import sam as training

    if threads is not None:
        import torch

        torch.set_num_threads(max(threads, 1))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if out is None and not bundle:
        fail("give --out DIR for the checkpoint (or --bundle to rebuild the bundled synth-sam)")
    with user_errors():
        config = training.SYNTH_SAM_RECIPE if bundle else training.SamTrainConfig()
        if bundle and sam is None and arch is None:
            arch = training.SYNTH_SAM_NAME
        prompts = config.prompts
        if background_points is not None:
            prompts = replace(prompts, background_fraction=background_points)
        changes = {"bf16": bf16, "epochs": epochs, "scenes_per_epoch": scenes_per_epoch, "batch_images": batch_images,
                   "prompts_per_image": prompts_per_image, "lr": lr}
        if lr is None and arch is not None and not bundle:
            changes["lr"] = training.SCRATCH_LR
        config = replace(config, **{k: v for k, v in changes.items() if v is not None}, prompts=prompts,
                         freeze_image_encoder=freeze_image_encoder, freeze_prompt_encoder=freeze_prompt_encoder,
                         half=half or config.half, seed=seed, device=device, progress=not quiet)
        target = out if out is not None else training.BUNDLE_DIR
        work = target.with_name(f".{target.name}.partial") if bundle else target
        if bundle and work.exists():
            shutil.rmtree(work)  # a previous run that did not finish
        result = training.train_sam(dataset, work, start=sam, arch=arch, coco=coco, config=config,
                                    cache_dir=cache_dir_from_env())
        if bundle:
            training.install_bundle(work, target)
    typer.echo(f"best validation mIoU {result.best_val_miou:.4f} at epoch {result.best_epoch}/{config.epochs} "
               f"({result.seconds:.0f} s); checkpoint: {target} (use --sam {'synth' if bundle else target})")
