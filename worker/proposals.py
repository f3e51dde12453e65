"""The proposals cache: "segment once, query many".

SAM's filtered proposals depend on the image and the prompt-independent part of the resolved request
(SAM weights, dtype, generator options, filter chain: :meth:`ResolvedRequest.proposal_digest`); their
crop embeddings add the ranker weights and the crop settings (:meth:`ResolvedRequest.embedding_digest`).
Both are kept in the store::

    proposals/<image sha256>/<proposal digest>/segments.json
        {"format_version": 2, "identity": ResolvedRequest.proposal_identity(), "image_size": {"height", "width"},
         "generated": int, "filters": [{"name", "params", "before", "removed"}],
         "segments": [slip.outputs.segment_records: {"id", "segmentation" (COCO RLE), "bbox", "area",
                      "predicted_iou", "stability_score", "point_coords", "crop_box"}]}
    proposals/<image sha256>/<proposal digest>/embeddings/<embedding digest>.safetensors
        {"embeddings": (N, D) float32, unit norm, row i = segment i}

A new prompt on an image already segmented reads these two objects (not the image), encodes the prompt
once and multiplies: the stored segment records go into the result as they are, never re-encoded.

The ``sam3`` engine's prompt-independent state is SAM 3's vision features (the ViT backbone + FPN neck), kept
beside them when the job asked for it (``slip submit segment --engine sam3 --keep-features``)::

    proposals/<image sha256>/<proposal digest>/vision.safetensors
        slip.engines.sam3.Sam3Concepts.pack: the FPN levels the text path reads, fp16 (~56 MB per image for the
        real SAM 3, ~7 MB for tiny-random-sam3), and the image size

A new prompt then costs SAM 3's text encoder and decoders only (the image is not read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from jobs.errors import ObjectNotFoundError, StoreError
from jobs.store import Store, proposals_prefix, validate_key
from slip.outputs import filter_stat_record, maskset_from_records, segment_records
from slip.request import ResolvedRequest
from slip.types import MaskSet, Proposals

FORMAT_VERSION = 2
SEGMENTS_FILE = "segments.json"
FEATURES_FILE = "vision.safetensors"  # SAM 3's packed vision features (engine sam3, --keep-features)


@dataclass(frozen=True)
class CachedProposals:
    """Proposals as stored: segment records (masks still RLE) and what the filters did."""

    image_size: tuple[int, int]  # (H, W)
    generated: int  # segments SAM produced before filtering
    filters: list[dict]  # filter statistics records
    segments: list[dict]  # slip.outputs.segment_records

    def masks(self) -> MaskSet:
        """The segments decoded (only when masks are needed: instances to deduplicate, PNGs to render)."""
        return maskset_from_records(self.segments, *self.image_size)

    @staticmethod
    def of(proposals: Proposals) -> "CachedProposals":
        return CachedProposals(image_size=proposals.segments.image_size, generated=proposals.generated,
                               filters=[filter_stat_record(s) for s in proposals.filter_stats],
                               segments=segment_records(proposals.segments))


def proposals_key(image_sha: str, request: ResolvedRequest) -> str:
    return f"{proposals_prefix(image_sha, request.proposal_digest())}/{SEGMENTS_FILE}"


def embeddings_key(image_sha: str, request: ResolvedRequest) -> str:
    folder = proposals_prefix(image_sha, request.proposal_digest())
    return validate_key(f"{folder}/embeddings/{request.embedding_digest()}.safetensors")


def features_key(image_sha: str, request: ResolvedRequest) -> str:
    return validate_key(f"{proposals_prefix(image_sha, request.proposal_digest())}/{FEATURES_FILE}")


def load_features(store: Store, key: str) -> bytes | None:
    """The packed SAM 3 vision features at ``key``; None when there are none."""
    try:
        return store.get_bytes(key)
    except ObjectNotFoundError:
        return None


def save_proposals(store: Store, key: str, cached: CachedProposals, request: ResolvedRequest) -> None:
    height, width = cached.image_size
    document = {"format_version": FORMAT_VERSION, "identity": request.proposal_identity(),
                "image_size": {"height": height, "width": width}, "generated": cached.generated,
                "filters": cached.filters, "segments": cached.segments}
    store.put_bytes(key, json.dumps(document).encode())


def load_proposals(store: Store, key: str) -> CachedProposals | None:
    """The cached proposals at ``key``; None when there are none (or they are of an older format)."""
    try:
        doc = store.get_json(key)
    except ObjectNotFoundError:
        return None
    if doc.get("format_version") != FORMAT_VERSION:
        return None
    try:
        size = doc["image_size"]
        return CachedProposals(image_size=(int(size["height"]), int(size["width"])), generated=int(doc["generated"]),
                               filters=list(doc["filters"]), segments=list(doc["segments"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"cached proposals {key!r} are malformed ({e}); delete them to recompute") from e


def save_embeddings(store: Store, key: str, embeddings: torch.Tensor) -> None:
    """``(N, D)`` float embeddings -> safetensors bytes at ``key``."""
    store.put_bytes(key, save_safetensors({"embeddings": embeddings.detach().float().cpu().contiguous()}))


def load_embeddings(store: Store, key: str, device: torch.device) -> torch.Tensor | None:
    """``(N, D)`` float32 embeddings on ``device``; None when there are none."""
    try:
        data = store.get_bytes(key)
    except ObjectNotFoundError:
        return None
    try:
        return load_safetensors(data)["embeddings"].to(device)
    except (KeyError, SafetensorError) as e:
        raise StoreError(f"cached embeddings {key!r} are malformed ({e}); delete them to recompute") from e
