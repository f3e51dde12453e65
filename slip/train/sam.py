"""Fine-tune a SAM on images with instance masks, or train a small one from scratch.

Data: a mask folder (``slip data synth`` writes one; scenes are built from it, see
:mod:`slip.train.sam_data`) or a COCO instances file with its image directory. Recipe: prompts sampled
from the ground truth (a point inside an object, or its box with jitter), focal + dice loss on the
masks (best of the three multimask outputs for points), MSE on the IoU head, AdamW with linear warm-up
and cosine decay, optional frozen image / prompt encoder (decoder-only fine-tuning is the usual choice
for vit_b / vit_h). Validation mIoU (the mask SAM would return for each held-out prompt) every epoch.

Output directory (``--sam OUT`` loads it everywhere, through :func:`slip.sam.load_sam_checkpoint`)::

    OUT/sam.pth        best-validation weights, official SAM state-dict format (fp16 with ``half``)
    OUT/config.json    the SamArch, for non-official sizes
    OUT/training.json  data, recipe and the best epoch's metrics
    OUT/curve.json     {"epochs": [{"epoch", "train_loss", "val_loss", "val_miou", ...}], "best_epoch"};
                       epoch 0 is the starting model (validation only)
    OUT/curve.png      loss and validation mIoU per epoch (matplotlib)
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from segment_anything.modeling import Sam

from slip.bars import progress_bar
from slip.data.folder import scan_folder, split_records
from slip.device import resolve_device
from slip.errors import ConfigError, DatasetError
from slip.sam import (  # GENERATOR_FILE and read_generator_params are re-exported for older imports
    BUNDLED_DIR,
    FILTERS_FILE,
    GENERATOR_FILE,
    OFFICIAL_TYPES,
    SAM_ARCHS,
    SamArch,
    build_sam,
    load_sam,
    read_generator_params,
    save_sam,
)
from slip.train.sam_data import (
    PLAIN_SCENES,
    InstanceBank,
    PromptConfig,
    SceneConfig,
    build_scene,
    coco_bank,
    coco_image_ids,
    folder_bank,
    open_coco,
    sample_prompts,
)
from slip.train.sam_step import LossWeights, PromptBatch, batch_loss, collate, evaluate, predict, validation_batches

log = logging.getLogger(__name__)

SYNTH_SAM_NAME = "synth-sam"
# The bundled small SAM: a 4-block ViT at 256 px (16x16 patches) and a slim two-way decoder.
SYNTH_SAM_ARCH = SamArch(
    encoder_embed_dim=128,
    encoder_depth=4,
    encoder_num_heads=4,
    encoder_global_attn_indexes=(1, 3),
    img_size=256,
    patch_size=16,
    window_size=8,
    prompt_embed_dim=128,
    decoder_depth=2,
    decoder_mlp_dim=512,
    decoder_num_heads=4,
    iou_head_hidden_dim=128,
    mask_in_chans=16,
    name=SYNTH_SAM_NAME,
)
ARCHS: dict[str, SamArch] = {**SAM_ARCHS, SYNTH_SAM_NAME: SYNTH_SAM_ARCH}  # names accepted by --arch


@dataclass(frozen=True)
class SamTrainConfig:
    """How a SAM is trained (the model is a start checkpoint or an architecture to build)."""

    epochs: int = 10  # passes; one pass = `scenes_per_epoch` training scenes
    scenes_per_epoch: int | None = None  # None: one scene per training image
    batch_images: int = 8  # images per step (one image-encoder batch)
    prompts_per_image: int = 8  # prompts sampled from each image's ground truth per step
    lr: float = 1e-4  # AdamW peak learning rate (from scratch: ~1e-3)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 5 % of lr
    grad_clip: float = 1.0  # max gradient L2 norm; 0 = no clipping
    loss: LossWeights = LossWeights()  # focal / dice / IoU weights
    loss_size: int | None = None  # side in pixels of mask losses / IoUs; None: the decoder's low-res
    # output (4x the embedding grid: 64 for synth-sam, 256 for the official 1024-px models)
    prompts: PromptConfig = PromptConfig()  # point / box / background mix, box jitter
    scenes: SceneConfig | None = None  # scene assembly; None: composites + pastes for mask folders, plain COCO images
    freeze_image_encoder: bool = False  # train without updating the ViT (the usual vit_b / vit_h fine-tune)
    freeze_prompt_encoder: bool = False  # keep the point / box embeddings fixed
    val_fraction: float = 0.1  # held-out share of the images
    val_scenes: int = 48  # validation scenes (fixed, seeded), one point + one box prompt per object
    seed: int = 0  # seeds the split, initialisation, scenes and prompts
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # forward passes under bfloat16 autocast (~1.7x faster on CPUs with AVX512-BF16 or
    # AMX and on recent GPUs; slower where bf16 is emulated); weights and losses stay float32
    half: bool = False  # save weights as fp16 (half the size; loading casts back to fp32)
    progress: bool = True  # a progress bar on stderr, on a terminal only (slip.bars)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_images < 1 or self.prompts_per_image < 1:
            raise ConfigError("epochs, batch_images and prompts_per_image must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite learning rate > 0, got {self.lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


SCRATCH_LR = 1e-3  # default peak learning rate when training from scratch (--arch)
SYNTH_SAM_RECIPE = SamTrainConfig(  # `slip train-sam DATASET --bundle`: synth-sam from scratch, 3840 steps
    epochs=12,
    scenes_per_epoch=5120,
    batch_images=16,
    prompts_per_image=4,
    lr=SCRATCH_LR,
    warmup_steps=200,
    weight_decay=0.05,
    prompts=PromptConfig(point_fraction=0.9, background_fraction=0.1),  # the generator prompts with points
    scenes=SceneConfig(max_pastes=4, near_prob=0.5),
    bf16=True,
    half=True,
)
# MaskGenerator / SamAutomaticMaskGenerator options for synth-sam, tuned with bench/synth_sam.py on held-out
# seed-2000 scenes: its logits are soft (trained on area-fraction targets), so stability is measured with a
# narrow offset; its IoU head is conservative on crowded scenes, so the IoU threshold is low.
SYNTH_SAM_GENERATOR = {
    "points_per_side": 16,
    "pred_iou_thresh": 0.3,
    "stability_score_thresh": 0.8,
    "stability_score_offset": 0.25,
    "box_nms_thresh": 0.7,
}
# filters.json for synth-sam: it proposes no background segment on synthetic scenes, so the paper's containment
# (which drops the largest segment as background) would drop an object; measured on held-out 2x2 composites.
SYNTH_SAM_FILTERS = {
    "filters": "containment:drop_largest=false",
    "why": "synth-sam proposes no background segment on synthetic scenes, so dropping the largest segment as "
           "background would drop an object (held-out 2x2 composites: 71% -> 93% full-SLIP accuracy)",
}
BUNDLE_DIR = BUNDLED_DIR / SYNTH_SAM_NAME  # slip/weights/synth-sam
REBUILD_COMMAND = ("slip data synth --classes 27 --per-class 60 --size 128 --seed 0 --out data/synth && "
                   "slip train-sam data/synth --bundle")


@dataclass(frozen=True)
class SamTrainResult:
    """What a training run produced."""

    out: Path  # the checkpoint directory
    arch: SamArch  # the trained architecture
    best_epoch: int  # 1-based epoch of the kept checkpoint
    best_val_miou: float  # its validation mIoU
    history: list[dict] = field(default_factory=list)  # one record per epoch (as in curve.json)
    seconds: float = 0.0  # wall-clock training time


def train_sam(dataset: str | Path, out: str | Path, *, start: str | None = None, arch: str | SamArch | None = None,
              coco: str | Path | None = None, config: SamTrainConfig = SamTrainConfig(),
              cache_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None) -> SamTrainResult:
    """Train on ``dataset`` (a mask folder, or the image directory of the COCO file ``coco``) and write
    the best checkpoint + curves to ``out``. ``start`` is a SAM spec to fine-tune (``vit_b``, a path,
    ``synth``, ``tiny-random``); ``arch`` builds a new model instead (a name in :data:`ARCHS`)."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    train_bank, val_bank, scenes = _banks(Path(dataset), coco, config)
    torch.manual_seed(config.seed)
    sam, sam_arch = _model(start, arch, cache_dir)
    scenes = replace(scenes, size=sam_arch.img_size)
    sam.to(device)
    trainable = _set_trainable(sam, config)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = max((config.scenes_per_epoch or len(train_bank)) // config.batch_images, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config.warmup_steps, per_epoch * config.epochs))
    val_batches = validation_batches(val_bank, scenes, count=config.val_scenes, batch_images=config.batch_images,
                                     seed=config.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # 0. the starting point, for the curve
    history: list[dict] = [{"epoch": 0, **evaluate(sam, val_batches, device, size=_loss_size(sam, config), weights=config.loss)}]
    best = (0, -1.0)
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        # 1. one pass of freshly assembled scenes
        train = _run_epoch(sam, train_bank, scenes, optimizer, scheduler, config, device, epoch, per_epoch)
        # 2. loss and mIoU on the fixed validation prompts
        val = evaluate(sam, val_batches, device, size=_loss_size(sam, config), weights=config.loss)
        record = {"epoch": epoch, **train, **val, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": round(time.perf_counter() - t0, 2)}
        history.append(record)
        # 3. keep the best-validation checkpoint; curves every epoch
        if val["val_miou"] > best[1]:
            best = (epoch, val["val_miou"])
            _save(sam, sam_arch, out, config, meta=_meta(dataset, coco, start, sam_arch, config, record))
        write_curve(out, history, best_epoch=best[0])
        log.info("epoch %d: train %.4f val %.4f mIoU %.4f", epoch, train["train_loss"], val["val_loss"], val["val_miou"])
        if on_epoch is not None:
            on_epoch(record)
    return SamTrainResult(out=out, arch=sam_arch, best_epoch=best[0], best_val_miou=best[1], history=history,
                          seconds=time.perf_counter() - started)


# --- data and model --------------------------------------------------------------------------------------


def _banks(dataset: Path, coco: str | Path | None, config: SamTrainConfig) -> tuple[InstanceBank, InstanceBank, SceneConfig]:
    """Train / validation banks (seeded split by image) and the scene recipe for them."""
    if coco is not None:
        ids = coco_image_ids(open_coco(Path(coco)))
        if len(ids) < 2:
            raise DatasetError(f"{coco} has {len(ids)} annotated images: need at least 2 (train + validation)")
        order = np.random.default_rng(config.seed).permutation(len(ids))
        n_val = min(max(1, round(config.val_fraction * len(ids))), len(ids) - 1)
        val_ids, train_ids = [ids[i] for i in order[:n_val]], [ids[i] for i in order[n_val:]]
        banks = coco_bank(Path(coco), dataset, image_ids=train_ids), coco_bank(Path(coco), dataset, image_ids=val_ids)
        return (*banks, config.scenes or PLAIN_SCENES)
    folder = scan_folder(dataset)
    train, val = split_records(folder.records, val_fraction=config.val_fraction, seed=config.seed)
    if not val:
        raise DatasetError(f"{dataset} has too few images per class for a validation split")
    name = str(folder.root)
    return folder_bank(train, name=name), folder_bank(val, name=name), config.scenes or SceneConfig()


def _model(start: str | None, arch: str | SamArch | None, cache_dir: Path | None) -> tuple[Sam, SamArch]:
    """The SAM to train: loaded from ``start`` or built (randomly initialised) from ``arch``."""
    if (start is None) == (arch is None):
        raise ConfigError("give exactly one of a start checkpoint (--sam vit_b|PATH) or an architecture "
                          f"to train from scratch (--arch {'|'.join(ARCHS)})")
    if start is not None:
        sam = load_sam(start, device="cpu", cache_dir=cache_dir)
        return sam, arch_of(sam)
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ConfigError(f"unknown SAM architecture {arch!r}: use one of {', '.join(ARCHS)}")
        arch = ARCHS[arch]
    return build_sam(arch), arch


def arch_of(sam: Sam) -> SamArch:
    """The :class:`SamArch` of a built model, named after the registry entry it equals (if any)."""
    enc, pe, dec = sam.image_encoder, sam.prompt_encoder, sam.mask_decoder
    blocks, layers = list(enc.blocks), list(dec.transformer.layers)
    windows = [b.window_size for b in blocks if b.window_size > 0]
    arch = SamArch(
        encoder_embed_dim=enc.patch_embed.proj.out_channels,
        encoder_depth=len(blocks),
        encoder_num_heads=blocks[0].attn.num_heads,
        encoder_global_attn_indexes=tuple(i for i, b in enumerate(blocks) if b.window_size == 0),
        img_size=enc.img_size,
        patch_size=enc.patch_embed.proj.kernel_size[0],
        window_size=windows[0] if windows else 14,
        prompt_embed_dim=pe.embed_dim,
        decoder_depth=len(layers),
        decoder_mlp_dim=layers[0].mlp.lin1.out_features,
        decoder_num_heads=layers[0].self_attn.num_heads,
        iou_head_hidden_dim=dec.iou_prediction_head.layers[0].out_features,
        mask_in_chans=pe.mask_downscaling[3].out_channels,
    )
    return next((a for a in ARCHS.values() if a == arch), arch)


def _set_trainable(sam: Sam, config: SamTrainConfig) -> list[torch.nn.Parameter]:
    """Apply the freeze options; the parameters left to train."""
    for module, frozen in ((sam.image_encoder, config.freeze_image_encoder),
                           (sam.prompt_encoder, config.freeze_prompt_encoder)):
        module.requires_grad_(not frozen)
    params = [p for p in sam.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("every parameter is frozen: nothing to train")
    return params


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --- steps -----------------------------------------------------------------------------------------------


def _loss_size(sam: Sam, config: SamTrainConfig) -> int:
    low_res = 4 * sam.prompt_encoder.image_embedding_size[0]
    return min(config.loss_size or low_res, sam.image_encoder.img_size)


def _batch(bank: InstanceBank, scenes: SceneConfig, config: SamTrainConfig, rng: np.random.Generator) -> PromptBatch | None:
    built = [build_scene(bank, rng, scenes) for _ in range(config.batch_images)]
    prompts = [sample_prompts(s, config.prompts_per_image, rng, config.prompts) for s in built]
    return collate(built, prompts) if any(prompts) else None


def _run_epoch(sam: Sam, bank: InstanceBank, scenes: SceneConfig, optimizer, scheduler, config: SamTrainConfig,
               device: torch.device, epoch: int, steps: int) -> dict:
    sam.train()
    rng = np.random.default_rng([config.seed, epoch])
    totals = {"train_loss": 0.0, "mask_loss": 0.0, "iou_loss": 0.0}
    done = 0
    bar = progress_bar(range(steps), desc=f"epoch {epoch}/{config.epochs}", enabled=config.progress, leave=False)
    for _ in bar:
        batch = _batch(bank, scenes, config, rng)
        if batch is None:
            continue
        out = predict(sam, batch.to(device), train_image_encoder=not config.freeze_image_encoder, bf16=config.bf16)
        loss, parts = batch_loss(out, batch.to(device), size=_loss_size(sam, config), weights=config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
        optimizer.step()
        scheduler.step()
        done += 1
        for key, value in (("train_loss", loss.item()), *parts.items()):
            totals[key] += value
        bar.set_postfix(loss=f"{totals['train_loss'] / done:.4f}")
    return {k: v / max(done, 1) for k, v in totals.items()}


# --- outputs ---------------------------------------------------------------------------------------------


def _save(sam: Sam, arch: SamArch, out: Path, config: SamTrainConfig, *, meta: dict) -> Path:
    """``out/sam.pth`` (+ ``config.json`` for non-official sizes) and ``out/training.json``."""
    model = copy.deepcopy(sam).cpu().half() if config.half else sam
    path = save_sam(model, out / "sam.pth", arch)
    (out / "training.json").write_text(json.dumps(meta, indent=2))
    return path


def _meta(dataset, coco, start, arch: SamArch, config: SamTrainConfig, record: dict) -> dict:
    return {"dataset": str(dataset), "coco": str(coco) if coco else None, "start": start,
            "arch": arch.to_json(), "official": arch.name in OFFICIAL_TYPES, "config": asdict(config),
            "best_epoch": record["epoch"], "metrics": record}


def install_bundle(work: Path, target: Path = BUNDLE_DIR) -> Path:
    """Move a finished training directory into place as the bundled synth-sam (replacing the old one),
    adding the recommended generator options and filter chain."""
    (work / GENERATOR_FILE).write_text(json.dumps(SYNTH_SAM_GENERATOR, indent=2))
    (work / FILTERS_FILE).write_text(json.dumps(SYNTH_SAM_FILTERS, indent=2) + "\n")
    meta = json.loads((work / "training.json").read_text())
    (work / "training.json").write_text(json.dumps({"rebuild": REBUILD_COMMAND, **meta}, indent=2))
    if target.exists():
        shutil.rmtree(target)
    work.rename(target)
    return target


def write_curve(out: Path, history: list[dict], *, best_epoch: int) -> None:
    """``curve.json`` and ``curve.png``: losses and validation mIoU per epoch."""
    (out / "curve.json").write_text(json.dumps({"epochs": history, "best_epoch": best_epoch}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    trained = [h for h in history if "train_loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    left.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], marker="o", label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation loss")
    right.plot(epochs, [h["val_miou"] for h in history], marker="o", label="all prompts")
    right.plot(epochs, [h["val_point_miou"] for h in history], marker=".", label="points")
    right.plot(epochs, [h["val_box_miou"] for h in history], marker=".", label="boxes")
    for ax, ylabel in ((left, "loss"), (right, "validation mIoU")):
        ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3), ax.legend()
    fig.suptitle(f"SAM training (best epoch {best_epoch})")
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    plt.close(fig)


__all__ = ["ARCHS", "BUNDLE_DIR", "GENERATOR_FILE", "SCRATCH_LR", "SYNTH_SAM_ARCH", "SYNTH_SAM_FILTERS",
           "SYNTH_SAM_GENERATOR", "SYNTH_SAM_RECIPE", "install_bundle", "read_generator_params", "SamTrainConfig", "SamTrainResult", "arch_of", "train_sam", "write_curve"]
