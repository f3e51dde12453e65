"""Where model weights live on disk, and how they get there.

Layout of the weights cache (``$SLIP_CACHE``, default ``~/.cache/slip``; callers at the edge read the
env var and pass ``cache_dir`` inward, ``None`` meaning the default):

* ``<cache>/sam/sam_vit_{h,l,b}_*.pth`` — official SAM checkpoints, fetched by ``slip weights fetch
  vit_b`` (``fetch_sam``) and verified against their published SHA-256;
* ``<cache>/hf/`` — a Hugging Face hub cache holding model snapshots (CLIP, SigLIP, open_clip, SAM 2 / 2.1,
  SAM 3 and its tracker, EdgeTAM), fetched by ``slip weights fetch <hub-id>`` (``fetch_clip``); the engines'
  short names (``sam2.1-hiera-large``, ``sam3``, ``sam3-tracker``, ``edgetam`` ...) are aliases of their hub ids
  (:data:`HUB_ALIASES`), and gated repos (SAM 3) say where to accept the licence and that ``HF_TOKEN`` must be
  set (:func:`gated_hint`).

Models bundled with the package (trained on the synthetic world) live in ``slip/weights/<name>/``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from slip import names
from slip.errors import ChecksumError, ConfigError, WeightsError, WeightsNotFoundError, first_line

CACHE_ENV = "SLIP_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/slip")
BUNDLED_DIR = Path(__file__).parent / "weights"
CHUNK_BYTES = 1 << 20  # read/hash block size
TIMEOUT_S = 30.0  # socket timeout of a download, seconds


@dataclass(frozen=True)
class Checkpoint:
    """A downloadable checkpoint file with its published checksum."""

    filename: str  # file name inside <cache>/sam/
    url: str  # direct download URL
    sha256: str  # lowercase hex SHA-256 of the whole file
    size: int | None = None  # bytes, when published; for messages only


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# SHA-256 values as published by many independent mirrors of Meta's files; the hex in the file name is
# NOT the SHA-256 prefix (it is the start of the MD5).
OFFICIAL_SAM: Mapping[str, Checkpoint] = {
    "vit_h": Checkpoint(
        "sam_vit_h_4b8939.pth",
        _SAM_URL + "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
    ),
    "vit_l": Checkpoint(
        "sam_vit_l_0b3195.pth",
        _SAM_URL + "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
    ),
    "vit_b": Checkpoint(
        "sam_vit_b_01ec64.pth",
        _SAM_URL + "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
}

# bundled model name -> the command that builds it
BUNDLE_COMMANDS: Mapping[str, str] = {
    "synth-sam": "slip train-sam --bundle",
    "synth-clip": "slip train-ranker --bundle",
}


# --- cache directory ----------------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: Path | str | None) -> Path:
    """``cache_dir`` as an absolute path; ``None`` -> ``~/.cache/slip``."""
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser().absolute()


def sha256_file(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


# --- digests of loaded weights ----------------------------------------------------------------------------

OPEN_CLIP_CONFIG = "open_clip_config.json"  # an open_clip checkpoint's model config, beside its weights
DIGEST_SUFFIX = ".sha256.json"  # <file>.sha256.json beside a weights file: {"size", "inode", "mtime_ns", "ctime_ns", "sha256"}
NOT_WEIGHTS = frozenset({  # files beside weights that are read as recommendations or are only for people
    "generator.json", "filters.json", "threshold.json", "curve.json", "curve.png", "README.md", ".gitattributes",
})


def cached_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """SHA-256 of a weights file, hashed once per version of the file.

    The digest is kept beside the file (``<file>.sha256.json``, keyed by its size, inode, mtime and ctime, so
    a replaced file is hashed again, even one copied in with its old modification time) or, where that
    folder is read-only, in ``<cache>/digests/``. A 2.5 GB vit_h is hashed on its first load only.
    """
    path = Path(path).resolve()
    stat = path.stat()
    version = {"size": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    records = _digest_records(path, cache_dir)
    for record in records:
        known = _read_digest(record)
        if known is not None and {k: known.get(k) for k in version} == version:
            return known["sha256"]
    sha = sha256_file(path)
    for record in records:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({**version, "sha256": sha, "file": str(path)}))
            break
        except OSError:
            continue  # read-only folder: try the next place
    return sha


def directory_sha256(folder: Path, *, cache_dir: Path | None = None) -> str:
    """One SHA-256 for a checkpoint directory: the digest of ``{file name: file SHA-256}`` over its
    top-level files, recommendation files and digest records left out (they are read separately)."""
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and p.name not in NOT_WEIGHTS and not p.name.endswith(DIGEST_SUFFIX))
    if not files:
        raise WeightsNotFoundError(f"no weight files in {folder}")
    table = {p.name: cached_sha256(p, cache_dir=cache_dir) for p in files}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def tensors_sha256(state: Mapping[str, "object"]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in name order (models built in memory)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest_records(path: Path, cache_dir: Path | None) -> list[Path]:
    """Where a file's digest record may live: beside it, then in the weights cache."""
    key = hashlib.sha256(str(path).encode()).hexdigest()[:32]
    return [path.with_name(path.name + DIGEST_SUFFIX), resolve_cache_dir(cache_dir) / "digests" / f"{key}.json"]


def _read_digest(record: Path) -> dict | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None


# --- official SAM checkpoints ---------------------------------------------------------------------------


def _sam_entry(model_type: str, sources: Mapping[str, Checkpoint]) -> Checkpoint:
    if model_type not in sources:
        raise ConfigError(f"unknown SAM model type {model_type!r}: use one of {', '.join(sources)}")
    return sources[model_type]


def sam_checkpoint(
    model_type: str, cache_dir: Path | None, *, sources: Mapping[str, Checkpoint] = OFFICIAL_SAM
) -> Path:
    """``<cache>/sam/<filename>`` of an official SAM checkpoint, or ``WeightsNotFoundError`` saying how
    to get it. The file is not re-hashed here (that is ``fetch_sam``'s job)."""
    entry = _sam_entry(model_type, sources)
    cache = resolve_cache_dir(cache_dir)
    path = cache / "sam" / entry.filename
    if path.is_file():
        return path
    raise WeightsNotFoundError(
        f"SAM checkpoint {path} not found (weights cache {cache}, set by the env var {CACHE_ENV}); "
        f"download it with `slip weights fetch {model_type}`, or fetch {entry.url} by hand and put it "
        f"at {path}"
    )


def fetch_sam(
    model_type: str,
    cache_dir: Path | None,
    *,
    progress: bool = True,
    sources: Mapping[str, Checkpoint] = OFFICIAL_SAM,
) -> Path:
    """Download an official SAM checkpoint into ``<cache>/sam/`` and verify its SHA-256.

    A file already there with the right checksum is kept (no network). The download streams to a
    temporary file in the same directory, which is renamed into place only after verification.
    """
    entry = _sam_entry(model_type, sources)
    target = resolve_cache_dir(cache_dir) / "sam" / entry.filename
    if target.is_file() and sha256_file(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{entry.filename}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(entry.url, out, progress=progress, label=entry.filename)
        if digest != entry.sha256:
            raise ChecksumError(
                f"download of {entry.url} has SHA-256 {digest}, expected {entry.sha256}; the partial "
                f"file was deleted, retry `slip weights fetch {model_type}`"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _download(url: str, out, *, progress: bool, label: str) -> str:
    """Stream ``url`` into the binary file ``out``; returns the hex SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    # a fresh opener per call honours the proxy env vars as they are now
    opener = urllib.request.build_opener()
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress_bar(total, label, enabled=progress) as bar:
                while block := response.read(CHUNK_BYTES):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except urllib.error.HTTPError as e:
        raise WeightsError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise WeightsError(f"cannot download {url}: {e.reason} (no network?)") from e
    except (OSError, http.client.HTTPException) as e:
        raise WeightsError(f"download of {url} failed: {e}") from e
    return digest.hexdigest()


def _progress_bar(total: int | None, label: str, *, enabled: bool):
    from slip.bars import progress_bar

    return progress_bar(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, enabled=enabled,
                        file=sys.stderr)


# --- Hugging Face CLIP snapshots ------------------------------------------------------------------------

# files of a model repo that transformers / open_clip need (skips TF / Flax / duplicate .bin weights)
HF_PATTERNS = ("*.json", "*.txt", "*.safetensors", "*.model")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # org/name of a Hugging Face repo
OPEN_CLIP_PREFIX = "hf-hub:"  # open_clip's spelling of a hub id: hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K

# short names of the engines' models -> their Hugging Face hub ids
HUB_ALIASES: Mapping[str, str] = {
    **{f"sam{v}-hiera-{size}": f"facebook/sam{v}-hiera-{size}"
       for v in ("2", "2.1") for size in ("tiny", "small", "base-plus", "large")},
    names.SAM3_SHORT: names.HUB_SAM3,
    names.SAM3_TRACKER_SHORT: names.HUB_SAM3,  # the SAM 3 tracker as a proposer lives in SAM 3's checkpoint
    names.EDGETAM_SHORT: names.HUB_EDGETAM,  # EdgeTAM in transformers' format
    "siglip": "google/siglip-base-patch16-224",
    "siglip2": "google/siglip2-base-patch16-224",
}
# gated repos: where to accept the licence (downloads need HF_TOKEN of an account that accepted it)
GATED: Mapping[str, str] = {names.HUB_SAM3: f"https://huggingface.co/{names.HUB_SAM3}"}


def hub_id(name: str) -> str:
    """The Hugging Face hub id of a fetchable name: an alias, an ``hf-hub:`` open_clip id, or the id itself."""
    name = name[len(OPEN_CLIP_PREFIX):] if name.startswith(OPEN_CLIP_PREFIX) else name
    return HUB_ALIASES.get(name, name)


def gated_hint(repo: str) -> str:
    """For a gated repo: where to accept its licence and that HF_TOKEN must be set; "" otherwise."""
    page = GATED.get(repo)
    if page is None:
        return ""
    return (f"; {repo} is gated: accept its licence at {page} (access is granted per account, often after a "
            f"review), then set HF_TOKEN to a token of that account and run `slip weights fetch {repo}`")


def hf_cache(cache_dir: Path | None) -> Path:
    """The Hugging Face hub cache inside the weights cache: ``<cache>/hf``."""
    return resolve_cache_dir(cache_dir) / "hf"


def fetch_clip(hub_id: str, cache_dir: Path | None, *, endpoint: str | None = None) -> Path:
    """Download the snapshot of ``hub_id`` into ``<cache>/hf``; returns its directory.

    ``endpoint`` overrides the hub URL (a mirror). Falls back to ``pytorch_model.bin`` when the repo
    has no ``.safetensors`` weights.
    """
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(
            hub_id, cache_dir=hf_cache(cache_dir), allow_patterns=list(HF_PATTERNS), endpoint=endpoint
        ))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(
                hub_id, cache_dir=hf_cache(cache_dir), allow_patterns=["pytorch_model.bin"],
                endpoint=endpoint,
            ))
    except Exception as e:  # the hub raises httpx, OSError and its own errors; all mean "not fetched"
        hint = gated_hint(hub_id) or " (no network, or a wrong id?)"
        raise WeightsError(f"cannot download {hub_id!r} from the Hugging Face hub: {first_line(e)}{hint}") from e
    return path


def clip_path(hub_id: str, cache_dir: Path | None, *, what: str = "CLIP model") -> Path:
    """The already-downloaded snapshot of ``hub_id`` in ``<cache>/hf`` (no network), or
    ``WeightsNotFoundError`` naming the fetch command. ``what`` names the kind of model in the message."""
    from huggingface_hub import snapshot_download

    cache = hf_cache(cache_dir)
    try:
        return Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, or HFValidationError for a malformed id
        raise WeightsNotFoundError(
            f"{what} {hub_id!r} is not in the Hugging Face cache {cache} (weights cache set by the "
            f"env var {CACHE_ENV}); download it with `slip weights fetch {hub_id}`{gated_hint(hub_id)}"
        ) from e


def hf_config(directory: Path) -> dict:
    """A Hugging Face directory's ``config.json`` ({} when it is missing, unreadable or not an object)."""
    try:
        data = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def holds_ranker(directory: Path) -> bool:
    """Whether ``directory`` has the file a ranker loads from (:mod:`slip.rankers.loading`): ``config.json`` (a
    Hugging Face CLIP / SigLIP or our dual encoder) or :data:`OPEN_CLIP_CONFIG`. A light check, for producers;
    the loader says what is wrong inside."""
    return any((Path(directory) / name).is_file() for name in ("config.json", OPEN_CLIP_CONFIG))


def model_type(directory: Path) -> str | None:
    """The ``model_type`` of a Hugging Face directory's ``config.json`` (None when there is none)."""
    return hf_config(directory).get("model_type")


# --- bundled models -------------------------------------------------------------------------------------


def bundled_path(name: str, *, root: Path = BUNDLED_DIR) -> Path:
    """``slip/weights/<name>`` (e.g. ``synth-sam``, ``synth-clip``), or ``WeightsNotFoundError``
    naming the command that builds it."""
    path = root / name
    if path.is_dir() and any(path.iterdir()):
        return path
    command = BUNDLE_COMMANDS.get(name)
    how = f"build it with `{command}`" if command else f"known bundles: {', '.join(BUNDLE_COMMANDS)}"
    raise WeightsNotFoundError(
        f"the bundled synthetic-world model {name!r} is not built yet (expected in {path}); {how}"
    )
