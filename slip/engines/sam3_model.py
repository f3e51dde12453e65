"""SAM 3 checkpoints: ``transformers.Sam3Model`` + ``Sam3Processor``, loaded by spec, with their digest.

A SAM 3 spec is one of:

* ``sam3`` or ``facebook/sam3`` — the Hugging Face snapshot in the weights cache (``$SLIP_CACHE/hf``). The
  repo is gated: accept the SAM licence on its page with a Hugging Face account, set ``HF_TOKEN`` to a token of
  that account and run ``slip weights fetch facebook/sam3``;
* a directory saved by ``Sam3Model.save_pretrained`` + ``Sam3Processor.save_pretrained`` (``config.json`` with
  ``model_type`` ``sam3``, or ``sam3_video`` whose detector is loaded);
* ``tiny-random-sam3`` — seeded random weights of the real classes (ViT width 32, 1008-pixel input like the
  real model, 20 queries) with an offline tokenizer; for tests, used only when named. Its masks mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slip import names
from slip.device import resolve_device
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError
from slip.request import ModelRef
from slip.weights import model_type

TINY_SAM3, HUB_SAM3, NAMES = names.TINY_SAM3, names.HUB_SAM3, names.SAM3
MODEL_TYPES = ("sam3", "sam3_video")  # config.json model_type of a directory Sam3Model loads
TEXT_TOKENS = 32  # Sam3Processor pads every prompt to this many tokens
TINY_IMAGE = 1008  # the real model's input side: the tiny model keeps its proportions of work


@dataclass(frozen=True)
class Sam3Bundle:
    """A loaded SAM 3 with what results must know about it."""

    model: torch.nn.Module  # transformers Sam3Model, eval mode, on its device
    processor: object  # transformers Sam3Processor (image processor + tokenizer)
    ref: ModelRef  # spec, architecture ("sam3" / "tiny-random-sam3"), SHA-256 of the weights really loaded
    threshold: float | None  # calibrated score threshold (threshold.json beside it; None if none)


def is_sam3_spec(spec: str) -> bool:
    """Whether ``spec`` names a SAM 3 checkpoint (a name, the hub id or a SAM 3 directory)."""
    if spec in names.SAM3_NAMES:
        return True
    path = Path(spec).expanduser()
    return path.is_dir() and model_type(path) in MODEL_TYPES


def build_tiny_sam3(seed: int = 0):
    """``(Sam3Model, Sam3Processor)`` of ``tiny-random-sam3``: deterministic for ``seed``."""
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from slip.rankers.hf_clip import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    grid = TINY_IMAGE // 14
    config = Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=TINY_IMAGE, patch_size=14, window_size=grid // 3,
                                 global_attn_indexes=[1], pretrain_image_size=336),
            fpn_hidden_size=32, backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]),
        text_config=dict(model_type="clip_text_model", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=TEXT_TOKENS, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=32, num_layers=2, num_queries=20, num_attention_heads=2,
                                 intermediate_size=64),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3Model(config).eval()
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}),
                              tokenizer=tokenizer)
    return model, processor


def save_sam3(model, processor, directory: Path) -> Path:
    """Write a SAM 3 directory (``save_pretrained`` of both) that :func:`load_sam3` reads by path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def load_sam3(spec: str, *, device: str | torch.device = "auto", cache_dir: Path | None = None) -> Sam3Bundle:
    """Load the SAM 3 ``spec`` (see the module docstring); ConfigError when it is not a SAM 3 checkpoint,
    WeightsNotFoundError naming the cache, the fetch command and the licence page when it is not on disk."""
    from slip.threshold import read_threshold
    from slip.weights import directory_sha256, tensors_sha256

    dev = resolve_device(device)
    if spec == TINY_SAM3:
        model, processor = build_tiny_sam3()
        ref = ModelRef(spec=spec, arch=TINY_SAM3, sha256=tensors_sha256(model.state_dict()))
        return Sam3Bundle(model.to(dev).eval(), processor, ref, None)
    directory = sam3_directory(spec, cache_dir)
    if spec not in NAMES:
        if not directory.exists():
            raise WeightsNotFoundError(f"no SAM 3 directory at {directory}; use --sam sam3 (the Hugging Face "
                                       f"snapshot, `slip weights fetch {HUB_SAM3}`), a saved directory or {TINY_SAM3}")
        if model_type(directory) not in MODEL_TYPES:
            raise ConfigError(f"{spec!r} is not a SAM 3 checkpoint (config.json model_type is "
                              f"{model_type(directory)!r}): the sam3 engines need --sam sam3, a SAM 3 directory or "
                              f"{TINY_SAM3}")
    model, processor = _load_directory(directory)
    ref = ModelRef(spec=spec, arch="sam3", sha256=directory_sha256(directory, cache_dir=cache_dir))
    return Sam3Bundle(model.to(dev).eval(), processor, ref, read_threshold(directory, ranker_sha256=ref.sha256))


def sam3_directory(spec: str, cache_dir: Path | None = None) -> Path | None:
    """The directory a SAM 3 spec names (the cached hub snapshot for ``sam3`` / ``facebook/sam3``, else the path);
    None for the in-memory tiny-random model. ``threshold.json`` beside it is the calibrated score threshold."""
    from slip.weights import clip_path

    if spec == TINY_SAM3:
        return None
    if spec in NAMES:
        return clip_path(HUB_SAM3, cache_dir, what="SAM 3 model")
    return Path(spec).expanduser()


def _load_directory(directory: Path):
    from transformers import Sam3Model, Sam3Processor

    try:
        model = Sam3Model.from_pretrained(directory, local_files_only=True)
        processor = Sam3Processor.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers and safetensors raise many types for corrupt or partial files
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise WeightsError(f"cannot load SAM 3 from {directory}: {type(e).__name__}: {first}; fetch or save it "
                           f"again") from e
    return model.eval(), processor
