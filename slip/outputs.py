"""Result files: COCO RLE segments, chosen-mask PNGs and overlays.

Files per image (``render_outputs``), ``i`` being the prompt's index:

* ``segments.json`` — every candidate segment as COCO RLE with bbox (XYWH as SAM writes it: ``w = x_max - x_min``
  over inclusive pixel indices), area, SAM scores and its
  similarity to each prompt, the match of each prompt, the filter statistics and all parameters;
* ``mask_<i>.png`` — the chosen mask, mode ``L`` (0 / 255), image size (all black for no match);
* ``overlay_<i>.png`` — the image with the chosen mask highlighted, prompt and score written on it.
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from slip.types import FilterStat, Match, MaskSet, SlipResult

HIGHLIGHT = np.array([255, 40, 40], dtype=np.float32)  # RGB of the chosen-mask tint
FORMAT_VERSION = 1


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """``(N, H, W) bool`` masks -> COCO compressed RLE dicts (``counts`` as str, ``size`` [H, W])."""
    array = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if len(array) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def decode_rle(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """COCO RLE dicts -> ``(N, H, W) bool`` masks."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return mask_utils.decode(coded).transpose(2, 0, 1).astype(bool)


def xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    """``(N, 4)`` XYXY float boxes -> XYWH lists."""
    b = boxes.detach().cpu().float()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()


def segments_record(segments: MaskSet) -> list[dict]:
    """JSON records of a MaskSet, without similarities."""
    rles = encode_rle(segments.masks)
    boxes = xyxy_to_xywh(segments.boxes)
    areas = segments.areas.cpu().tolist()
    return [
        {
            "id": i,
            "segmentation": rles[i],
            "bbox": boxes[i],
            "area": int(areas[i]),
            "predicted_iou": float(segments.predicted_iou[i]),
            "stability_score": float(segments.stability_score[i]),
            "point_coords": [float(v) for v in segments.point_coords[i].tolist()],
            "crop_box": [float(v) for v in segments.crop_boxes[i].tolist()],
        }
        for i in range(len(segments))
    ]


def match_record(match: Match) -> dict:
    return {
        "prompt": match.prompt,
        "segment": match.index,
        "score": match.score,
        "top_k": [{"segment": i, "score": s} for i, s in match.top_k],
    }


def filter_stat_record(stat: FilterStat) -> dict:
    return {"name": stat.name, "params": stat.params, "before": stat.before, "removed": stat.removed}


def result_record(result: SlipResult, prompts: Sequence[str], params: dict) -> dict:
    """The ``segments.json`` document of one image."""
    segments = segments_record(result.proposals.segments)
    similarity = result.similarity.cpu().tolist()
    for seg, row in zip(segments, similarity):
        seg["similarity"] = {p: float(s) for p, s in zip(prompts, row)}
    return {
        "format_version": FORMAT_VERSION,
        "image_size": {"height": result.image_size[0], "width": result.image_size[1]},
        "prompts": list(prompts),
        "params": params,
        "generated": result.proposals.generated,
        "filters": [filter_stat_record(s) for s in result.proposals.filter_stats],
        "segments": segments,
        "matches": [match_record(m) for m in result.matches],
        "timings_s": {k: round(v, 6) for k, v in result.timings.items()},
    }


def chosen_mask(result: SlipResult, match: Match) -> np.ndarray:
    """``(H, W) bool`` mask chosen for ``match`` (all False when there is no match)."""
    if match.index is None:
        return np.zeros(result.image_size, dtype=bool)
    return result.proposals.segments.masks[match.index].cpu().numpy()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """``(H, W) bool`` -> PNG bytes, mode L, 0 / 255."""
    return png_bytes(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))


def overlay_image(image: np.ndarray, mask: np.ndarray, caption: str) -> Image.Image:
    """The image darkened outside ``mask``, tinted inside, its outline drawn and ``caption`` written."""
    base = image.astype(np.float32)
    out = np.where(mask[..., None], 0.55 * base + 0.45 * HIGHLIGHT, 0.6 * base)
    edge = mask & ~_erode(mask)
    out[edge] = HIGHLIGHT
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, image.shape[0] // 30))
    left, top, right, bottom = draw.textbbox((4, 4), caption, font=font)
    draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255), font=font)
    return canvas


def _erode(mask: np.ndarray) -> np.ndarray:
    """One-pixel binary erosion of an ``(H, W) bool`` mask (4-neighbourhood)."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def caption(match: Match) -> str:
    if match.index is None:
        score = "no segments" if match.score is None else f"no match (best {match.score:.3f})"
        return f"{match.prompt}: {score}"
    return f"{match.prompt}: segment {match.index}, score {match.score:.3f}"


def render_outputs(image: np.ndarray, result: SlipResult, prompts: Sequence[str], params: dict) -> dict[str, bytes]:
    """All result files of one image, as ``{relative name: bytes}``; see the module docstring."""
    files = {"segments.json": json.dumps(result_record(result, prompts, params), indent=1).encode()}
    for i, match in enumerate(result.matches):
        mask = chosen_mask(result, match)
        files[f"mask_{i}.png"] = mask_png(mask)
        files[f"overlay_{i}.png"] = png_bytes(overlay_image(image, mask, caption(match)))
    return files
