"""A segments.json v2 document built from masks and scores, for the review tests (a module of its own: every
test folder has a conftest, so `from conftest import ...` would find another folder's)."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from slip.outputs import encode_rle


def make_doc(masks: np.ndarray, scores: np.ndarray, prompts, *, threshold: float | None, digest: str) -> dict:
    """A segments.json v2 document: ``masks`` (N, H, W), ``scores`` (N, P); each prompt answered with its
    argmax segment when it passes ``threshold``."""
    n, h, w = masks.shape
    rles = encode_rle(masks)
    segments = [{"id": i, "segmentation": r, "bbox": [float(v) for v in mask_utils.toBbox(
                    {"size": r["size"], "counts": r["counts"].encode()})], "area": int(masks[i].sum()),
                 "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [0.0, 0.0], "crop_box": [0, 0, w, h],
                 "similarity": {p: float(scores[i, c]) for c, p in enumerate(prompts)}} for i, r in enumerate(rles)]
    matches = []
    for c, p in enumerate(prompts):
        best = int(np.argmax(scores[:, c]))
        pair = {"segment": best, "score": float(scores[best, c])}
        chosen = [pair] if threshold is None or pair["score"] >= threshold else []
        matches.append({"prompt": p, "threshold": threshold, "instances": chosen, "best": pair, "top_k": [pair]})
    return {"format_version": 2, "image_size": {"height": h, "width": w}, "prompts": list(prompts), "request": {},
            "request_digest": digest, "generated": n, "filters": [], "segments": segments, "matches": matches,
            "timings_s": {}}
