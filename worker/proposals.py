"""The proposals cache: "segment once, query many".

SAM's filtered proposals depend on the image, the SAM spec, the resolved generator options (SAM's
defaults < the SAM's generator.json < the request's options; ``SegmentParams.generator_options``) and
the resolved filter chain (``containment`` < the SAM's filters.json < the request's chain;
``SegmentParams.filter_chain``), never on the prompt; the crop embeddings depend on those plus the ranker spec and the crop settings.
Both are kept in the store (layout in :mod:`worker.store`)::

    proposals/<image sha256>/<proposal digest>/segments.json
        {"format_version": 1, "identity": {...}, "image_size": {"height", "width"}, "generated": int,
         "filters": [{"name", "params", "before", "removed"}],
         "segments": [{"segmentation": COCO RLE, "box_xyxy": [x0, y0, x1, y1], "predicted_iou",
                       "stability_score", "point_coords": [x, y], "crop_box": [x, y, w, h]}]}
    proposals/<image sha256>/<proposal digest>/embeddings/<embedding digest>.safetensors
        {"embeddings": (N, D) float32, unit norm, row i = segment i}

so a new prompt on an image already segmented costs one text encode and an ``(N, D) x (D, P)`` product.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from slip.errors import StoreError
from slip.outputs import decode_rle, encode_rle
from slip.types import FilterStat, MaskSet, Proposals
from worker.jobs import Item, SegmentSpec
from worker.store import Store, digest, proposals_prefix, validate_key

FORMAT_VERSION = 1
SEGMENTS_FILE = "segments.json"


def proposals_key(spec: SegmentSpec, item: Item, generator: dict, filters: str) -> str:
    """``proposals/<sha>/<digest>/segments.json`` of ``item`` under ``spec``'s SAM, the resolved generator
    options ``generator`` (``WorkerResources.generator_options``) and the resolved filter chain ``filters``
    (``WorkerResources.filter_chain``)."""
    prefix = proposals_prefix(item.image_sha, digest(spec.params.proposal_identity(spec.sam, generator, filters)))
    return f"{prefix}/{SEGMENTS_FILE}"


def embeddings_key(spec: SegmentSpec, item: Item, generator: dict, filters: str) -> str:
    """``.../embeddings/<digest>.safetensors`` beside the proposals, for ``spec``'s ranker and crops."""
    folder = proposals_key(spec, item, generator, filters).rsplit("/", 1)[0]
    return validate_key(f"{folder}/embeddings/{digest(spec.params.embedding_identity(spec.clip))}.safetensors")


def proposals_record(proposals: Proposals, identity: dict) -> dict:
    """The JSON document of ``proposals`` (masks as COCO RLE)."""
    seg = proposals.segments
    height, width = seg.image_size
    rles = encode_rle(seg.masks)
    boxes = seg.boxes.detach().cpu().float().tolist()
    ious = seg.predicted_iou.detach().cpu().float().tolist()
    stabilities = seg.stability_score.detach().cpu().float().tolist()
    points = seg.point_coords.detach().cpu().float().tolist()
    crops = seg.crop_boxes.detach().cpu().float().tolist()
    return {
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "image_size": {"height": height, "width": width},
        "generated": proposals.generated,
        "filters": [
            {"name": s.name, "params": s.params, "before": s.before, "removed": s.removed}
            for s in proposals.filter_stats
        ],
        "segments": [
            {
                "segmentation": rles[i],
                "box_xyxy": boxes[i],
                "predicted_iou": ious[i],
                "stability_score": stabilities[i],
                "point_coords": points[i],
                "crop_box": crops[i],
            }
            for i in range(len(seg))
        ],
    }


def proposals_from_record(record: dict) -> Proposals:
    """Inverse of :func:`proposals_record`; tensors on CPU."""
    try:
        height, width = record["image_size"]["height"], record["image_size"]["width"]
        segments = record["segments"]
        masks = torch.from_numpy(decode_rle([s["segmentation"] for s in segments], height, width))
        if not segments:
            mask_set = MaskSet.empty(height, width)
        else:
            mask_set = MaskSet(
                masks=masks,
                boxes=torch.tensor([s["box_xyxy"] for s in segments], dtype=torch.float32),
                predicted_iou=torch.tensor([s["predicted_iou"] for s in segments], dtype=torch.float32),
                stability_score=torch.tensor([s["stability_score"] for s in segments], dtype=torch.float32),
                point_coords=torch.tensor([s["point_coords"] for s in segments], dtype=torch.float32),
                crop_boxes=torch.tensor([s["crop_box"] for s in segments], dtype=torch.float32),
            )
        stats = tuple(FilterStat(f["name"], f["params"], f["before"], f["removed"]) for f in record["filters"])
        return Proposals(segments=mask_set, filter_stats=stats, generated=int(record["generated"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"cached proposals are malformed ({e}); delete them to recompute") from e


def save_proposals(store: Store, key: str, proposals: Proposals, identity: dict) -> None:
    store.put_bytes(key, json.dumps(proposals_record(proposals, identity)).encode())


def load_proposals(store: Store, key: str) -> Proposals:
    return proposals_from_record(store.get_json(key))


def save_embeddings(store: Store, key: str, embeddings: torch.Tensor) -> None:
    """``(N, D)`` float embeddings -> safetensors bytes at ``key``."""
    store.put_bytes(key, save_safetensors({"embeddings": embeddings.detach().float().cpu().contiguous()}))


def load_embeddings(store: Store, key: str, device: torch.device) -> torch.Tensor:
    """``(N, D)`` float32 embeddings on ``device``."""
    try:
        tensors = load_safetensors(store.get_bytes(key))
        return tensors["embeddings"].to(device)
    except (KeyError, SafetensorError) as e:
        raise StoreError(f"cached embeddings {key!r} are malformed ({e}); delete them to recompute") from e
