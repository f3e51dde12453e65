"""The two SAM 3 engines' per-image work: ``sam3`` (SAM 3 answers) and ``sam3-rank`` (SAM 3 proposes).

* :class:`Sam3Engine` — each prompt's instances are SAM 3's queries for it (:func:`slip.engines.sam3.instances`);
  the result's segments are every prompt's candidates in prompt order, its ``(N, P)`` similarity holds each
  segment's SAM 3 score for the prompt that found it (0 for the others), and the answers follow the request as
  for any engine (:func:`slip.rankers.scores.rank_scores`: threshold — by default SAM 3's 0.5, on the score that
  already includes the presence factor, so an absent concept is "not found" —, ``instances``, one-to-one,
  top-k). ``segments.json`` records each segment's score as ``predicted_iou`` and its prompt's presence score
  as ``stability_score``.
* :class:`Sam3Proposer` — a mask source (``generate_masks``) for the SLIP pipeline: SAM 3's instances of one
  generic concept; the filters and the ranker do the rest.

Both reuse SAM 3's vision features per image (:meth:`slip.engines.sam3.Sam3Concepts.vision`): a new prompt
on an image seen before costs the text encoder and the decoders only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from slip.engines.sam3 import Sam3Concepts, Sam3Vision, instances
from slip.pipeline import validate_prompts
from slip.rankers.scores import rank_scores
from slip.timing import StageTimer
from slip.types import MaskSet, Proposals, SlipResult


class Sam3Engine:
    """``--engine sam3``: SAM 3 segments every instance of each prompt and scores it."""

    def __init__(self, concepts: Sam3Concepts, request) -> None:
        self.concepts = concepts
        self.request = request
        self.generator = concepts  # what callers read points_per_batch from

    @property
    def device(self) -> torch.device:
        return self.concepts.device

    def params(self) -> dict:
        return self.request.to_json()

    def prepare(self, image: np.ndarray, timer: StageTimer | None = None) -> Sam3Vision:
        """SAM 3's vision features of an ``(H, W, 3) uint8`` image (prompt-independent, cached in process)."""
        return self.concepts.vision(image, timer)

    def answer(self, image: np.ndarray | None, state: Sam3Vision, prompts: Sequence[str],
               timer: StageTimer | None = None) -> SlipResult:
        """Each prompt's instances and the answers, from the image's vision features (the image itself is not
        read: ``None`` will do, as for the queue's cached features)."""
        prompts = validate_prompts(prompts)
        timer = timer or StageTimer()
        found = self.concepts.concepts(state, prompts, timer)
        with timer.stage("postprocess", self.device):
            parts = [instances(c, state.image_size) for c in found]
            segments = _concatenate(parts, state.image_size, self.device)
            scores = torch.zeros((len(segments), len(prompts)), dtype=torch.float32, device=self.device)
            start = 0
            for p, part in enumerate(parts):
                scores[start : start + len(part), p] = part.predicted_iou
                start += len(part)
        with timer.stage("rank", self.device):
            req = self.request
            similarity, matches = rank_scores(scores, prompts, top_k=req.top_k, threshold=list(req.thresholds(len(prompts))),
                                              instances=req.instances, one_to_one=req.one_to_one, masks=segments.masks)
        return SlipResult(image_size=tuple(state.image_size),
                          proposals=Proposals(segments=segments, filter_stats=(), generated=len(segments)),
                          similarity=similarity, matches=matches, timings=timer.seconds)

    def __call__(self, image: np.ndarray, prompts: Sequence[str]) -> SlipResult:
        timer = StageTimer()
        return self.answer(image, self.prepare(image, timer), prompts, timer)


class Sam3Proposer:
    """A mask source for the SLIP pipeline (``--engine sam3-rank``): SAM 3's instances of one concept."""

    def __init__(self, concepts: Sam3Concepts, concept: str) -> None:
        self.concepts = concepts
        self.concept = concept  # e.g. "object", "animal"
        self.points_per_batch = concepts.points_per_batch

    @property
    def device(self) -> torch.device:
        return self.concepts.device

    def generate_masks(self, image: np.ndarray, *, timings: Optional[dict[str, float]] = None) -> MaskSet:
        """The concept's candidates in an ``(H, W, 3) uint8`` image, best first (see
        :func:`slip.engines.sam3.instances`); ``timings`` accumulates ``encode`` / ``decode`` seconds."""
        timer = StageTimer()
        vision = self.concepts.vision(image, timer)
        (found,) = self.concepts.concepts(vision, [self.concept], timer)
        if timings is not None:
            for stage, seconds in timer.seconds.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        return instances(found, vision.image_size)


def _concatenate(parts: list[MaskSet], image_size: tuple[int, int], device: torch.device) -> MaskSet:
    parts = [p for p in parts if len(p)]
    if not parts:
        return MaskSet.empty(*image_size, device=device)
    return MaskSet(*(torch.cat([getattr(p, f) for p in parts]) for f in MaskSet.__dataclass_fields__))
