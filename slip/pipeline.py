"""The SLIP pipeline: SAM proposals -> annotation filters -> segment crops -> ranker -> best match(es).

A pipeline is built from the two warm models and one :class:`slip.request.ResolvedRequest`, which fixes
every output-changing setting (generator options, filter chain, crops, dtype, ranking); the models are
injected, so one process can assemble many pipelines over the same weights.

The stages are public so callers can cache the prompt-independent part: ``propose`` and ``embed``
depend only on the image and the models, ``rank`` only on the embeddings and the prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from slip.crops import CropConfig, crop_segments
from slip.errors import DeviceOutOfMemoryError, PromptError
from slip.proposers.base import Proposer, out_of_memory
from slip.proposers.loading import mask_generator_for
from slip.rankers.base import Ranker
from slip.rankers.scores import rank_scores, ranker_scores
from slip.ranking import rank
from slip.ranking import validate_prompts as check_prompts
from slip.request import ResolvedRequest
from slip.timing import StageTimer
from slip.types import Match, MaskSet, Proposals, SlipResult

MAX_PROMPT_CHARS = 300


def validate_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    """Prompts stripped of surrounding blanks; PromptError when none, blank or too long."""
    cleaned = tuple(p.strip() for p in check_prompts([prompts] if isinstance(prompts, str) else prompts))
    for p in cleaned:
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt of {len(p)} characters is too long (limit {MAX_PROMPT_CHARS})")
    return cleaned


class SLIP:
    """Text-prompted segmentation over injected models, configured by one resolved request."""

    def __init__(
        self,
        generator,
        ranker: Ranker,
        request: ResolvedRequest,
        *,
        batch_size: int = 64,
        text_cache_size: int = 1024,
    ) -> None:
        self.request = request
        self.generator = generator  # a MaskGenerator (or anything with generate_masks(image, timings=))
        self.ranker = ranker
        self.proposer = Proposer(generator, request.filter_chain(), ref=request.sam, device=ranker.device)
        self.filters = self.proposer.filters
        self.crop = CropConfig(**request.crop.to_json())
        self.batch_size = batch_size
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size

    @staticmethod
    def build(sam, ranker: Ranker, request: ResolvedRequest, *, points_per_batch: int = 64,
              batch_size: int = 64) -> "SLIP":
        """The pipeline over a loaded SAM (1 or 2): its mask generator takes the request's options and dtype."""
        generator = mask_generator_for(sam, points_per_batch=points_per_batch, dtype=request.dtype,
                                       **request.generator.to_json())
        return SLIP(generator, ranker, request, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.ranker.device

    def params(self) -> dict:
        """The resolved request's record (every setting that changes the output)."""
        return self.request.to_json()

    def propose(self, image: np.ndarray, timer: StageTimer | None = None) -> Proposals:
        """SAM proposals of an ``(H, W, 3) uint8`` image, after the annotation filters."""
        return self.proposer.propose(image, timer)

    def embed(self, image: np.ndarray, proposals: Proposals, timer: StageTimer | None = None) -> torch.Tensor:
        """``(N, D)`` unit-norm ranker embeddings of the crops of each proposed segment."""
        timer = timer or StageTimer()
        segments = proposals.segments
        chunks = []
        for start in range(0, len(segments), self.batch_size):
            part = segments.select(torch.arange(start, min(start + self.batch_size, len(segments))))
            try:
                with timer.stage("crops", self.device):
                    pixels = crop_segments(image, part, self.crop, self.ranker.image_size)
                with timer.stage("clip_images", self.device):
                    chunks.append(self.ranker.encode_images(pixels).float())
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                raise DeviceOutOfMemoryError(f"out of memory while embedding {len(part)} segment crops: "
                                             "retry with a smaller SLIP_BATCH_SIZE") from e
        if not chunks:
            return torch.zeros((0, self._embedding_dim()), device=self.device)
        return torch.cat(chunks)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(P, D)`` unit-norm text embeddings; each distinct prompt is encoded once (LRU cache)."""
        prompts = validate_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for p, e in zip(missing, self.ranker.encode_texts(missing).float()):
                self._text_cache[p] = e
        for p in prompts:
            self._text_cache.move_to_end(p)
        rows = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return rows

    def rank(
        self, embeddings: torch.Tensor, prompts: Sequence[str], segments: MaskSet | None = None,
        timer: StageTimer | None = None,
    ) -> tuple[torch.Tensor, tuple[Match, ...]]:
        """Segments x prompts similarity ``(N, P)`` (CPU) and the match of each prompt; ``segments`` (the
        proposals' masks) are needed to deduplicate instances when the request asks for all of them."""
        timer = timer or StageTimer()
        prompts = validate_prompts(prompts)
        req = self.request
        with timer.stage("clip_text", self.device):
            texts = self.encode_prompts(prompts)
        with timer.stage("rank", self.device):
            masks = None if segments is None else segments.masks
            thresholds = list(req.thresholds(len(prompts)))
            scores = ranker_scores(self.ranker, embeddings.to(texts.device), texts)
            if scores is not None:  # a calibrated ranker: its own score is the scale (SigLIP's sigmoid)
                return rank_scores(scores, prompts, top_k=req.top_k, threshold=thresholds,
                                   one_to_one=req.one_to_one, instances=req.instances, masks=masks)
            return rank(embeddings.to(texts.device), texts, prompts, top_k=req.top_k, threshold=thresholds,
                        one_to_one=req.one_to_one, instances=req.instances, masks=masks)

    def prepare(self, image: np.ndarray, timer: StageTimer | None = None) -> tuple[Proposals, torch.Tensor]:
        """The prompt-independent half (what the segment-once, query-many cache keeps): the filtered proposals
        and their ``(N, D)`` crop embeddings."""
        timer = timer or StageTimer()
        proposals = self.propose(image, timer)
        return proposals, self.embed(image, proposals, timer)

    def answer(self, image: np.ndarray, state: tuple[Proposals, torch.Tensor], prompts: Sequence[str],
               timer: StageTimer | None = None) -> SlipResult:
        """The prompt-dependent half: the result for ``prompts`` from :meth:`prepare`'s state."""
        prompts = validate_prompts(prompts)
        timer = timer or StageTimer()
        proposals, embeddings = state
        similarity, matches = self.rank(embeddings, prompts, proposals.segments, timer)
        return SlipResult(
            image_size=(int(image.shape[0]), int(image.shape[1])),
            proposals=proposals,
            similarity=similarity,
            matches=matches,
            timings=timer.seconds,
        )

    def __call__(self, image: np.ndarray, prompts: Sequence[str]) -> SlipResult:
        """Segment ``image`` for each prompt; see :class:`slip.types.SlipResult`."""
        prompts = validate_prompts(prompts)
        timer = StageTimer()
        return self.answer(image, self.prepare(image, timer), prompts, timer)

    def _embedding_dim(self) -> int:
        return int(self.encode_prompts(["object"]).shape[1])
