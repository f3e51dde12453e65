"""Hugging Face ``SamModel`` checkpoints, loaded into the official ``segment_anything`` classes.

A Hugging Face SAM directory (``save_pretrained`` of ``transformers.SamModel``, or a hub snapshot such
as ``facebook/sam-vit-base``) holds::

    config.json                 {"model_type": "sam", "vision_config": {...}, "prompt_encoder_config": {...},
                                 "mask_decoder_config": {...}}   (sub-configs may omit defaults)
    model.safetensors           the weights (preferred; or a sharded model.safetensors.index.json)
    pytorch_model.bin           older weights format (read with torch.load(weights_only=True))

:func:`load_hf_sam` derives a :class:`~slip.sam.SamArch` from the config, builds the official model with
:func:`slip.sam.build_sam` and renames every tensor (the inverse of transformers'
``convert_sam_to_hf.py``). The two implementations compute the same function; they differ in names
and in how a few parts are laid out:

* ViT: ``layers.N`` / ``layer_norm1,2`` / ``patch_embed.projection`` are ``blocks.N`` / ``norm1,2`` /
  ``patch_embed.proj``; qkv is one fused ``(3C, C)`` Linear in both, the relative position tables
  ``rel_pos_h/w`` (``(2S - 1, C / heads)``) and the absolute ``pos_embed`` ``(1, G, G, C)`` are identical;
* neck: named ``conv1, layer_norm1, conv2, layer_norm2`` vs the Sequential's ``0, 1, 2, 3``;
* random-Fourier positional encoding: HF keeps ``shared_image_embedding`` (dense image PE) and
  ``prompt_encoder.shared_embedding`` (points) as two tied copies, official has one
  ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`` ``(2, C / 2)``: both copies must agree;
* prompt encoder: ``point_embed.i`` = ``point_embeddings.i`` (0/1: negative/positive point, 2/3: box
  corners), ``mask_embed.conv1, layer_norm1, conv2, layer_norm2, conv3`` = ``mask_downscaling.0, 1, 3,
  4, 6`` (the GELUs hold no weights), ``no_mask_embed`` and ``not_a_point_embed`` keep their names;
* mask decoder: two-way blocks' ``layer_normK`` = ``normK``, ``layer_norm_final_attn`` =
  ``norm_final_attn``; ``upscale_conv1, upscale_layer_norm, upscale_conv2`` = ``output_upscaling.0, 1,
  3``; the hypernetwork MLPs and the IoU head are ``proj_in, layers.0 .. layers.D-3, proj_out`` vs
  ``layers.0 .. layers.D-1``;
* layer norms: HF's two-way blocks use ``layer_norm_eps`` (1e-6) where the official blocks use
  PyTorch's default 1e-5; the difference is far below float32 tolerance on real activations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
import torch
from segment_anything.modeling import Sam

from slip.errors import WeightsError, WeightsNotFoundError
from slip.sam_arch import OFFICIAL_TYPES, SAM_ARCHS, SamArch, build_sam

MODEL_TYPE = "sam"  # config.json "model_type" of a transformers SamModel
CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)  # in order of preference
HF_NAME = "hf-sam"  # SamArch.name of an HF SAM whose sizes are not an official one

# the two tied copies of the random-Fourier matrix; both become the official pe_layer's
PE_OFFICIAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

# --- the name mapping, HF -> official (applied in order; each rule rewrites part of a name) ---------------

_RULES: tuple[tuple[str, str], ...] = (
    # positional encoding (two tied HF copies -> one official matrix)
    (r"^shared_image_embedding\.positional_embedding$", PE_OFFICIAL),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$", PE_OFFICIAL),
    # image encoder
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.(\d+)\.", r"image_encoder.blocks.\1."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    # prompt encoder
    (r"^prompt_encoder\.point_embed\.(\d+)\.", r"prompt_encoder.point_embeddings.\1."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    # mask decoder
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"mask_decoder.transformer.layers.\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
)
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))"
                  r"\.(proj_in|layers\.(\d+)|proj_out)\.")
HYPERNET_DEPTH = 3  # layers of each hypernetwork MLP (fixed in both implementations)
IOU_HEAD_DEPTH = 3  # layers of the IoU head (the official builder's iou_head_depth)


def official_name(hf_name: str) -> str:
    """The official ``Sam`` state-dict name of an HF ``SamModel`` tensor name (unknown names pass through
    unchanged, so :func:`convert_state_dict` reports them as tensors that fit nowhere)."""
    name = hf_name
    for pattern, replacement in _RULES:
        name = re.sub(pattern, replacement, name)
    match = _MLP.match(name)
    if match:
        head, part, index = match.groups()
        depth = IOU_HEAD_DEPTH if head.endswith("iou_prediction_head") else HYPERNET_DEPTH
        layer = 0 if part == "proj_in" else depth - 1 if part == "proj_out" else int(index) + 1
        name = f"{head}.layers.{layer}." + name[match.end():]
    return name


# --- directory, config, weights -----------------------------------------------------------------------


def is_hf_sam_dir(path: Path) -> bool:
    """True when ``path`` is a directory whose ``config.json`` is a JSON object with ``model_type`` "sam"."""
    config = Path(path) / CONFIG_FILE
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def read_hf_config(directory: Path):
    """The ``transformers.SamConfig`` of ``directory`` (defaults filled in); WeightsError naming the file."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import SamConfig

    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {data.get('model_type') if isinstance(data, dict) else None!r}, not 'sam'")
        return SamConfig.from_dict(data)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as e:
        raise WeightsError(f"{path} is not a Hugging Face SamModel config: {_first_line(e)}") from e


def weights_file(directory: Path) -> Path:
    """The weights file of an HF SAM directory (see :data:`WEIGHT_FILES`), or WeightsNotFoundError."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise WeightsNotFoundError(f"no Hugging Face SAM weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file (or of the shards an ``*.index.json`` names), on the CPU."""
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"cannot read the shard index {path}: {_first_line(e)}") from e
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_tensors(path.parent / shard))
        return state
    return _read_tensors(path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One ``.safetensors`` or pickle-free ``.bin`` file; never unpickles arbitrary objects."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base; all mean "unreadable"
        raise WeightsError(f"cannot read Hugging Face SAM weights {path}: {_first_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a flat dict of tensors")
    return state


# --- architecture -----------------------------------------------------------------------------------------


def arch_from_hf_config(config, *, source: Path) -> SamArch:
    """The :class:`SamArch` of a ``SamConfig``; WeightsError (naming ``source``) when the official classes
    cannot express it (other activations, depths, no relative positions, ...)."""
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    _require(source, vision, prompt, decoder)
    arch = SamArch(
        encoder_embed_dim=vision.hidden_size,
        encoder_depth=vision.num_hidden_layers,
        encoder_num_heads=vision.num_attention_heads,
        encoder_global_attn_indexes=tuple(int(i) for i in vision.global_attn_indexes),
        img_size=int(vision.image_size),
        patch_size=int(vision.patch_size),
        window_size=vision.window_size,
        prompt_embed_dim=prompt.hidden_size,
        decoder_depth=decoder.num_hidden_layers,
        decoder_mlp_dim=decoder.mlp_dim,
        decoder_num_heads=decoder.num_attention_heads,
        iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        mask_in_chans=prompt.mask_input_channels,
        name=HF_NAME,
    )
    return next((SAM_ARCHS[t] for t in OFFICIAL_TYPES if SAM_ARCHS[t] == arch), arch)


def _require(source: Path, vision, prompt, decoder) -> None:
    """Raise WeightsError on the first config value the official builder does not support."""
    width = prompt.hidden_size
    checks: list[tuple[str, object, object]] = [  # (what, found, what build_sam needs)
        ("vision_config.hidden_act", vision.hidden_act, "gelu"),
        ("vision_config.num_channels", vision.num_channels, 3),
        ("vision_config.qkv_bias", vision.qkv_bias, True),
        ("vision_config.use_abs_pos", vision.use_abs_pos, True),
        ("vision_config.use_rel_pos", vision.use_rel_pos, True),
        ("vision_config.layer_norm_eps", vision.layer_norm_eps, 1e-6),
        ("vision_config.mlp_dim", vision.mlp_dim, int(vision.hidden_size * 4)),
        ("vision_config.image_size", _side(vision.image_size), _side(prompt.image_size)),
        ("vision_config.patch_size", _side(vision.patch_size), _side(prompt.patch_size)),
        ("vision_config.output_channels", vision.output_channels, width),
        ("vision_config.num_pos_feats", vision.num_pos_feats, width // 2),
        ("prompt_encoder_config.hidden_act", prompt.hidden_act, "gelu"),
        ("prompt_encoder_config.num_point_embeddings", prompt.num_point_embeddings, 4),
        ("prompt_encoder_config.layer_norm_eps", prompt.layer_norm_eps, 1e-6),
        ("mask_decoder_config.hidden_size", decoder.hidden_size, width),
        ("mask_decoder_config.hidden_act", decoder.hidden_act, "relu"),
        ("mask_decoder_config.attention_downsample_rate", decoder.attention_downsample_rate, 2),
        ("mask_decoder_config.num_multimask_outputs", decoder.num_multimask_outputs, 3),
        ("mask_decoder_config.iou_head_depth", decoder.iou_head_depth, IOU_HEAD_DEPTH),
    ]
    for what, found, needed in checks:
        if found != needed:
            raise WeightsError(f"{source}: {what} is {found!r}, the official SAM classes need {needed!r}")
    if _side(vision.image_size) % _side(vision.patch_size):
        raise WeightsError(f"{source}: image_size {vision.image_size} is not a multiple of patch_size "
                           f"{vision.patch_size}")


def _side(size) -> int | tuple:
    """A square size as one int (``1024`` or ``[1024, 1024]``); a non-square one as a tuple (never fits)."""
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(set(size)) == 1 else tuple(size)
    return int(size)


# --- conversion -------------------------------------------------------------------------------------------


def convert_state_dict(hf_state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *,
                       source: Path) -> dict[str, torch.Tensor]:
    """HF tensors renamed to the official names of ``target`` (an official ``Sam`` state dict, for the
    names and shapes); WeightsError naming ``source`` and the first tensor that does not fit."""
    out: dict[str, torch.Tensor] = {}
    for hf_name, tensor in hf_state.items():
        name = official_name(hf_name)
        if name not in target:
            raise WeightsError(f"{source}: tensor {hf_name!r} has no place in the official SAM ({len(hf_state)} "
                               "tensors; is this a SamModel of another family?)")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise WeightsError(f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, config.json needs "
                               f"{tuple(target[name].shape)} (for {name})")
        if name in out and not torch.equal(out[name], tensor):
            raise WeightsError(f"{source}: the tied positional encodings differ ({hf_name!r} vs its twin)")
        out[name] = tensor
    missing = [k for k in target if k not in out]
    if missing:
        raise WeightsError(f"{source}: {len(missing)} official SAM tensors have no HF weight, e.g. {missing[0]!r}")
    return out


def load_hf_sam(path: Path) -> tuple[Sam, SamArch]:
    """An official ``Sam`` (eval mode, CPU, float32) and its :class:`SamArch` from the HF SAM directory
    ``path``; every tensor of the model comes from the checkpoint (nothing is left at random init)."""
    directory = Path(path)
    if not directory.is_dir():
        raise WeightsNotFoundError(f"no Hugging Face SAM directory at {directory}")
    arch = arch_from_hf_config(read_hf_config(directory), source=directory / CONFIG_FILE)
    weights = weights_file(directory)
    sam = build_sam(arch)
    state = convert_state_dict(read_hf_weights(weights), sam.state_dict(), source=weights)
    _load(sam, state, weights)
    return sam.eval(), arch


def _load(sam: Sam, state: dict[str, torch.Tensor], weights: Path) -> None:
    try:
        sam.load_state_dict(state, strict=True)  # copies (and casts fp16/bf16 -> fp32) into the built model
    except RuntimeError as e:
        raise WeightsError(f"{weights} does not fit the official SAM: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


__all__ = ["arch_from_hf_config", "convert_state_dict", "is_hf_sam_dir", "load_hf_sam", "official_name",
           "read_hf_config", "read_hf_weights", "weights_file"]
