"""SAM 1 architectures: the hyper-parameters of each size, and the builder of the official model.

Kept apart from :mod:`slip.sam` (specs, checkpoints, loading) so that :mod:`slip.sam_hf` can build the
official model without importing the loader that dispatches to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from slip import names
from slip.errors import ConfigError

OFFICIAL_TYPES = names.SAM1_TYPES
TINY_SPEC = names.TINY


@dataclass(frozen=True)
class SamArch:
    """Hyper-parameters of a SAM; the official sizes differ only in the encoder fields."""

    encoder_embed_dim: int  # ViT width
    encoder_depth: int  # ViT blocks
    encoder_num_heads: int  # ViT attention heads
    encoder_global_attn_indexes: tuple[int, ...]  # blocks with global (not windowed) attention
    img_size: int = 1024  # input side in pixels after ResizeLongestSide + padding
    patch_size: int = 16  # ViT patch side; embedding grid is img_size // patch_size
    window_size: int = 14  # windowed-attention side, in patches
    prompt_embed_dim: int = 256  # width of prompt encoder, mask decoder and encoder neck
    decoder_depth: int = 2  # two-way transformer blocks
    decoder_mlp_dim: int = 2048  # two-way transformer MLP width
    decoder_num_heads: int = 8  # two-way transformer heads
    iou_head_hidden_dim: int = 256  # IoU prediction MLP width
    mask_in_chans: int = 16  # channels of the dense mask-prompt embedding
    name: str = field(default="custom", compare=False)  # registry name, for messages only

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_json(data: dict) -> "SamArch":
        try:
            data = dict(data)
            data["encoder_global_attn_indexes"] = tuple(data["encoder_global_attn_indexes"])
            return SamArch(**data)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid SAM config: {e}") from e


SAM_ARCHS: dict[str, SamArch] = {
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31), name="vit_h"),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23), name="vit_l"),
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11), name="vit_b"),
    TINY_SPEC: SamArch(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        img_size=128,
        window_size=4,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
        name=TINY_SPEC,
    ),
}


def build_sam(arch: SamArch) -> Sam:
    """A randomly initialised ``Sam`` of ``arch``, in eval mode, on CPU."""
    grid = arch.img_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_tiny_sam(seed: int = 0) -> Sam:
    """The ``tiny-random`` SAM: deterministic for ``seed``, meaningless masks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(SAM_ARCHS[TINY_SPEC])


def detect_arch(state_dict: dict[str, torch.Tensor]) -> SamArch:
    """The official architecture whose shapes match ``state_dict``."""
    try:
        width = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
    except KeyError as e:
        raise ConfigError("not a SAM state dict: image_encoder.patch_embed.proj.weight is missing") from e
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for arch in (SAM_ARCHS[t] for t in OFFICIAL_TYPES):
        if (arch.encoder_embed_dim, arch.encoder_depth) == (width, depth):
            return arch
    raise ConfigError(
        f"SAM state dict has encoder width {width} and depth {depth}, which match no official model "
        "(vit_h 1280/32, vit_l 1024/24, vit_b 768/12); put a config.json with its SamArch beside it"
    )
