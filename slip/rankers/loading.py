"""Turn a ranker spec string into a ready :class:`~slip.rankers.base.Ranker`.

A ranker spec is one of:

* ``tiny-random`` / ``tiny-random-siglip`` — a seeded, randomly initialised toy CLIP / SigLIP; used only when
  asked for by name;
* ``synth`` — the dual encoder bundled with this package (``slip/weights/synth-clip``);
* a directory — our own dual encoder (``config.json`` has ``"architecture": "slip-dual-encoder"``), a
  Hugging Face CLIP, SigLIP or SigLIP 2 directory (``model_type`` clip / siglip / siglip2), or an open_clip
  checkpoint (``open_clip_config.json`` + weights);
* a Hugging Face hub id (default ``openai/clip-vit-base-patch32``; ``google/siglip2-base-patch16-224`` ...), or an
  open_clip ``hf-hub:org/name`` id, looked up in ``<cache>/hf`` without touching the network; ``slip weights
  fetch <id>`` downloads it.

A ranker with its own calibrated pairwise score (SigLIP's sigmoid; open_clip models with a ``logit_bias``) has
``calibrated = True`` and a ``score(cosines)`` method: the pipeline ranks and thresholds on that score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slip import names
from slip.device import resolve_device, resolve_dtype
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError
from slip.rankers.base import Ranker
from slip.rankers.hf_clip import TINY_SPEC, HFClipRanker, build_tiny_clip, load_hf_clip
from slip.rankers.open_clip import is_open_clip_dir, open_clip_directory
from slip.rankers.siglip import MODEL_TYPES as SIGLIP_TYPES
from slip.rankers.siglip import TINY_SIGLIP, SiglipRanker, build_tiny_siglip, load_siglip
from slip.request import ModelRef
from slip.weights import HUB_ID

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
SYNTH_SPEC = names.SYNTH
DUAL_ENCODER_ARCH = "slip-dual-encoder"  # config.json "architecture" of our own dual encoder
BUILT = {TINY_SPEC: (build_tiny_clip, HFClipRanker), TINY_SIGLIP: (build_tiny_siglip, SiglipRanker)}  # seeded toys
BUNDLED = {SYNTH_SPEC: "synth-clip"}  # name -> its folder in the package (slip.weights.bundled_path)


@dataclass(frozen=True)
class RankerBundle:
    """A loaded ranker with what results must know about it."""

    ranker: Ranker  # eval mode, on its device
    ref: ModelRef  # spec, architecture, SHA-256 of the weights (and config, tokenizer) really loaded
    threshold: float | None  # calibrated "present" threshold (threshold.json beside it; None if none)


def load_ranker_bundle(
    spec: str = DEFAULT_CLIP,
    *,
    device: str | torch.device = "auto",
    dtype: str = "fp32",
    cache_dir: Path | None = None,
) -> RankerBundle:
    """Load the ranker ``spec`` (see the module docstring) with its calibrated threshold and weights digest.

    Raises ``WeightsNotFoundError`` (message names the fetch / build command) when the weights are not
    on disk, ``WeightsError`` for unreadable ones, ``ConfigError`` for a bad spec, device or dtype.
    """
    from slip.threshold import read_threshold
    from slip.weights import directory_sha256, tensors_sha256

    if not spec or not spec.strip():
        raise ConfigError(f"empty ranker spec: use a hub id such as {DEFAULT_CLIP}, a directory, synth "
                          f"or {TINY_SPEC}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec in BUILT:
        build, ranker_class = BUILT[spec]
        model, tokenizer = build()
        ref = ModelRef(spec=spec, arch=spec, sha256=tensors_sha256(model.state_dict()))
        return RankerBundle(ranker_class(model, tokenizer, spec=spec, device=dev, dtype=torch_dtype), ref, None)
    directory = _resolve_spec(spec, cache_dir)
    ranker, arch = _load_directory(directory, device=dev, dtype=torch_dtype, spec=spec)
    ranker.spec = spec
    arch = BUNDLED.get(spec, arch)
    ref = ModelRef(spec=spec, arch=arch, sha256=directory_sha256(directory, cache_dir=cache_dir))
    return RankerBundle(ranker, ref, read_threshold(directory, ranker_sha256=ref.sha256))


def load_ranker(
    spec: str = DEFAULT_CLIP,
    *,
    device: str | torch.device = "auto",
    dtype: str = "fp32",
    cache_dir: Path | None = None,
) -> Ranker:
    """A ready ranker (eval mode, on ``device``) for a spec string; see :func:`load_ranker_bundle`."""
    return load_ranker_bundle(spec, device=device, dtype=dtype, cache_dir=cache_dir).ranker


def _resolve_spec(spec: str, cache_dir: Path | None) -> Path:
    """The directory behind a non-tiny spec string."""
    from slip.weights import bundled_path, clip_path

    if spec in BUNDLED:
        return bundled_path(BUNDLED[spec])
    open_clip_dir = open_clip_directory(spec, cache_dir)
    if open_clip_dir is not None:
        return open_clip_dir
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(spec):
        return clip_path(spec, cache_dir)
    raise WeightsNotFoundError(
        f"ranker spec {spec!r} is neither an existing directory, a Hugging Face hub id (e.g. "
        f"{DEFAULT_CLIP}), an open_clip hf-hub:org/name id, {SYNTH_SPEC}, {TINY_SPEC} nor {TINY_SIGLIP}"
    )


def _read_config(directory: Path) -> dict:
    config = directory / "config.json"
    if not directory.is_dir() or not config.is_file():
        raise WeightsNotFoundError(
            f"no ranker in {directory}: expected a directory with config.json (a Hugging Face CLIP "
            f"directory or a {DUAL_ENCODER_ARCH} saved by `slip train-ranker`)"
        )
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {config}: it is not valid JSON ({str(e).splitlines()[0]}); "
                           f"fetch or save the ranker again") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{config} must hold a JSON object, not {type(data).__name__}")
    return data


def _load_directory(directory: Path, *, device: torch.device, dtype: torch.dtype, spec: str) -> tuple[Ranker, str]:
    """Dispatch on the directory's config: our dual encoder, a Hugging Face CLIP / SigLIP / SigLIP 2, or an
    open_clip checkpoint; the ranker and its architecture."""
    if is_open_clip_dir(directory):
        from slip.rankers.open_clip import load_open_clip

        return load_open_clip(directory, spec=spec, device=device, dtype=dtype), "open-clip"
    config = _read_config(directory)
    if config.get("architecture") == DUAL_ENCODER_ARCH:
        from slip.rankers.dual_encoder import load_dual_encoder  # written by the training code

        return load_dual_encoder(directory, device=device, dtype=dtype), DUAL_ENCODER_ARCH
    if config.get("model_type") == "clip" or "CLIPModel" in config.get("architectures", ()):
        return load_hf_clip(directory, spec=spec, device=device, dtype=dtype), "hf-clip"
    if config.get("model_type") in SIGLIP_TYPES:
        return load_siglip(directory, spec=spec, device=device, dtype=dtype), f"hf-{config['model_type']}"
    raise ConfigError(
        f"{directory / 'config.json'} describes neither a Hugging Face CLIP / SigLIP / SigLIP 2 (model_type clip, "
        f"siglip, siglip2) nor a {DUAL_ENCODER_ARCH}; this ranker format is not supported"
    )
