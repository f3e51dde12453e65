"""Object-store keys: their layout, and the one check every key passes.

Layout (every key relative to the store's root)::

    inputs/<sha256>.<ext>                          uploaded images, content-addressed (deduplicated)
    results/<image sha256>/<result digest>/        one folder per (image, resolved request, prompts)
        segments.json                              all segments (COCO RLE) + answers + the resolved request;
                                                   written last: its presence means the whole result is there
        mask_<i>.png, overlay_<i>.png              prompt i's answer and overlay (only with --render)
    proposals/<image sha256>/<proposal digest>/    prompt-independent SAM work ("segment once, query many")
        segments.json                              filtered proposals: COCO RLE, boxes, SAM scores, filter stats
        embeddings/<embedding digest>.safetensors  {"embeddings": (N, D) float32}, one per ranker + crop
    jobs/<job id>/...                              the job (jobs.ledger): manifest, unit pages, completion
                                                   records, summary; training outputs beside them
    .tmp/                                          local and move-based stores only: temporary files, named
                                                   .tmp-<host>-<pid>-<random> after their writer

The digests are :class:`slip.request.ResolvedRequest`'s (SHA-256 of canonical JSON naming the weights by
their own SHA-256). Keys are validated: no ``..``, no absolute paths, no backslashes, no empty segments,
only ``[A-Za-z0-9._-]`` and never a leading dot.
"""

from __future__ import annotations

import hashlib
import re

from jobs.errors import InvalidKeyError

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
MAX_KEY_CHARS = 1024
RESULT_FILE = "segments.json"  # commit marker of a result folder (written last)
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"}


def validate_key(key: str) -> str:
    """``key`` unchanged when it is a safe relative key; InvalidKeyError otherwise."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("empty object-store key")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidKeyError(f"object-store key of {len(key)} characters (limit {MAX_KEY_CHARS})")
    if "\\" in key:
        raise InvalidKeyError(f"object-store key {key!r} contains a backslash")
    if key.startswith("/") or re.match(r"[A-Za-z]:", key):
        raise InvalidKeyError(f"object-store key {key!r} is absolute; keys are relative to SLIP_STORE")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(f"object-store key {key!r} has an empty, '.' or '..' segment")
        if not _SEGMENT.fullmatch(part):
            raise InvalidKeyError(
                f"object-store key {key!r}: segment {part!r} must match [A-Za-z0-9_][A-Za-z0-9._-]*"
            )
    return key


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_key(sha: str, ext: str) -> str:
    """``inputs/<sha256>.<ext>``; ``ext`` lower-cased, without the dot."""
    ext = ext.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        ext = "bin"
    return validate_key(f"inputs/{sha}.{ext}")


def result_prefix(image_sha: str, request_digest: str) -> str:
    return validate_key(f"results/{image_sha}/{request_digest}")


def proposals_prefix(image_sha: str, proposal_digest: str) -> str:
    return validate_key(f"proposals/{image_sha}/{proposal_digest}")


def job_prefix(job_id: str) -> str:
    return validate_key(f"jobs/{job_id}")
