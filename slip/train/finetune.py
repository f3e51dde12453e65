"""Fine-tune the current ranker on reviewed corrections (``slip train-ranker --init RANKER LABELS``,
``slip review``): the paper's recipe (:mod:`slip.train.ranker`), from the current weights, not from scratch.

What changes against training from scratch (:data:`REVIEW_RECIPE`): fewer images (a review gives tens to
hundreds of object crops), so smaller batches and more epochs; the image tower moves with a smaller
learning rate than when it learnt from random init; the loss is the one the ranker was trained with
(recorded in its ``config.json``; a model trained with CLIP's loss is not switched to the paper's), so
the similarities keep their meaning for the threshold.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from slip.train.ranker import TrainConfig, TrainResult, train_ranker

MIN_STEPS = 120  # optimiser steps at least: a review of 25 images is ~80 training crops, 2 batches an epoch
REVIEW_RECIPE = TrainConfig(
    epochs=15,  # a few hundred crops: many short epochs; the best-validation checkpoint is kept
    batch_size=32,  # image-crop pairs per step (a review's train split is often < 128 crops)
    lr=5e-4,  # projection heads
    image_lr=2e-4,  # image tower: from its current weights, gentler than from scratch (2e-3)
    text_lr=1e-5,  # text tower (0 effect when it is frozen, as in the bundled synth ranker)
    segment_view_prob=0.5,  # half the crops as the cut-out segment the pipeline ranks
)


def recorded_loss(spec: str | Path) -> str | None:
    """The loss a dual-encoder directory was trained with (its config.json ``training.config.loss``);
    None for anything else (a hub id, a HF CLIP, tiny-random: CLIP's own loss applies)."""
    from slip.rankers.loading import SYNTH_SPEC
    from slip.weights import bundled_path

    directory = bundled_path("synth-clip") if str(spec) == SYNTH_SPEC else Path(spec)
    try:
        meta = json.loads((directory / "config.json").read_text())
        return meta["training"]["config"]["loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fine_tune(labels: str | Path, out: str | Path, *, init: str, config: TrainConfig = REVIEW_RECIPE,
              min_steps: int = MIN_STEPS, keep_loss: bool = False, cache_dir: Path | None = None) -> TrainResult:
    """Fine-tune ``init`` on the labelled folder ``labels`` (a ``slip labels import`` folder or any
    class-folder dataset) into ``out``, with ``init``'s recorded loss (``config.loss`` when ``keep_loss``
    or none is recorded), for ``config.epochs`` epochs or as many as ``min_steps`` optimiser steps need
    (a small review has few batches per epoch)."""
    from slip.data.folder import scan_folder, split_records

    folder = scan_folder(labels, caption_template=config.caption_template)
    train, _ = split_records(folder.records, val_fraction=config.val_fraction, seed=config.split_seed)
    batch = max(2, min(config.batch_size, len(train)))  # a review of a few images still trains
    per_epoch = max(1, len(train) // batch)
    epochs = max(config.epochs, math.ceil(min_steps / per_epoch))
    loss = config.loss if keep_loss else recorded_loss(init) or config.loss
    return train_ranker(labels, out, init=init, config=replace(config, loss=loss, epochs=epochs, batch_size=batch),
                        cache_dir=cache_dir)


__all__ = ["MIN_STEPS", "REVIEW_RECIPE", "fine_tune", "recorded_loss"]
