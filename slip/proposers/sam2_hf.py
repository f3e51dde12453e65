"""Hugging Face ``Sam2Model`` directories, converted at load into the official ``sam2`` model.

A Hugging Face SAM 2 directory (``save_pretrained`` of ``transformers.Sam2Model``, or a hub snapshot such as
``facebook/sam2.1-hiera-large``) holds ``config.json`` (``"model_type": "sam2"``) and ``model.safetensors``
(or ``pytorch_model.bin``, possibly sharded). It carries the image path only: Hiera trunk + FPN neck, prompt
encoder, mask decoder and the "no memory" embedding. :func:`load_hf_sam2` recognises the architecture from
the config, builds the official model (:func:`slip.proposers.sam2_model.build_sam2`) and fills every tensor of
its image path from the checkpoint; the video-memory modules, which images never use, keep their seeded
initial values.

The names differ as follows (official -> Hugging Face; :func:`hf_name` applies it, loading inverts it):

* ``image_encoder.trunk.`` -> ``vision_encoder.backbone.``; ``image_encoder.neck.convs.N.conv.`` ->
  ``vision_encoder.neck.convs.N.``; ``sam_prompt_encoder.`` / ``sam_mask_decoder.`` -> ``prompt_encoder.`` /
  ``mask_decoder.``; ``no_mem_embed`` -> ``no_memory_embedding``;
* ``patch_embed.proj`` -> ``patch_embed.projection``; ``normK`` -> ``layer_normK``; ``norm_final_attn`` ->
  ``layer_norm_final_attn``; attention ``out_proj`` -> ``o_proj``;
* an MLP's ``layers.0 .. layers.(n-1)`` -> ``proj_in, layers.0 .. layers.(n-3), proj_out``;
* ``output_upscaling.0, 1, 3`` -> ``upscale_conv1, upscale_layer_norm, upscale_conv2``; ``mask_downscaling.0,
  1, 3, 4, 6`` -> ``mask_embed.conv1, layer_norm1, conv2, layer_norm2, conv3``;
* ``pe_layer.positional_encoding_gaussian_matrix`` -> ``shared_embedding.positional_embedding`` (Hugging Face
  keeps a tied copy as ``shared_image_embedding.positional_embedding``: both must agree);
* the four ``point_embeddings.i.weight`` ``(1, C)`` -> the rows of one ``point_embed.weight`` ``(4, C)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from slip.errors import WeightsError, WeightsNotFoundError
from slip.proposers.sam2_model import SAM2_ARCHS, TINY_SAM2, Sam2Arch, build_sam2
from slip.sam_hf import read_hf_weights, weights_file
from slip.weights import model_type

MODEL_TYPE = "sam2"  # config.json "model_type" of a transformers Sam2Model
CONFIG_FILE = "config.json"
IMAGE_PATH = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")  # what images use
POINT_EMBED = "prompt_encoder.point_embed.weight"
TIED_PE = ("prompt_encoder.shared_embedding.positional_embedding", "shared_image_embedding.positional_embedding")

_RULES: tuple[tuple[str, str], ...] = (  # official -> Hugging Face, applied in order
    (r"^image_encoder\.trunk\.", "vision_encoder.backbone."),
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"^sam_prompt_encoder\.", "prompt_encoder."),
    (r"^sam_mask_decoder\.", "mask_decoder."),
    (r"^no_mem_embed$", "no_memory_embedding"),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.norm(\d)\.", r".layer_norm\1."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"\.out_proj\.", ".o_proj."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
)
_MLP = re.compile(r"^(.*\.(?:mlp|output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))"
                  r"\.layers\.(\d+)\.(weight|bias)$")
_POINT = re.compile(r"^prompt_encoder\.point_embeddings\.(\d+)\.weight$")


def hf_name(name: str, mlp_depth: dict[str, int]) -> str:
    """The Hugging Face name of an official SAM 2 tensor name; ``mlp_depth`` gives each MLP's layer count
    (by its official prefix, e.g. ``sam_mask_decoder.iou_prediction_head``)."""
    match = _MLP.match(name)
    depth = mlp_depth.get(match.group(1)) if match else None
    for pattern, replacement in _RULES:
        name = re.sub(pattern, replacement, name)
    if match and depth:
        head = _MLP.match(name).group(1)
        index = int(match.group(2))
        part = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
        name = f"{head}.{part}.{match.group(3)}"
    return name


def mlp_depths(official: dict[str, torch.Tensor]) -> dict[str, int]:
    """Layer count of every MLP of an official state dict, by its prefix."""
    depths: dict[str, int] = {}
    for name in official:
        match = _MLP.match(name)
        if match:
            depths[match.group(1)] = max(depths.get(match.group(1), 0), int(match.group(2)) + 1)
    return depths


def to_hf_state(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image path of an official SAM 2 state dict under Hugging Face ``Sam2Model`` names (what
    ``save_pretrained`` of the same weights holds; tests build Hugging Face directories with it)."""
    depths = mlp_depths(official)
    out: dict[str, torch.Tensor] = {}
    points = {}
    for name, tensor in official.items():
        if not name.startswith(IMAGE_PATH):
            continue
        target = hf_name(name, depths)
        if (point := _POINT.match(target)) is not None:
            points[int(point.group(1))] = tensor
            continue
        out[target] = tensor
    out[POINT_EMBED] = torch.cat([points[i] for i in sorted(points)], dim=0)
    out[TIED_PE[1]] = out[TIED_PE[0]]
    return out


def is_hf_sam2_dir(path: Path) -> bool:
    """True when ``path`` is a directory whose ``config.json`` has ``model_type`` "sam2"."""
    return model_type(Path(path)) == MODEL_TYPE


def arch_from_hf_config(directory: Path, *, spec: str = "") -> Sam2Arch:
    """The registered architecture of a Hugging Face SAM 2 directory (Hiera width and blocks per stage;
    2.0 when the spec or the config's name says ``sam2-``, else 2.1: the image path is the same)."""
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
        backbone = data.get("vision_config", {}).get("backbone_config", {})
        width = int(backbone.get("hidden_size", 96))
        stages = tuple(int(b) for b in backbone.get("blocks_per_stage", (1, 2, 7, 2)))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path} is not a Hugging Face Sam2Model config: {e}") from e
    named = f"{spec} {data.get('_name_or_path', '')}"
    version = "2" if re.search(r"sam2-hiera", named) else "2.1"
    for arch in SAM2_ARCHS.values():
        if (arch.width, arch.stages) == (width, stages) and (arch.version == version or arch.name == TINY_SAM2):
            return arch
    raise WeightsError(f"{path}: a SAM 2 with Hiera width {width} and blocks per stage {list(stages)} matches no "
                       f"released size (tiny, small, base-plus, large)")


def convert_state_dict(hf_state: dict[str, torch.Tensor], official: dict[str, torch.Tensor], *,
                       source: Path) -> dict[str, torch.Tensor]:
    """The official image-path tensors of ``official`` (for names and shapes) taken from ``hf_state``;
    WeightsError naming ``source`` and the first tensor that is missing, left over or of the wrong shape."""
    if TIED_PE[1] in hf_state and TIED_PE[0] in hf_state and not torch.equal(hf_state[TIED_PE[0]], hf_state[TIED_PE[1]]):
        raise WeightsError(f"{source}: the tied positional encodings differ ({TIED_PE[0]} vs {TIED_PE[1]})")
    depths = mlp_depths(official)
    used = {TIED_PE[1]}
    out: dict[str, torch.Tensor] = {}
    for name, target in official.items():
        if not name.startswith(IMAGE_PATH):
            continue
        theirs = hf_name(name, depths)
        if (point := _POINT.match(theirs)) is not None:
            tensor, theirs = _row(hf_state, int(point.group(1)), source), POINT_EMBED
        elif theirs in hf_state:
            tensor = hf_state[theirs]
        else:
            raise WeightsError(f"{source}: no tensor {theirs!r} for the official {name!r} (is this a SAM 2 of "
                               f"another size or family?)")
        if tuple(tensor.shape) != tuple(target.shape):
            raise WeightsError(f"{source}: tensor {theirs!r} has shape {tuple(tensor.shape)}, the official model "
                               f"needs {tuple(target.shape)} (for {name})")
        out[name] = tensor
        used.add(theirs)
    extra = sorted(set(hf_state) - used)
    if extra:
        raise WeightsError(f"{source}: {len(extra)} tensors have no place in the official SAM 2, e.g. {extra[0]!r}")
    return out


def _row(hf_state: dict[str, torch.Tensor], index: int, source: Path) -> torch.Tensor:
    if POINT_EMBED not in hf_state:
        raise WeightsError(f"{source}: no tensor {POINT_EMBED!r}")
    return hf_state[POINT_EMBED][index : index + 1]


def load_hf_sam2(path: Path, *, spec: str = ""):
    """``(SAM2Base, Sam2Arch)`` from the Hugging Face SAM 2 directory ``path``: the official model (eval mode,
    CPU, float32) with every image-path tensor from the checkpoint."""
    directory = Path(path)
    if not directory.is_dir():
        raise WeightsNotFoundError(f"no Hugging Face SAM 2 directory at {directory}")
    arch = arch_from_hf_config(directory, spec=spec)
    weights = weights_file(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the unused video-memory modules: the same values on every load
        model = build_sam2(arch)
    official = model.state_dict()
    state = convert_state_dict(read_hf_weights(weights), official, source=weights)
    try:
        model.load_state_dict({**official, **state}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{weights} does not fit the official {arch.name}: {str(e).splitlines()[0]}") from e
    return model.eval(), arch
