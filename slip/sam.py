"""SAM 1 specs and checkpoint loading (the architectures and their builder: :mod:`slip.sam_arch`).

A SAM spec string is one of:

* ``vit_h`` / ``vit_l`` / ``vit_b`` — the official checkpoint in the weights cache (``$SLIP_CACHE``);
* ``synth`` — the small SAM bundled with this package, trained on the synthetic world;
* a path to an official ``.pth`` state dict (architecture detected from its shapes, or read from a
  ``config.json`` beside it), or to a directory holding ``config.json`` + ``model.safetensors``;
* ``tiny-random`` — a seeded, randomly initialised toy SAM for tests and offline plumbing. Its masks
  mean nothing; it is used only when asked for by name.

A checkpoint may come with recommended :class:`slip.generator.MaskGenerator` options in a
``generator.json`` beside it (:func:`recommended_generator_params`), and a recommended annotation filter
chain in a ``filters.json`` beside it (:func:`recommended_filters`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from segment_anything.modeling import Sam

from slip import names
from slip.device import resolve_device
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError, first_line
from slip.request import GeneratorOptions, ModelRef
from slip.sam_arch import OFFICIAL_TYPES, SAM_ARCHS, TINY_SPEC, SamArch, build_sam, build_tiny_sam, detect_arch
from slip.sam_hf import load_hf_sam
from slip.weights import HUB_ID

SYNTH_SPEC = names.SYNTH
BUNDLED_DIR = Path(__file__).parent / "weights"
GENERATOR_FILE = "generator.json"  # recommended MaskGenerator options (a JSON object), beside a checkpoint
FILTERS_FILE = "filters.json"  # recommended filter chain, {"filters": "<chain>", "why": "<sentence>"}, beside it


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` (official format; tensors only, never arbitrary pickled objects) or
    ``.safetensors`` file; WeightsError in one line for a corrupt, truncated or unsafe file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # torch words it "Unsupported global" or "unsupported GLOBAL"
            raise WeightsError(f"cannot read SAM checkpoint {path}: it is corrupt or truncated (not a readable torch "
                               f"file); fetch it again") from e
        raise WeightsError(f"{path} is not a plain tensor checkpoint: it pickles other objects, which are never "
                           f"loaded (only tensors are); re-save it as a state dict") from e
    except Exception as e:  # torch.load and safetensors raise many types for a corrupt or truncated file
        raise WeightsError(f"cannot read SAM checkpoint {path}: it is corrupt or truncated "
                           f"({type(e).__name__}: {first_line(e, 300)}); fetch it again") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def save_sam(sam: Sam, path: Path, arch: SamArch) -> Path:
    """Save ``sam`` as an official-format ``.pth`` state dict, with ``config.json`` beside it
    unless ``arch`` is an official size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    if arch.name not in OFFICIAL_TYPES:
        (path.parent / "config.json").write_text(json.dumps(arch.to_json(), indent=2))
    return path


def _checkpoint_file(path: Path) -> Path:
    """The weights file of a checkpoint path (a file, or a directory holding one)."""
    if path.is_file():
        return path
    for name in ("model.safetensors", "sam.pth", "model.pth"):
        if (path / name).is_file():
            return path / name
    raise WeightsNotFoundError(
        f"no SAM weights in {path}: expected model.safetensors, sam.pth or model.pth there"
    )


def load_sam_checkpoint(path: Path) -> tuple[Sam, SamArch]:
    """Build and load a SAM from a checkpoint file or directory (official or our format)."""
    weights = _checkpoint_file(path)
    state = read_state_dict(weights)
    config = weights.parent / "config.json"
    if config.is_file() and "encoder_embed_dim" in (cfg := _read_json(config, what="SAM config")):
        arch = SamArch.from_json(cfg)
    else:
        arch = detect_arch(state)
    sam = build_sam(arch)
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{weights} does not fit SAM architecture {arch.name}: {first_line(e, 300)}") from e
    return sam, arch


@dataclass(frozen=True)
class SamBundle:
    """A loaded SAM with what results must know about it."""

    model: Sam  # eval mode, on its device, fp32 weights (reduced precision is autocast at run time)
    ref: ModelRef  # spec, architecture name, SHA-256 of the weights really loaded
    arch: SamArch  # hyper-parameters
    generator: Mapping[str, Any]  # recommended generator options (generator.json beside it; {} if none)
    filters: str | None  # recommended filter chain (filters.json beside it; None if none)


def load_sam_bundle(spec: str, *, device: str | torch.device = "auto", cache_dir: Path | None = None) -> SamBundle:
    """Load the SAM ``spec`` (see the module docstring) with its recommendations and weights digest."""
    from slip.weights import cached_sha256, directory_sha256, tensors_sha256

    dev = resolve_device(device)
    if spec == TINY_SPEC:
        sam = build_tiny_sam()
        ref = ModelRef(spec=spec, arch=TINY_SPEC, sha256=tensors_sha256(sam.state_dict()))
        return SamBundle(sam.to(dev).eval(), ref, SAM_ARCHS[TINY_SPEC], {}, None)
    path = _resolve_spec(spec, cache_dir)
    if _is_hf_sam(path):
        sam, arch = load_hf_sam(path)
        ref = ModelRef(spec=spec, arch=f"hf-sam-{arch.name}", sha256=directory_sha256(path, cache_dir=cache_dir))
    else:
        sam, arch = load_sam_checkpoint(path)
        weights = cached_sha256(_checkpoint_file(path), cache_dir=cache_dir)
        name = "synth-sam" if spec == SYNTH_SPEC else arch.name
        sha = weights if arch.name in OFFICIAL_TYPES else _combined(weights, arch.to_json())
        ref = ModelRef(spec=spec, arch=name, sha256=sha)
    return SamBundle(sam.to(dev).eval(), ref, arch, checkpoint_generator_params(path), checkpoint_filters(path))


def load_sam(spec: str, *, device: str | torch.device = "auto", cache_dir: Path | None = None) -> Sam:
    """A ready SAM (eval mode, on ``device``, fp32 weights) for a spec string; see the module docstring."""
    return load_sam_bundle(spec, device=device, cache_dir=cache_dir).model


def _combined(weights_sha: str, arch: dict) -> str:
    """One digest for weights whose architecture comes from a config.json beside them."""
    import hashlib

    return hashlib.sha256(json.dumps({"weights": weights_sha, "arch": arch}, sort_keys=True).encode()).hexdigest()


def _is_hf_sam(path: Path) -> bool:
    config = path / "config.json"
    return path.is_dir() and config.is_file() and _read_json(config, what="SAM config").get("model_type") == "sam"


def _resolve_spec(spec: str, cache_dir: Path | None) -> Path:
    """The checkpoint path behind a non-tiny spec string."""
    from slip.weights import bundled_path, clip_path, sam_checkpoint

    if spec in OFFICIAL_TYPES:
        return sam_checkpoint(spec, cache_dir)
    if spec == SYNTH_SPEC:
        return bundled_path("synth-sam")
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if HUB_ID.match(spec):
        return clip_path(spec, cache_dir, what="SAM model")
    raise WeightsNotFoundError(
        f"SAM spec {spec!r} is neither vit_h/vit_l/vit_b/synth/tiny-random, an existing path, nor a Hugging Face "
        f"SamModel id (e.g. facebook/sam-vit-base)"
    )


# --- recommendations beside a checkpoint ------------------------------------------------------------------


def _beside(checkpoint: Path, name: str) -> Path:
    """The file ``name`` beside a checkpoint: inside it when it is a directory, else in its folder."""
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / name


def _read_json(path: Path, *, what: str = "recommendation file"):
    """The parsed JSON of a file beside a checkpoint; ConfigError naming it when it does not parse."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path} is not valid JSON ({first_line(e, 300)}): fix or delete it") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_generator_params(checkpoint: Path) -> dict:
    """The generator options stored beside a checkpoint (file or directory), as written; ``{}`` if none."""
    path = _beside(checkpoint, GENERATOR_FILE)
    return _read_json(path) if path.is_file() else {}


def checkpoint_generator_params(checkpoint: Path) -> dict:
    """The checked generator.json beside a checkpoint (``{}`` if none)."""
    params = read_generator_params(checkpoint)
    GeneratorOptions().merged(params, source=str(_beside(checkpoint, GENERATOR_FILE)))  # ConfigError naming the file
    return params


def checkpoint_filters(checkpoint: Path) -> str | None:
    """The checked chain of the filters.json beside a checkpoint (None if none)."""
    from slip.filter_chain import parse_filters

    path = _beside(checkpoint, FILTERS_FILE)
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data.get("filters"), str) or set(data) - {"filters", "why"}:
        raise ConfigError(f'{path} must hold {{"filters": "<filter chain>", "why": "<reason>"}}, got {data!r}')
    try:
        parse_filters(data["filters"])
    except ConfigError as e:
        raise ConfigError(f"{path}: bad filter chain {data['filters']!r}: {e}") from e
    return data["filters"]


def recommended_generator_params(spec: str, *, cache_dir: Path | None = None) -> dict:
    """The generator options recommended for the SAM ``spec``: the ``generator.json`` beside its checkpoint,
    ``{}`` for ``tiny-random`` and checkpoints without one. ConfigError naming the file for a bad option.
    (:func:`slip.request.resolve` applies them; this only reads them.)"""
    return {} if spec == TINY_SPEC else checkpoint_generator_params(_resolve_spec(spec, cache_dir))


def recommended_filters(spec: str, *, cache_dir: Path | None = None) -> str | None:
    """The filter chain recommended for the SAM ``spec``: the ``filters`` entry of the ``filters.json`` beside
    its checkpoint (``{"filters": "<chain>", "why": "<one sentence>"}``); None for ``tiny-random`` and
    checkpoints without one. ConfigError naming the file when it is malformed or its chain does not parse."""
    return None if spec == TINY_SPEC else checkpoint_filters(_resolve_spec(spec, cache_dir))
