"""EdgeTAM and the SAM 3 tracker as proposers: transformers models with SAM 2's prompt encoder / mask decoder,
loaded by spec with their image processor and digest.

Two families (:data:`FAMILIES`), each run by :class:`slip.proposers.hf_tracker_generator.HfTrackerMaskGenerator`:

=================  ==================================  =====================================================
family             model (transformers)                specs
=================  ==================================  =====================================================
``edgetam``        ``EdgeTamModel`` (RepViT + FPN,     ``edgetam`` / ``yonigozlan/EdgeTAM-hf`` (the cached
                   SAM 2 decoder; Apache-2.0)          hub snapshot), a directory with ``model_type``
                                                       ``edgetam`` or ``edgetam_video``, ``tiny-random-edgetam``
``sam3-tracker``   ``Sam3TrackerModel`` (SAM 3's ViT   ``sam3-tracker`` (the tracker inside the cached, gated
                   + its tracker neck, SAM 2 decoder)  ``facebook/sam3`` snapshot), a directory with
                                                       ``model_type`` ``sam3_tracker`` or ``sam3_tracker_video``,
                                                       ``tiny-random-sam3-tracker``
=================  ==================================  =====================================================

``facebook/sam3`` holds SAM 3 as ``Sam3VideoModel`` saves it (``model_type`` ``sam3_video``): the detector
(``detector_model.*``), the tracker without a vision encoder (``tracker_model.*``) and the tracker's neck
(``tracker_neck.*``). The tracker is ``Sam3TrackerModel(config.tracker_config)`` with its backbone from
``detector_model.vision_encoder.backbone.*`` and its neck from ``tracker_neck.*`` (:data:`SAM3_VIDEO_KEYS`, the
renaming transformers registers for ``sam3_tracker``). The name ``sam3`` / ``facebook/sam3`` itself stays SAM 3's
engine (``--engine sam3``); :func:`slip.proposers.loading.refuse_sam3` says so and names ``--sam sam3-tracker``.

Every tensor the model needs must come from the checkpoint: a missing or mis-shaped one is a one-line
WeightsError, never random weights. The image processor is the checkpoint's (``preprocessor_config.json``), else
the family's default at the model's input size. Tiny-random models are built from the real config classes with
seeded weights (input sizes of the real models: 1024 and 1008), for tests, used only when named.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from slip import names
from slip.errors import WeightsError, WeightsNotFoundError, first_line
from slip.request import ModelRef
from slip.weights import HUB_ID, hf_config

PROCESSOR_ATTR = "slip_image_processor"  # the image processor a loader attached to its model
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
SAM3_VIDEO_TYPES = ("sam3_video",)  # facebook/sam3's layout: the tracker is taken out of it
SAM3_VIDEO_KEYS = {  # checkpoint name (regex) -> Sam3TrackerModel name
    r"^detector_model\.vision_encoder\.backbone\.": "vision_encoder.backbone.",
    r"^tracker_neck\.": "vision_encoder.neck.",
    r"^tracker_model\.": "",
}


@dataclass(frozen=True)
class Family:
    """One kind of transformers promptable-mask model that proposes through the SAM 2 point interface."""

    name: str  # "edgetam" | "sam3-tracker": ProposerModel.family, and the short name of its hub snapshot
    hub_id: str  # the Hugging Face repo the short name stands for
    names: tuple[str, ...]  # specs that mean the cached snapshot of hub_id
    tiny: str  # the seeded tiny-random spec
    model_types: tuple[str, ...]  # config.json model_type of a directory that loads as this family
    model_class: str  # transformers class
    processor_class: str  # transformers image processor class
    what: str  # for messages


FAMILIES = {
    "edgetam": Family("edgetam", names.HUB_EDGETAM, names.EDGETAM, names.TINY_EDGETAM,
                      ("edgetam", "edgetam_video"), "EdgeTamModel", "Sam2ImageProcessor", "EdgeTAM model"),
    # facebook/sam3 itself names SAM 3's engine (refuse_sam3): only the short name means its tracker
    "sam3-tracker": Family("sam3-tracker", names.HUB_SAM3, names.SAM3_TRACKER, names.TINY_SAM3_TRACKER,
                           ("sam3_tracker", "sam3_tracker_video"), "Sam3TrackerModel", "Sam3ImageProcessor",
                           "SAM 3 tracker (inside facebook/sam3)"),
}
TINY_NAMES = tuple(f.tiny for f in FAMILIES.values())
MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)


def is_hf_tracker_model(model) -> bool:
    """Whether ``model`` is a transformers EdgeTAM / SAM 3 tracker (what HfTrackerMaskGenerator runs)."""
    return getattr(getattr(model, "config", None), "model_type", None) in MODEL_TYPES


def family_of_directory(path: Path) -> Family | None:
    """The family whose ``model_type`` a directory's ``config.json`` names, None for any other directory."""
    model_type = hf_config(Path(path)).get("model_type")
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def load_tracker(spec: str, cache_dir: Path | None = None
                 ) -> tuple[Family, torch.nn.Module, ModelRef, Path | None] | None:
    """``(family, model, ref, directory)`` for a tracker spec (see the module docstring), None when ``spec`` is not
    one. ``model``: eval mode, CPU, float32, its image processor attached; ``directory``: where generator.json /
    filters.json may lie (None for tiny-random). WeightsNotFoundError (file, cache, env var, fetch command, and
    for SAM 3 where to accept the licence) when a named snapshot is not cached; WeightsError for bad weights."""
    from slip.weights import directory_sha256, tensors_sha256

    family = next((f for f in FAMILIES.values() if spec == f.tiny), None)
    if family is not None:
        model, processor = build_tiny_tracker(family.name)
        attach_processor(model, processor)
        return family, model, ModelRef(spec=spec, arch=spec, sha256=tensors_sha256(model.state_dict())), None
    found = tracker_directory(spec, cache_dir)
    if found is None:
        return None
    family, directory = found
    model = load_tracker_directory(directory, family)
    ref = ModelRef(spec=spec, arch=f"hf-{family.name}", sha256=directory_sha256(directory, cache_dir=cache_dir))
    return family, model, ref, directory


def tracker_directory(spec: str, cache_dir: Path | None = None) -> tuple[Family, Path] | None:
    """The family and directory a spec names: a short name or hub id of :data:`FAMILIES` (the cached snapshot,
    WeightsNotFoundError when missing), a directory of a tracker ``model_type``, or another cached hub id whose
    snapshot is one; None otherwise."""
    from slip.weights import clip_path

    for family in FAMILIES.values():
        if spec in family.names:
            return family, clip_path(family.hub_id, cache_dir, what=family.what)
    path = Path(spec).expanduser()
    if path.is_dir():
        family = family_of_directory(path)
        return (family, path) if family else None
    if HUB_ID.match(spec) and not path.exists():
        try:
            snapshot = clip_path(spec, cache_dir)
        except WeightsNotFoundError:
            return None  # not a cached tracker: the other loaders say how to fetch it
        family = family_of_directory(snapshot)
        return (family, snapshot) if family else None
    return None


def load_tracker_directory(directory: Path, family: Family) -> torch.nn.Module:
    """The model of a tracker directory (``save_pretrained``, or facebook/sam3's ``sam3_video`` layout for the
    SAM 3 tracker) in float32, eval mode, with its image processor attached; WeightsError in one line naming the
    directory and the first tensor missing or of the wrong shape."""
    import transformers

    directory = Path(directory)
    config = hf_config(directory)
    cls = getattr(transformers, family.model_class)
    kwargs: dict = {}
    if family.name == "sam3-tracker" and config.get("model_type") in SAM3_VIDEO_TYPES:
        if not isinstance(config.get("tracker_config"), dict):
            raise WeightsError(f"{directory / CONFIG_FILE} has no tracker_config: not a SAM 3 with its tracker")
        kwargs = dict(config=transformers.Sam3TrackerConfig(**config["tracker_config"]), key_mapping=SAM3_VIDEO_KEYS)
    elif config.get("model_type") not in family.model_types:
        raise WeightsError(f"{directory / CONFIG_FILE}: model_type {config.get('model_type')!r} is not a "
                           f"{family.what} ({', '.join(family.model_types)})")
    try:
        with _quiet():
            model, info = cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                              output_loading_info=True, **kwargs)
            processor = _load_processor(directory, family, model)
    except Exception as e:  # transformers, safetensors and timm raise many types for corrupt or partial files
        raise WeightsError(f"cannot load the {family.what} in {directory}: {type(e).__name__}: {first_line(e, 300)}; "
                           f"fetch or save it again") from e
    for kind in ("missing_keys", "mismatched_keys"):
        bad = sorted(str(k) for k in info.get(kind) or ())
        if bad:
            raise WeightsError(f"{directory}: {len(bad)} tensors of the {family.what} are {kind.split('_')[0]} in "
                               f"the checkpoint, e.g. {bad[0]!r} (another model, or a partial download?)")
    attach_processor(model, processor)
    return model.eval()


def build_tiny_tracker(name: str, seed: int = 0):
    """``(model, image processor)`` of ``tiny-random-edgetam`` (``name="edgetam"``) or ``tiny-random-sam3-tracker``
    (``"sam3-tracker"``): the real classes at width 32 (EdgeTAM: a RepViT of widths 8..64, one block per stage; SAM 3
    tracker: a 2-layer ViT of width 32, patch 14), the real input sizes, weights deterministic for ``seed``."""
    import transformers as tf

    decoder = dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    if name == "edgetam":
        backbone = tf.TimmWrapperConfig(architecture="repvit_m1", model_args={
            "in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3], "embed_dim": [8, 16, 32, 64],
            "depth": [1, 1, 1, 1]})
        vision = dict(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32)
        config, model_class, processor = tf.EdgeTamConfig, tf.EdgeTamModel, tf.Sam2ImageProcessor()
    elif name == "sam3-tracker":
        size, patch = 1008, 14
        grid = size // patch
        vit = dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=size, patch_size=patch, window_size=grid // 3,
                   global_attn_indexes=[1], pretrain_image_size=336)
        vision = dict(backbone_config=vit, fpn_hidden_size=32, scale_factors=[4.0, 2.0, 1.0],
                      backbone_feature_sizes=[[4 * grid] * 2, [2 * grid] * 2, [grid] * 2])
        config, model_class, processor = tf.Sam3TrackerConfig, tf.Sam3TrackerModel, tf.Sam3ImageProcessor()
    else:
        raise ValueError(f"no tiny-random tracker {name!r}: use one of {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config(vision_config=vision, prompt_encoder_config=dict(hidden_size=32),
                                   mask_decoder_config=decoder)).eval()
    return model, processor


def save_tracker(model, processor, directory: Path) -> Path:
    """A directory that loads by path: ``save_pretrained`` of the model and of its image processor."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet():
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return directory


def attach_processor(model, processor) -> None:
    """Keep the image processor with its model (the generator reads it: the model is what callers pass around)."""
    object.__setattr__(model, PROCESSOR_ATTR, processor)


def image_processor_of(model):
    """The image processor a loader attached to ``model`` (the checkpoint's ``preprocessor_config.json``), else
    the family's default processor at the model's input size (what ``save_pretrained`` of a tiny-random
    processor writes)."""
    attached = getattr(model, PROCESSOR_ATTR, None)
    return attached if attached is not None else default_image_processor(model.config.model_type, input_size(model))


def default_image_processor(model_type: str, size: int):
    """The family's image processor (``Sam2ImageProcessor`` / ``Sam3ImageProcessor`` defaults) at ``size``."""
    import transformers

    family = next(f for f in FAMILIES.values() if model_type in f.model_types)
    return getattr(transformers, family.processor_class)(size={"height": size, "width": size})


def input_size(model) -> int:
    """The side ``S`` of the square input of a transformers EdgeTAM / SAM 3 tracker (its prompt encoder's)."""
    return int(model.config.prompt_encoder_config.image_size)


def _load_processor(directory: Path, family: Family, model):
    if (directory / PROCESSOR_FILE).is_file():
        import transformers

        return getattr(transformers, family.processor_class).from_pretrained(directory, local_files_only=True)
    return default_image_processor(family.model_types[0], input_size(model))


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' load reports and progress bars off for the block (one-line errors are ours to give)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
