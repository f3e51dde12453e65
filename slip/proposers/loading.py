"""Turn a SAM spec into a loaded proposer model (SAM 1 or SAM 2 / 2.1) and its mask generator.

A SAM spec names a model that proposes every segment of an image:

* SAM 1: ``vit_h`` / ``vit_l`` / ``vit_b``, ``synth``, ``tiny-random``, an official ``.pth``, a Hugging Face
  ``SamModel`` directory or cached id (``facebook/sam-vit-base``) — :mod:`slip.sam`;
* SAM 2 / 2.1: a registered name (``sam2.1-hiera-tiny`` .. ``sam2.1-hiera-large``, ``sam2-hiera-*``: the
  Hugging Face snapshot ``facebook/<name>`` in the weights cache), a cached hub id
  (``facebook/sam2.1-hiera-large``), an official checkpoint file as facebookresearch/sam2 releases it
  (``sam2.1_hiera_large.pt``, architecture from its shapes), a Hugging Face ``Sam2Model`` directory, or
  ``tiny-random-sam2`` (seeded random weights, for tests, used only when named);
* EdgeTAM and the SAM 3 tracker (transformers models with SAM 2's prompt interface): ``edgetam`` /
  ``yonigozlan/EdgeTAM-hf`` and ``sam3-tracker`` (the tracker inside the gated ``facebook/sam3``), cached hub
  snapshots; a directory whose ``config.json`` ``model_type`` is ``edgetam`` / ``edgetam_video`` /
  ``sam3_tracker`` / ``sam3_tracker_video``; ``tiny-random-edgetam``, ``tiny-random-sam3-tracker`` —
  :mod:`slip.proposers.hf_trackers`.

A SAM 3 checkpoint (``sam3``, ``facebook/sam3``, a ``sam3`` / ``sam3_video`` directory) is refused here with one
line: SAM 3 answers text concepts, it is an engine (``--engine sam3`` / ``sam3-rank``); its tracker proposes as
``--sam sam3-tracker``. Digests: the SHA-256 of the weights really loaded (the file, or the directory's files;
the tensors for built-in models), as :class:`slip.request.ModelRef`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from slip.device import resolve_device
from slip.engines.sam3_model import is_sam3_spec
from slip.errors import ConfigError, WeightsNotFoundError
from slip.generator import MaskGenerator
from slip.proposers.hf_trackers import load_tracker
from slip.proposers.sam2_generator import SAM2_DEFAULTS, Sam2MaskGenerator
from slip.proposers.sam2_hf import is_hf_sam2_dir, load_hf_sam2
from slip.proposers.sam2_model import SAM2_ARCHS, TINY_SAM2, build_tiny_sam2, is_sam2_state, load_sam2_checkpoint
from slip.request import ModelRef
from slip.sam import checkpoint_filters, checkpoint_generator_params, load_sam_bundle
from slip.weights import HUB_ID

SAM2_FILE_SUFFIXES = (".pt",)  # official SAM 2 releases; SAM 1's are .pth
OFFICIAL_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"  # the 2.1 release files


@dataclass(frozen=True)
class ProposerModel:
    """A loaded proposer model (SAM 1, SAM 2, EdgeTAM, SAM 3 tracker) with what results must know about it."""

    family: str  # "sam" (SAM 1, segment_anything) | "sam2" (SAM 2 / 2.1, the sam2 package) | "edgetam" |
    #              "sam3-tracker" (transformers models, slip.proposers.hf_trackers)
    model: torch.nn.Module  # eval mode, on its device, fp32 weights (reduced precision is autocast at run time)
    ref: ModelRef  # spec, architecture name, SHA-256 of the weights really loaded
    generator: Mapping[str, Any]  # recommended generator options: the family's defaults < generator.json beside it
    filters: str | None  # recommended filter chain (filters.json beside it; None if none)

    def mask_generator(self, options: Mapping[str, Any], *, dtype: str = "fp32",
                       points_per_batch: int = 64) -> MaskGenerator:
        """The family's fast automatic mask generator with these (resolved) options."""
        return mask_generator_for(self.model, points_per_batch=points_per_batch, dtype=dtype, **options)


def mask_generator_for(model: torch.nn.Module, **options: Any) -> MaskGenerator:
    """:class:`slip.generator.MaskGenerator` for a SAM 1 model, :class:`Sam2MaskGenerator` for a SAM 2 one,
    :class:`slip.proposers.hf_tracker_generator.HfTrackerMaskGenerator` for an EdgeTAM / SAM 3 tracker."""
    from slip.proposers.hf_trackers import is_hf_tracker_model

    if is_hf_tracker_model(model):
        from slip.proposers.hf_tracker_generator import HfTrackerMaskGenerator

        return HfTrackerMaskGenerator(model, **options)
    from sam2.modeling.sam2_base import SAM2Base

    return (Sam2MaskGenerator if isinstance(model, SAM2Base) else MaskGenerator)(model, **options)


def load_proposer_model(spec: str, *, device: str | torch.device = "auto", cache_dir: Path | None = None
                        ) -> ProposerModel:
    """Load the SAM ``spec`` (see the module docstring) with its recommendations and weights digest.

    Raises ConfigError for a SAM 3 checkpoint or an unknown spec, WeightsNotFoundError (naming the file, the
    cache and the fetch command) for weights not on disk, WeightsError for unreadable ones.
    """
    from slip.weights import cached_sha256, directory_sha256, tensors_sha256

    if not spec or not spec.strip():
        raise ConfigError("empty SAM spec: use vit_b, sam2.1-hiera-tiny, a checkpoint path or a hub id")
    refuse_sam3(spec, cache_dir)
    dev = resolve_device(device)
    if spec == TINY_SAM2:
        model = build_tiny_sam2()
        ref = ModelRef(spec=spec, arch=TINY_SAM2, sha256=tensors_sha256(model.state_dict()))
        return ProposerModel("sam2", model.to(dev).eval(), ref, dict(SAM2_DEFAULTS), None)
    tracker = load_tracker(spec, cache_dir)
    if tracker is not None:  # EdgeTAM, SAM 3 tracker
        family, model, ref, directory = tracker
        recommended = {**SAM2_DEFAULTS, **(checkpoint_generator_params(directory) if directory else {})}
        filters = checkpoint_filters(directory) if directory else None
        return ProposerModel(family.name, model.to(dev).eval(), ref, recommended, filters)
    path = _sam2_path(spec, cache_dir)
    if path is None:  # SAM 1 (its loader reports unknown specs and missing weights)
        bundle = load_sam_bundle(spec, device=dev, cache_dir=cache_dir)
        return ProposerModel("sam", bundle.model, bundle.ref, dict(bundle.generator), bundle.filters)
    if path.is_dir() and is_hf_sam2_dir(path):
        model, arch = load_hf_sam2(path, spec=spec)
        ref = ModelRef(spec=spec, arch=f"hf-{arch.name}", sha256=directory_sha256(path, cache_dir=cache_dir))
    else:
        weights = _sam2_file(path)
        model, arch = load_sam2_checkpoint(weights)
        ref = ModelRef(spec=spec, arch=arch.name, sha256=cached_sha256(weights, cache_dir=cache_dir))
    recommended = {**SAM2_DEFAULTS, **checkpoint_generator_params(path)}
    return ProposerModel("sam2", model.to(dev).eval(), ref, recommended, checkpoint_filters(path))


def refuse_sam3(spec: str, cache_dir: Path | None = None) -> None:
    """ConfigError when ``spec`` names a SAM 3 checkpoint (a name, a hub id or a directory), before any load."""
    if is_sam3_spec(spec):  # sam3_tracker directories are not SAM 3 itself: they propose
        raise ConfigError(
            f"{spec!r} is a SAM 3 checkpoint: SAM 3 finds the instances of a text concept, it does not propose every "
            f"segment; run it as an engine: --engine sam3 (SAM 3 answers the prompts) or --engine sam3-rank "
            f"--propose object (SAM 3 proposes, the ranker picks), with --sam {spec}; or propose every segment with "
            f"SAM 3's tracker (its point prompts, SAM 2's way): --sam sam3-tracker"
        )


def _sam2_path(spec: str, cache_dir: Path | None) -> Path | None:
    """The checkpoint path behind a SAM 2 spec, None when the spec is not a SAM 2 one."""
    from slip.weights import clip_path, hub_id

    name = spec.split("/", 1)[1] if spec.startswith("facebook/") else spec
    if name in SAM2_ARCHS:  # a released name or its hub id: the Hugging Face snapshot in the cache
        arch = SAM2_ARCHS[name]
        try:
            return clip_path(hub_id(name), cache_dir, what="SAM 2 model")
        except WeightsNotFoundError as e:
            raise WeightsNotFoundError(
                f"{e}; or download the official checkpoint {OFFICIAL_SAM2_URL}{arch.checkpoint} (2.1) and pass its "
                f"path as the SAM spec"
            ) from e
    path = Path(spec).expanduser()
    if path.is_file():
        return path if path.suffix in SAM2_FILE_SUFFIXES and _holds_sam2(path) else None
    if path.is_dir():
        return path if is_hf_sam2_dir(path) or _sam2_files(path) else None
    if HUB_ID.match(spec):  # another hub id: SAM 2 when its cached snapshot is one
        try:
            snapshot = clip_path(spec, cache_dir, what="SAM model")
        except WeightsNotFoundError:
            return None  # SAM 1's loader says how to fetch it
        return snapshot if is_hf_sam2_dir(snapshot) else None
    return None


def _holds_sam2(path: Path) -> bool:
    """Whether a file is an official SAM 2 checkpoint (its tensor names, read memory-mapped: no copy)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not readable here: SAM 1's loader reports it in its words
        return False
    state = data.get("model", data) if isinstance(data, dict) else {}
    return isinstance(state, dict) and is_sam2_state(state)


def _sam2_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.pt") if p.is_file())


def _sam2_file(path: Path) -> Path:
    """The official checkpoint file of a path (the file, or the one ``.pt`` in a directory)."""
    if path.is_file():
        return path
    files = _sam2_files(path)
    if len(files) != 1:
        raise WeightsNotFoundError(f"expected one SAM 2 checkpoint (*.pt) in {path}, found {len(files)}")
    return files[0]
