"""The object store: where inputs, proposals, results and job ledgers live (never in Redis).

``SLIP_STORE`` is a local directory (default ``./slip-store``) or any fsspec URL (``s3://bucket/prefix``,
``gs://...``, ``memory://...``); :class:`Store` maps slash-separated keys under that root.

Layout (every key relative to the root)::

    inputs/<sha256>.<ext>                          uploaded images, content-addressed (deduplicated)
    results/<image sha256>/<request digest>/       one folder per (image, prompts, models, parameters)
        segments.json                              all segments as COCO RLE + matches (written last:
                                                   its presence means the whole result is there)
        mask_<i>.png, overlay_<i>.png              chosen mask and overlay of prompt i
        error.json                                 instead of the above when the image failed:
                                                   {"reason", "error", "permanent", "task_id", "time"}
    proposals/<image sha256>/<proposal digest>/    prompt-independent SAM work ("segment once, query many")
        segments.json                              filtered proposals: COCO RLE, boxes, SAM scores,
                                                   filter statistics, generator parameters
        embeddings/<embedding digest>.safetensors  {"embeddings": (N, D) float32}, one per ranker + crop
    jobs/<job id>/manifest.json                    the ledger: prompts, models, parameters, items
    jobs/<job id>/tasks/<task id>.json             one per enqueued task: its item indices, attempt, time

Digests are sha256 hex of canonical JSON (sorted keys, no blanks): the request digest covers prompts,
SAM spec, ranker spec and all output-changing parameters; the proposal digest covers the SAM spec,
generator parameters and filters; the embedding digest covers the ranker spec and crop settings.

Writes are atomic: a local file is written under a hidden temporary name beside its target and
renamed with ``os.replace``; other non-object filesystems write a temporary key and ``mv`` it; object
stores (S3, GCS, Azure, memory) publish a whole object in one PUT. Keys are validated: no ``..``, no
absolute paths, no backslashes, no empty segments, only ``[A-Za-z0-9._-]`` and never a leading dot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from typing import Any

import fsspec

from slip.errors import InvalidKeyError, ObjectNotFoundError, StoreError

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
MAX_KEY_CHARS = 1024
OBJECT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}  # whole-object PUT is atomic
RESULT_FILE = "segments.json"  # commit marker of a result folder (written last)
ERROR_FILE = "error.json"  # written instead when the image failed
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


def canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted keys, no blanks, UTF-8 kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


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


class Store:
    """Bytes and JSON objects under the root URL ``url`` (a directory or an fsspec URL)."""

    def __init__(self, url: str) -> None:
        try:
            self.fs, root = fsspec.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise StoreError(f"cannot open store {url!r}: {e}") from e
        self.url = url
        self.root = root.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        self.local = self.protocol in ("file", "local")
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, key: str) -> str:
        """Full path of ``key`` on the underlying filesystem (a local path for a directory store)."""
        return f"{self.root}/{validate_key(key)}"

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def get_bytes(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"no object {key!r} in store {self.url}") from e
        except OSError as e:
            raise StoreError(f"cannot read {key!r} from store {self.url}: {e}") from e

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"object {key!r} in store {self.url} is not valid JSON: {e}") from e

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every object under ``prefix`` (recursive); temporary files left out."""
        base = self.path(prefix) if prefix else self.root
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        keys = []
        for full in found:
            rel = full[len(self.root) + 1 :] if full.startswith(self.root + "/") else None
            if rel and not any(part.startswith(".") for part in rel.split("/")):
                keys.append(rel)
        return sorted(keys)

    # --- writes -----------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically (readers see the old object or the new, never half)."""
        path = self.path(key)
        try:
            if self.local:
                self._put_local(path, data)
            elif self.protocol in OBJECT_PROTOCOLS:
                self.fs.pipe_file(path, data)
            else:
                self._put_via_move(path, data)
        except OSError as e:
            raise StoreError(f"cannot write {key!r} to store {self.url}: {e}") from e
        return key

    def put_json(self, key: str, value: Any) -> str:
        return self.put_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        path = self.path(key)
        try:
            if self.fs.exists(path):
                self.fs.rm_file(path)
        except OSError as e:
            raise StoreError(f"cannot delete {key!r} from store {self.url}: {e}") from e

    def remove_stale_temporaries(self, older_than_s: float) -> int:
        """Delete temporary files a killed writer left behind (``.tmp-*`` older than ``older_than_s``
        seconds, so a live writer's file is never touched); returns how many were removed."""
        if not self.fs.exists(self.root):
            return 0
        now, removed = time.time(), 0
        for path, info in self.fs.find(self.root, detail=True).items():
            if not path.rsplit("/", 1)[-1].startswith(".tmp-"):
                continue
            mtime = info.get("mtime") or info.get("created") or now
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            if now - mtime > older_than_s:
                self.fs.rm_file(path)
                removed += 1
        return removed

    def _put_local(self, path: str, data: bytes) -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _put_via_move(self, path: str, data: bytes) -> None:
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)
            raise
