"""A job's results as JSON Lines or as one COCO annotation file.

COCO document (loads in ``pycocotools.coco.COCO``)::

    {"info": {"description", "job_id", "sam", "clip", "prompts", "date_created"},
     "images": [{"id": item index + 1, "file_name": source path, "width", "height", "slip_result_key"}],
     "categories": [{"id": prompt index + 1, "name": prompt, "supercategory": "prompt"}],
     "annotations": [{"id", "image_id", "category_id", "segmentation": COCO RLE {"size", "counts"},
                      "bbox": [x, y, w, h], "area", "iscrowd": 0, "score": similarity, "slip_segment"}]}

Only images that are done appear; each matched prompt gives one annotation (its chosen segment).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from worker.ledger import ItemState, JobStatus
from worker.store import ERROR_FILE, RESULT_FILE, Store


def _segments_doc(store: Store, item: ItemState) -> dict:
    return store.get_json(f"{item.result_key}/{RESULT_FILE}")


def item_record(store: Store, item: ItemState, prompts: tuple[str, ...]) -> dict:
    """One JSON Lines record: state, keys, and per prompt the chosen segment with bbox and score."""
    record = {
        "index": item.index,
        "name": item.name,
        "image_key": item.image_key,
        "state": item.state,
        "result_key": item.result_key,
    }
    if item.state == "failed":
        record |= {"reason": item.reason, "error": item.error, "permanent": item.permanent,
                   "error_key": f"{item.result_key}/{ERROR_FILE}"}
    elif item.state == "lost":
        record["reason"] = item.reason
    if item.state != "done":
        return record
    doc = _segments_doc(store, item)
    segments = doc["segments"]
    record["image_size"] = doc["image_size"]
    record["segments"] = len(segments)
    record["matches"] = []
    for i, match in enumerate(doc["matches"]):
        seg = segments[match["segment"]] if match["segment"] is not None else None
        record["matches"].append({
            "prompt": match["prompt"],
            "segment": match["segment"],
            "score": match["score"],
            "bbox": seg["bbox"] if seg else None,
            "area": seg["area"] if seg else None,
            "mask_key": f"{item.result_key}/mask_{i}.png",
            "overlay_key": f"{item.result_key}/overlay_{i}.png",
        })
    return record


def jsonl_records(store: Store, status: JobStatus) -> str:
    prompts = status.manifest.spec.prompts
    return "".join(json.dumps(item_record(store, item, prompts)) + "\n" for item in status.items)


def coco_document(store: Store, status: JobStatus) -> dict:
    """The whole job as a COCO results-with-annotations document (see the module docstring)."""
    spec = status.manifest.spec
    images, annotations = [], []
    for item in status.items:
        if item.state != "done":
            continue
        doc = _segments_doc(store, item)
        size = doc["image_size"]
        images.append({
            "id": item.index + 1,
            "file_name": item.name,
            "width": size["width"],
            "height": size["height"],
            "slip_result_key": item.result_key,
        })
        for p, match in enumerate(doc["matches"]):
            if match["segment"] is None:
                continue
            seg = doc["segments"][match["segment"]]
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": item.index + 1,
                "category_id": p + 1,
                "segmentation": seg["segmentation"],
                "bbox": seg["bbox"],
                "area": seg["area"],
                "iscrowd": 0,
                "score": match["score"],
                "slip_segment": match["segment"],
            })
    return {
        "info": {
            "description": "SLIP queue results",
            "job_id": status.manifest.job_id,
            "sam": spec.sam,
            "clip": spec.clip,
            "prompts": list(spec.prompts),
            "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "images": images,
        "categories": [{"id": p + 1, "name": prompt, "supercategory": "prompt"} for p, prompt in enumerate(spec.prompts)],
        "annotations": annotations,
    }
