"""The object store: where inputs, proposals, results and job ledgers live (never in Redis).

``SLIP_STORE`` is a local directory (default ``./slip-store``) or any fsspec URL (``s3://bucket/prefix``,
``gs://...``, ``memory://...``); :class:`Store` maps slash-separated keys under that root. S3 needs the
``s3`` extra (``pip install 'slip-queue[s3]'``); credentials, region and ``AWS_ENDPOINT_URL`` (MinIO, R2,
Ceph, ...) come from the usual AWS variables, which botocore reads itself.

The key layout is in :mod:`jobs.keys` (its helpers are importable from here too).

Writes are atomic: a local file is written under ``.tmp/`` (named after its writer's host and pid) and
renamed into place with ``os.replace`` (one filesystem); a writer killed in between leaves its temporary,
which :meth:`Store.sweep_temporaries` removes once that process is gone (the workers' reaper calls it on
every beat); other non-object filesystems write a temporary key there and ``mv`` it; object stores
(S3, GCS, Azure, memory) publish a whole object in one PUT, with a ``Content-Type`` from the key's
extension. Keys are validated: no ``..``, no absolute paths, no backslashes, no empty segments, only
``[A-Za-z0-9._-]`` and never a leading dot.

Failures: every backend error (OSError, botocore, aiohttp, timeouts) is retried inside the store with
exponential back-off (by default about 40 s in all, enough to ride out a short outage) and then raised as
one-line :class:`jobs.errors.StoreError` naming the store, the key, the action and the attempts. Errors
that waiting cannot fix (access denied, missing bucket, bad request) are raised at once; a missing key
on read is :class:`jobs.errors.ObjectNotFoundError` at once.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import mimetypes
import os
import random
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, TypeVar

import fsspec

from jobs.backend_errors import backend_errors, is_permanent, one_line
from jobs.errors import ObjectNotFoundError, StoreError
from jobs.keys import (  # noqa: F401  (re-exported: callers import key helpers with the store)
    IMAGE_EXTENSIONS,
    RESULT_FILE,
    input_key,
    job_prefix,
    proposals_prefix,
    result_prefix,
    sha256_bytes,
    validate_key,
)
from jobs.processes import alive
from slip.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

OBJECT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "memory"}  # whole-object PUT is atomic
S3_PROTOCOLS = {"s3", "s3a"}
TEMP_DIR = ".tmp"  # local and move-based stores: temporaries, beside the keys, never listed
# s3fs options: the store is the one retry layer (botocore retries nothing underneath), no listings cache
# (other processes write the same store) and an S3FileSystem of its own per Store (own client, own counts)
S3_OPTIONS = {
    "use_listings_cache": False,
    "skip_instance_cache": True,
    "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}},
}
_MISSING = (FileNotFoundError, NotADirectoryError)  # a read of a key that is not there


def content_type(key: str) -> str:
    """MIME type of ``key`` by its extension (``.json`` application/json, ``.png`` image/png, ...);
    ``application/octet-stream`` for anything unknown (``.safetensors``)."""
    return mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"


# --- the store ----------------------------------------------------------------------------------------------


class Store:
    """Bytes and JSON objects under the root URL ``url`` (a directory or an fsspec URL).

    Keyword options: ``retries`` (retries of a failed backend call after the first attempt),
    ``backoff_s`` (first pause; doubles after each failure, up to ``max_backoff_s``; each pause is
    shortened by up to 20 % at random so that workers do not retry in step), ``storage_options`` (extra
    fsspec options for the backend, e.g. ``{"endpoint_url": ...}``; for S3 they extend :data:`S3_OPTIONS`).
    The defaults retry 8 times over about 40 s.
    """

    def __init__(
        self,
        url: str,
        *,
        retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if retries < 0 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ConfigError(f"Store: need retries >= 0 and 0 <= backoff_s <= max_backoff_s, got "
                              f"{retries}, {backoff_s}, {max_backoff_s}")
        self.url = url
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.fs, root = _open_filesystem(url, storage_options or {})
        self.root = root.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        self.local = self.protocol in ("file", "local")
        self.objects = self.protocol in OBJECT_PROTOCOLS  # whole-object PUTs: no temporaries, no renames
        self._errors = (OSError,) if self.local else backend_errors()
        self._temp_root = f"{self.root}/{TEMP_DIR}"
        if self.local:
            self._call("create the root folder", self.root, lambda: os.makedirs(self.root, exist_ok=True))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def retry_budget_s(self) -> float:
        """Longest total pause of one call's retries, in seconds (before the jitter)."""
        return sum(min(self.backoff_s * 2**i, self.max_backoff_s) for i in range(self.retries))

    def path(self, key: str) -> str:
        """Full path of ``key`` on the underlying filesystem (a local path for a directory store)."""
        return f"{self.root}/{validate_key(key)}"

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key`` (a folder-like prefix is not an object); one HEAD on S3."""
        path = self.path(key)
        return self._call("check", key, lambda: self._is_object(path))

    def get_bytes(self, key: str) -> bytes:
        """The object at ``key``; ObjectNotFoundError at once when there is none."""
        path = self.path(key)
        return self._call("read", key, lambda: self._read(path, key))

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"object {key!r} in store {self.url} is not valid JSON: {e}") from e

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of every object under ``prefix`` (recursive); temporary files left out."""
        base = self.path(prefix) if prefix else self.root
        found = self._call("list", prefix or "/", lambda: self._find(base))
        keys = []
        for full in found:
            rel = full[len(self.root) + 1 :] if full.startswith(self.root + "/") else None
            if rel and not any(part.startswith(".") for part in rel.split("/")):
                keys.append(rel)
        return sorted(keys)

    def children(self, prefix: str) -> list[str]:
        """Sorted names one level under ``prefix`` (folders and objects; one LIST page per 1,000 on S3)."""
        base = self.path(prefix)
        found = self._call("list", prefix, lambda: self._ls(base))
        return sorted(name for name in (p.rstrip("/").rsplit("/", 1)[-1] for p in found) if not name.startswith("."))

    # --- writes -----------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` at ``key`` atomically (readers see the old object or the new, never half)."""
        path = self.path(key)
        if self.local:
            self._call("write", key, lambda: self._put_local(path, data))
        else:
            self._call("write", key, lambda: self._put_remote(path, data, key))
        return key

    def put_json(self, key: str, value: Any) -> str:
        return self.put_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def put_many(self, files: Mapping[str, bytes]) -> list[str]:
        """Publish several objects with one durability barrier; the last key of ``files`` becomes visible
        last (use it as the commit marker). Local: temporaries, one filesystem sync, renames in order;
        object stores: one PUT each, all but the last concurrently, then the last. Returns the keys."""
        paths = {key: self.path(key) for key in files}  # every key validated before anything is written
        if not paths:
            return []
        *_, last = paths
        if self.local:
            self._call("write", last, lambda: self._put_many_local([(paths[k], files[k]) for k in paths]))
        else:
            self._put_many_remote({k: (paths[k], files[k]) for k in paths}, last)
        return list(paths)

    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""
        path = self.path(key)
        self._call("delete", key, lambda: self._remove(path))

    def sweep_temporaries(self, older_than_s: float) -> int:
        """Delete the temporary files of writers that are gone: a process of this host that no longer runs,
        or any file older than ``older_than_s`` seconds (a writer on another host); a live writer's file is
        never touched. Returns how many were removed. Lists ``.tmp/`` only, never the whole store; object
        stores have no temporaries and are not touched at all."""
        if self.objects:
            return 0
        return self._call("sweep temporaries in", TEMP_DIR, lambda: self._sweep(older_than_s))

    # --- retries ----------------------------------------------------------------------------------

    def _call(self, action: str, key: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with exponential back-off while it raises a backend error; StoreError when
        the error persists past ``retries`` or is one that waiting cannot fix."""
        start, pause = time.monotonic(), self.backoff_s
        for attempt in range(1, self.retries + 2):
            try:
                return fn()
            except self._errors as e:
                if is_permanent(e) or attempt > self.retries:
                    raise StoreError(self._message(action, key, e, attempt, time.monotonic() - start)) from e
                wait = min(pause, self.max_backoff_s) * (1 - 0.2 * random.random())
                log.warning("store %s: cannot %s %r (attempt %d of %d: %s); retrying in %.2f s",
                            self.url, action, key, attempt, self.retries + 1, one_line(e, 160), wait)
                time.sleep(wait)
                pause *= 2
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _message(self, action: str, key: str, error: BaseException, attempts: int, elapsed_s: float) -> str:
        tries = "1 attempt, not retried" if attempts == 1 else f"{attempts} attempts over {elapsed_s:.1f} s"
        return (f"store {self.url}: cannot {action} {key!r} ({tries}): {one_line(error)}; "
                f"{self._hint(error)}")

    def _hint(self, error: BaseException) -> str:
        """What to do about ``error``, in a few words."""
        s3 = self.protocol in S3_PROTOCOLS
        if isinstance(error, PermissionError) or type(error).__name__.endswith("CredentialsError"):
            return ("check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and the "
                    "bucket policy" if s3 else f"check the permissions of {self.root}")
        if isinstance(error, FileNotFoundError):
            return "the bucket or folder does not exist: create it or fix SLIP_STORE"
        if isinstance(error, OSError) and error.errno == errno.EXDEV:
            return f"keep the whole store {self.root} on one filesystem"
        if is_permanent(error):
            return "the request was refused: check SLIP_STORE and the key"
        if s3:
            return "is the S3 endpoint reachable? (AWS_ENDPOINT_URL for MinIO/R2/..., AWS_DEFAULT_REGION)"
        return "is the store reachable and writable?"

    # --- backend operations (one attempt each) ----------------------------------------------------

    def _is_object(self, path: str) -> bool:
        try:
            if self.protocol in S3_PROTOCOLS:  # HEAD only: s3fs's info() would also LIST on a miss
                bucket, key, _ = self.fs.split_path(path)
                self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                return True
            return self.fs.info(path)["type"] == "file"
        except _MISSING:
            return False

    def _read(self, path: str, key: str) -> bytes:
        options = {"max_concurrency": 1} if self.protocol in S3_PROTOCOLS else {}  # one GET, no HEAD first
        try:
            return self.fs.cat_file(path, **options)
        except _MISSING as e:
            raise ObjectNotFoundError(f"no object {key!r} in store {self.url}") from e

    def _ls(self, base: str) -> list[str]:
        try:
            return self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []

    def _find(self, base: str) -> list[str]:
        try:
            return self.fs.find(base)
        except FileNotFoundError:
            return []

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _put_remote(self, path: str, data: bytes, key: str) -> None:
        if self.objects:
            self.fs.pipe_file(path, data, **self._put_options(key))
        else:
            self._put_via_move(path, data)

    def _put_options(self, key: str) -> dict[str, str]:
        """Backend-specific PUT options: the Content-Type by the key's extension."""
        if self.protocol in S3_PROTOCOLS:
            return {"ContentType": content_type(key)}
        if self.protocol in ("gs", "gcs"):
            return {"content_type": content_type(key)}
        return {}

    def _put_many_remote(self, files: dict[str, tuple[str, bytes]], last: str) -> None:
        """All but ``last`` concurrently (each retried on its own), then ``last``."""
        first = [k for k in files if k != last]
        if first:
            with ThreadPoolExecutor(max_workers=min(8, len(first)), thread_name_prefix="store-put") as pool:
                done = [pool.submit(self._call, "write", k, functools.partial(self._put_remote, *files[k], k))
                        for k in first]
                for future in done:
                    future.result()  # the first error, if any; ``last`` is then never written
        self._call("write", last, lambda: self._put_remote(*files[last], last))

    def _sweep(self, older_than_s: float) -> int:
        try:
            entries = self.fs.ls(self._temp_root, detail=True)
        except FileNotFoundError:
            return 0
        now, removed = time.time(), 0
        for info in entries:
            mtime = info.get("mtime") or info.get("created") or now
            mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
            if info.get("type") == "file" and (_writer_gone(info["name"]) or now - mtime > older_than_s):
                self._remove(info["name"])
                removed += 1
        return removed

    # --- local and move-based writes --------------------------------------------------------------

    def _temp_path(self) -> str:
        return f"{self._temp_root}/.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex}"

    def _write_temp(self, data: bytes, *, sync: bool) -> str:
        """A new local temporary file holding ``data`` (fsync'ed when ``sync``); its path."""
        os.makedirs(self._temp_root, exist_ok=True)
        tmp = self._temp_path()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def _put_local(self, path: str, data: bytes) -> None:
        tmp = self._write_temp(data, sync=True)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp, path)
        finally:
            _unlink(tmp)

    def _put_many_local(self, files: list[tuple[str, bytes]]) -> None:
        temps: list[str] = []
        try:
            for _, data in files:
                temps.append(self._write_temp(data, sync=False))
            sync_filesystem(self._temp_root)  # the one durability barrier
            for tmp, (path, _) in zip(temps, files):  # in order: the commit marker last
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.replace(tmp, path)
        finally:
            for tmp in temps:
                _unlink(tmp)

    def _put_via_move(self, path: str, data: bytes) -> None:
        tmp = self._temp_path()
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            self._remove(tmp)
            raise


def _open_filesystem(url: str, options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) for ``url``; StoreError naming the missing package or the bad URL."""
    if url.split("://", 1)[0] in S3_PROTOCOLS:
        options = {**S3_OPTIONS, **options}
    try:
        return fsspec.url_to_fs(url, **options)
    except ImportError as e:
        raise StoreError(f"cannot open store {url!r}: {e} (for s3:// install the s3 extra: "
                         f"pip install 'slip-queue[s3]')") from e
    except (ValueError, TypeError) as e:
        raise StoreError(f"cannot open store {url!r}: {e}") from e


_HOST = socket.gethostname().replace("-", "_")  # temporaries are named .tmp-<host>-<pid>-<random>


def _writer_gone(path: str) -> bool:
    """Whether the temporary at ``path`` was written by a process of this host that no longer runs."""
    parts = path.rsplit("/", 1)[-1].split("-")
    return len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit() and not alive(int(parts[2]))


def _unlink(path: str) -> None:
    """Remove a local file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """Linux ``syncfs(2)`` (flush one filesystem) from the C library, or None where there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def sync_filesystem(folder: str) -> None:
    """Make every file written so far on ``folder``'s filesystem durable: ``syncfs(2)`` on Linux, else
    ``sync(2)``."""
    syncfs = _syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs({folder}): {os.strerror(code)}")
    finally:
        os.close(fd)
