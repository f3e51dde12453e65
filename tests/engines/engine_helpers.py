"""Shared builders for the engines' tests: real checkpoints in their real formats, from seeded random weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from slip.proposers.sam2_hf import to_hf_state
from slip.proposers.sam2_model import SAM2_ARCHS, TINY_SAM2

TINY = SAM2_ARCHS[TINY_SAM2]


def official_tiny_sam2(seed: int = 0):
    """A random SAM 2.1 built the way facebookresearch/sam2 builds it: ``sam2.build_sam.build_sam2`` from the
    package's config yaml (the tiny-random overrides), nothing of slip's."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    return build_sam2(TINY.config, None, device="cpu", hydra_overrides_extra=list(TINY.overrides)).eval()


def save_official(model, path: Path) -> Path:
    """``{"model": state_dict}`` in a ``.pt``, as the sam2 releases are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def hf_sam2_config():
    """The transformers ``Sam2Config`` of the tiny-random-sam2 architecture."""
    from transformers import Sam2Config, Sam2HieraDetConfig, Sam2VisionConfig

    hiera = Sam2HieraDetConfig(hidden_size=8, num_attention_heads=1, blocks_per_stage=[1, 1, 2, 1],
                               embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 2, 4, 8],
                               global_attention_blocks=[3])
    vision = Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32)
    return Sam2Config(vision_config=vision, prompt_encoder_config=dict(hidden_size=32),
                      mask_decoder_config=dict(hidden_size=32))


def save_hf_sam2(model, directory: Path):
    """The same weights as a Hugging Face ``Sam2Model`` directory (``save_pretrained``); returns the HF model."""
    from transformers import Sam2Model

    hf = Sam2Model(hf_sam2_config()).eval()
    hf.load_state_dict(to_hf_state(model.state_dict()), strict=True)
    hf.save_pretrained(directory)
    return hf


def put_in_hf_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source``'s files out as the Hugging Face hub cache does (``<cache>/hf/models--org--name``), as if
    ``slip weights fetch repo_id`` had downloaded them; returns the snapshot folder."""
    revision = "0" * 40
    repo = cache / "hf" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def scene(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """``(H, W, 3) uint8``: a shaded background with a few discs and boxes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    image = np.stack([60 + 60 * xx / width, 90 + 40 * yy / height, 80 + 0 * xx], -1)
    for _ in range(5):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(8, 24)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2] = rng.integers(0, 256, 3)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
