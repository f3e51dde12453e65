"""Result files: ``segments.json`` (every segment as COCO RLE, the matches, the resolved request) and,
on request, chosen-mask PNGs and overlays.

``segments.json`` (format 2; see docs/CONTRACTS.md)::

    {"format_version": 2, "image_size": {"height", "width"}, "prompts": [...],
     "request": ResolvedRequest.to_json(), "request_digest": <sha256 of the result identity>,
     "runtime": {"points_per_batch", ...},  # settings that change speed, not output
     "generated": int, "filters": [{"name", "params", "before", "removed"}],
     "segments": [{"id", "segmentation": COCO RLE {"size": [H, W], "counts": str}, "bbox": [x, y, w, h],
                   "area", "predicted_iou", "stability_score", "point_coords": [x, y], "crop_box": [x, y, w, h],
                   "similarity": {prompt: cosine}}],
     "matches": [{"prompt", "threshold", "instances": [{"segment", "score"}], "best": {"segment", "score"} | null,
                  "top_k": [{"segment", "score"}]}],
     "timings_s": {stage: seconds}}

``bbox`` is ``pycocotools.mask.toBbox`` of the RLE (``w = x_max - x_min + 1`` over inclusive pixel indices);
an empty ``instances`` list is an explicit "not found". Rendered files, ``i`` being the prompt's index:
``mask_<i>.png`` (the union of the prompt's instances, mode ``L``, 0 / 255, image size) and ``overlay_<i>.png``.
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from slip.request import ResolvedRequest
from slip.types import FilterStat, Match, MaskSet, Proposals, SlipResult

HIGHLIGHT = np.array([255, 40, 40], dtype=np.float32)  # RGB of the chosen-mask tint
FORMAT_VERSION = 2
RESULT_FILE = "segments.json"


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """``(N, H, W) bool`` masks -> COCO compressed RLE dicts (``counts`` as str, ``size`` [H, W])."""
    return [_rle_json(r) for r in _coco_rles(masks)]


def _coco_rles(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """pycocotools RLEs (``counts`` as bytes) of ``(N, H, W)`` masks. pycocotools reads an ``(H, W, N)`` uint8
    array in Fortran order, which is the ``(N, W, H)`` C-order array: one transposing copy (torch's), no other."""
    if not isinstance(masks, torch.Tensor):
        masks = torch.from_numpy(np.ascontiguousarray(masks))
    if len(masks) == 0:
        return []
    columns = masks.detach().cpu().transpose(1, 2).contiguous().numpy()  # (N, W, H): each mask column by column
    pixels = columns.view(np.uint8) if columns.dtype == np.bool_ else columns.astype(np.uint8)
    return mask_utils.encode(pixels.transpose(2, 1, 0))  # (H, W, N), Fortran-contiguous: no copy


def _rle_json(rle: dict) -> dict:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rles: Sequence[dict], height: int, width: int) -> np.ndarray:
    """COCO RLE dicts -> ``(N, H, W) bool`` masks."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return mask_utils.decode(coded).transpose(2, 0, 1).astype(bool)


def segment_records(segments: MaskSet) -> list[dict]:
    """JSON records of a MaskSet (no similarities): the form results and the proposals cache share. Boxes
    and areas come from the RLEs (the same numbers as from the masks, without another pass over them)."""
    coded = _coco_rles(segments.masks)
    rles = [_rle_json(r) for r in coded]
    boxes = [[float(v) for v in box] for box in mask_utils.toBbox(coded)] if coded else []
    areas = mask_utils.area(coded).tolist() if coded else []
    ious = segments.predicted_iou.detach().cpu().float().tolist()
    stabilities = segments.stability_score.detach().cpu().float().tolist()
    points = segments.point_coords.detach().cpu().float().tolist()
    crops = segments.crop_boxes.detach().cpu().float().tolist()
    return [
        {"id": i, "segmentation": rles[i], "bbox": boxes[i], "area": int(areas[i]), "predicted_iou": ious[i],
         "stability_score": stabilities[i], "point_coords": points[i], "crop_box": crops[i]}
        for i in range(len(rles))
    ]


def maskset_from_records(records: Sequence[dict], height: int, width: int) -> MaskSet:
    """Inverse of :func:`segment_records`: a CPU MaskSet (boxes XYXY inclusive from the COCO boxes)."""
    if not records:
        return MaskSet.empty(height, width)
    xywh = torch.tensor([r["bbox"] for r in records], dtype=torch.float32)
    return MaskSet(
        masks=torch.from_numpy(decode_rle([r["segmentation"] for r in records], height, width)),
        boxes=torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:] - 1], 1),
        predicted_iou=torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32),
        stability_score=torch.tensor([r["stability_score"] for r in records], dtype=torch.float32),
        point_coords=torch.tensor([r["point_coords"] for r in records], dtype=torch.float32),
        crop_boxes=torch.tensor([r["crop_box"] for r in records], dtype=torch.float32),
    )


def filter_stat_record(stat: FilterStat) -> dict:
    return {"name": stat.name, "params": stat.params, "before": stat.before, "removed": stat.removed}


def match_record(match: Match) -> dict:
    pair = lambda p: {"segment": p[0], "score": p[1]}  # noqa: E731
    return {"prompt": match.prompt, "threshold": match.threshold, "instances": [pair(p) for p in match.instances],
            "best": None if match.best is None else pair(match.best), "top_k": [pair(p) for p in match.top_k]}


def result_document(
    *, image_size: tuple[int, int], prompts: Sequence[str], request: ResolvedRequest, segments: Sequence[dict],
    similarity: torch.Tensor, matches: Sequence[Match], generated: int, filters: Sequence[dict],
    timings: dict[str, float], runtime: dict,
) -> dict:
    """The ``segments.json`` document of one image; ``segments`` from :func:`segment_records` (or the
    proposals cache, reused as stored), ``similarity`` ``(N, P)``."""
    rows = similarity.cpu().tolist()
    return {
        "format_version": FORMAT_VERSION,
        "image_size": {"height": image_size[0], "width": image_size[1]},
        "prompts": list(prompts),
        "request": request.to_json(),
        "request_digest": request.result_digest(prompts),
        "runtime": runtime,
        "generated": generated,
        "filters": list(filters),
        "segments": [{**seg, "similarity": dict(zip(prompts, map(float, row)))} for seg, row in zip(segments, rows)],
        "matches": [match_record(m) for m in matches],
        "timings_s": {k: round(v, 6) for k, v in timings.items()},
    }


def result_record(result: SlipResult, prompts: Sequence[str], request: ResolvedRequest, runtime: dict) -> dict:
    """The ``segments.json`` document of a pipeline result."""
    proposals: Proposals = result.proposals
    return result_document(
        image_size=result.image_size, prompts=prompts, request=request,
        segments=segment_records(proposals.segments), similarity=result.similarity, matches=result.matches,
        generated=proposals.generated, filters=[filter_stat_record(s) for s in proposals.filter_stats],
        timings=result.timings, runtime=runtime,
    )


# --- rendered files -------------------------------------------------------------------------------------


def chosen_mask(masks: torch.Tensor | np.ndarray, match: Match, image_size: tuple[int, int]) -> np.ndarray:
    """``(H, W) bool`` union of the segments chosen for ``match`` (all False when none)."""
    union = np.zeros(image_size, dtype=bool)
    for index, _ in match.instances:
        row = masks[index]
        union |= row.cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row)
    return union


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
    """``"<prompt>: 0.412"``, ``"<prompt>: 3 instances, best 0.412"`` or ``"<prompt>: not found (best ...)"``."""
    if not match.instances:
        best = "no segments" if match.best is None else f"best {match.best[1]:.3f}"
        return f"{match.prompt}: not found ({best})"
    if len(match.instances) == 1:
        return f"{match.prompt}: {match.instances[0][1]:.3f}"
    return f"{match.prompt}: {len(match.instances)} instances, best {match.instances[0][1]:.3f}"


def rendered_files(image: np.ndarray, masks: torch.Tensor | np.ndarray, matches: Sequence[Match]) -> dict[str, bytes]:
    """``mask_<i>.png`` and ``overlay_<i>.png`` of every prompt ``i``."""
    files = {}
    size = (int(image.shape[0]), int(image.shape[1]))
    for i, match in enumerate(matches):
        mask = chosen_mask(masks, match, size)
        files[f"mask_{i}.png"] = mask_png(mask)
        files[f"overlay_{i}.png"] = png_bytes(overlay_image(image, mask, caption(match)))
    return files


def render_outputs(image: np.ndarray, result: SlipResult, prompts: Sequence[str], request: ResolvedRequest,
                   runtime: dict | None = None, *, render: bool = True) -> dict[str, bytes]:
    """All result files of one image, as ``{relative name: bytes}``, ``segments.json`` last; PNGs only
    when ``render``."""
    files = rendered_files(image, result.proposals.segments.masks, result.matches) if render else {}
    document = result_record(result, prompts, request, runtime or {})
    files[RESULT_FILE] = json.dumps(document, indent=1).encode()
    return files
