"""The one builder of engines: models loaded once by spec, the request resolved, a pipeline per image.

An engine turns ``(image, prompts)`` into a :class:`slip.types.SlipResult`; three exist (``--engine``,
``SLIP_ENGINE``):

=============  ============================================  ==========================================
engine         proposals                                     answers
=============  ============================================  ==========================================
``slip``       SAM 1 or SAM 2 automatic masks + filters      the ranker (CLIP, SigLIP, open_clip, ours)
``sam3``       SAM 3's instances of each prompt              SAM 3's own scores (presence included)
``sam3-rank``  SAM 3's instances of one generic concept      the ranker
               (``--propose``, default "object") + filters
=============  ============================================  ==========================================

Every engine has the same two halves, so callers can cache the first (the worker's segment-once,
query-many store): :meth:`Engine.prepare` (prompt-independent: proposals and their crop embeddings, or SAM 3's
vision features) and :meth:`Engine.answer` (prompt-dependent). ``engine(image, prompts)`` runs both.

:func:`build_engine` checks everything before loading anything heavy: a bad engine, a request option the
engine cannot honour, or a SAM 3 checkpoint given to the ``slip`` engine is one :class:`ConfigError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from slip import names
from slip.errors import ConfigError
from slip.request import ResolvedRequest, resolve
from slip.settings import ENGINES  # declared with the settings (SLIP_ENGINE)

if TYPE_CHECKING:  # check_engine runs in producers, which import no model code
    import numpy as np
    import torch

    from slip.timing import StageTimer
    from slip.types import SlipResult

DEFAULT_CONCEPT = "object"  # what sam3-rank asks SAM 3 for unless --propose says otherwise
SAM3_THRESHOLD = 0.5  # SAM 3's score threshold when none is given or calibrated (its own default)
PROPOSAL_ONLY = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
                 "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
                 "crop_n_points_downscale_factor", "min_mask_region_area")  # SAM's automatic generator only


class Engine(Protocol):
    """What every engine offers (see the module docstring)."""

    request: ResolvedRequest  # every output-changing setting, engine included (digests, segments.json)
    device: torch.device

    def prepare(self, image: np.ndarray, timer: StageTimer | None = None) -> Any:
        """The prompt-independent state of an ``(H, W, 3) uint8`` image."""

    def answer(self, image: np.ndarray, state: Any, prompts: Sequence[str],
               timer: StageTimer | None = None) -> SlipResult:
        """The result for ``prompts`` from a prepared state."""

    def __call__(self, image: np.ndarray, prompts: Sequence[str]) -> SlipResult:
        """``answer(image, prepare(image), prompts)``."""


def check_engine(engine: str, options: Any) -> None:
    """ConfigError, before any model loads, for an unknown engine or options the engine cannot honour."""
    propose = getattr(options, "propose", None)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)} (--engine / SLIP_ENGINE)")
    if propose is not None and engine != "sam3-rank":
        raise ConfigError(f"--propose names the concept SAM 3 proposes for --engine sam3-rank; the {engine} engine "
                          f"has no use for it")
    if propose is not None and not propose.strip():
        raise ConfigError("--propose is empty: name a generic concept such as 'object' or 'animal'")
    if engine != "slip":
        given = [name for name in PROPOSAL_ONLY if getattr(options, name, None) is not None]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is an option of SAM's automatic mask generator; the "
                              f"{engine} engine proposes with SAM 3, which has none")
    if engine == "sam3" and getattr(options, "filters", None) is not None:
        raise ConfigError("--filters applies to proposals ranked by a ranker; --engine sam3 returns SAM 3's own "
                          "instances (use --engine sam3-rank to filter and rank them)")


def check_engine_sam(engine: str, sam: str) -> None:
    """ConfigError, without loading anything, when ``sam`` names a well-known checkpoint of the wrong kind for
    ``engine`` (a SAM 3 for the slip engine, a SAM 1 / 2 for the SAM 3 engines); paths are checked at load."""
    if engine == "slip" and sam in names.SAM3_NAMES:
        raise ConfigError(f"{sam!r} is a SAM 3 checkpoint: run it as an engine (--engine sam3, or --engine sam3-rank "
                          f"--propose object), not as the slip engine's proposer; its tracker proposes as --sam "
                          f"sam3-tracker")
    if engine != "slip" and (sam in names.PROPOSER_NAMES or sam.startswith(names.SAM2_PREFIXES)):
        raise ConfigError(f"--engine {engine} needs a SAM 3 checkpoint as --sam (sam3, facebook/sam3, a SAM 3 "
                          f"directory or tiny-random-sam3), got {sam!r}")


def build_engine(models: Any, options: Any) -> Engine:
    """Load the models of ``models`` (a :class:`slip.settings.ModelSettings`: engine, sam, clip, device, dtype,
    cache_dir, points_per_batch, batch_size) once and assemble the engine for the request ``options`` (a
    :class:`slip.options.SegmentOptions`; ``options.propose``: sam3-rank's concept, default "object")."""
    check_engine(models.engine, options)
    return assemble_engine(load_engine_models(models), options)


@dataclass(frozen=True)
class EngineModels:
    """An engine's models, loaded once (what a worker keeps warm and assembles an engine from per request)."""

    settings: Any  # the slip.settings.ModelSettings they were loaded for (engine, device, dtype, batch sizes)
    sam: Any  # slip.proposers.ProposerModel (slip) | slip.engines.sam3_model.Sam3Bundle (sam3, sam3-rank)
    ranker: Any | None  # slip.rankers.loading.RankerBundle (slip, sam3-rank); None for sam3 or when not loaded
    concepts: Any | None = None  # slip.engines.sam3.Sam3Concepts over ``sam`` (sam3 engines): shared caches


def load_engine_models(models: Any, *, ranker: bool = True, image_cache: int = 8) -> EngineModels:
    """Load ``models.engine``'s models once: the proposer (SAM 1/2) or SAM 3, and the ranker ``models.clip``
    unless the engine has none (sam3) or ``ranker`` is False (the caller brings rankers per request).
    ``image_cache``: SAM 3 vision features kept in process (images, LRU). ConfigError before any load for a
    SAM 3 checkpoint as the slip engine's SAM or another checkpoint as a SAM 3 engine's."""
    check_engine(models.engine, None)
    if models.engine == "slip":
        from slip.proposers.loading import load_proposer_model, refuse_sam3

        refuse_sam3(models.sam, models.cache_dir)
        sam, concepts = load_proposer_model(models.sam, device=models.device, cache_dir=models.cache_dir), None
    else:
        from slip.engines.sam3 import Sam3Concepts
        from slip.engines.sam3_model import is_sam3_spec, load_sam3

        if not is_sam3_spec(models.sam):
            raise ConfigError(f"--engine {models.engine} needs a SAM 3 checkpoint as --sam (sam3, facebook/sam3, a "
                              f"SAM 3 directory or tiny-random-sam3), got {models.sam!r}")
        sam = load_sam3(models.sam, device=models.device, cache_dir=models.cache_dir)
        concepts = Sam3Concepts(sam, dtype=models.dtype, image_cache=image_cache)
    bundle = None
    if ranker and models.engine != "sam3":
        from slip.rankers.loading import load_ranker_bundle

        bundle = load_ranker_bundle(models.clip, device=models.device, dtype=models.dtype, cache_dir=models.cache_dir)
    return EngineModels(models, sam, bundle, concepts)


def assemble_engine(loaded: EngineModels, options: Any, *, ranker: Any | None = None,
                    points_per_batch: int | None = None) -> Engine:
    """The engine for the request ``options`` over loaded models (assembling loads nothing); ``ranker``: a
    RankerBundle to rank with instead of ``loaded.ranker``; ``points_per_batch``: SAM's, instead of the
    settings' (the worker halves it on out-of-memory)."""
    models = loaded.settings
    check_engine(models.engine, options)
    ranker = ranker or loaded.ranker
    if models.engine != "sam3" and ranker is None:
        raise ConfigError(f"the {models.engine} engine needs a ranker: none was loaded")
    if models.engine == "slip":
        return _slip_engine(models, options, loaded.sam, ranker, points_per_batch or models.points_per_batch)
    if models.engine == "sam3":
        return _sam3_engine(models, options, loaded.sam, loaded.concepts)
    return _sam3_rank_engine(models, options, loaded.sam, loaded.concepts, ranker,
                             (options.propose or DEFAULT_CONCEPT).strip())


# --- the three engines --------------------------------------------------------------------------------------


def _slip_engine(models: Any, options: Any, sam: Any, ranker: Any, points_per_batch: int):
    from slip.pipeline import SLIP

    request = resolve(options, sam=sam.ref, sam_generator=sam.generator, sam_filters=sam.filters, ranker=ranker.ref,
                      ranker_threshold=ranker.threshold, dtype=models.dtype)
    generator = sam.mask_generator(request.generator.to_json(), dtype=models.dtype, points_per_batch=points_per_batch)
    return SLIP(generator, ranker.ranker, request, batch_size=models.batch_size)


def _sam3_engine(models: Any, options: Any, bundle: Any, concepts: Any):
    from slip.engines.sam3_engine import Sam3Engine

    threshold = bundle.threshold if bundle.threshold is not None else SAM3_THRESHOLD
    request = resolve(options, sam=bundle.ref, sam_generator={}, sam_filters="none", ranker=bundle.ref,
                      ranker_threshold=threshold, dtype=models.dtype, engine="sam3")
    return Sam3Engine(concepts, request)


def _sam3_rank_engine(models: Any, options: Any, bundle: Any, concepts: Any, ranker: Any, concept: str):
    from slip.engines.sam3_engine import Sam3Proposer
    from slip.pipeline import SLIP

    request = resolve(options, sam=bundle.ref, sam_generator={}, sam_filters=None, ranker=ranker.ref,
                      ranker_threshold=ranker.threshold, dtype=models.dtype, engine="sam3-rank", propose=concept)
    return SLIP(Sam3Proposer(concepts, concept), ranker.ranker, request, batch_size=models.batch_size)
