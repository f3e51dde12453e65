"""The SLIP pipeline: SAM proposals -> annotation filters -> segment crops -> ranker -> best match.

The stages are public so callers can cache the prompt-independent part: ``propose`` and ``embed``
depend only on the image and the models, ``rank`` only on the embeddings and the prompts.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from slip.crops import CropConfig, crop_segments
from slip.errors import PromptError
from slip.filters import apply_filters, default_filters
from slip.generator import MaskGenerator
from slip.rankers.base import Ranker
from slip.ranking import rank
from slip.ranking import validate_prompts as check_prompts
from slip.types import Match, Proposals, SlipResult

MAX_PROMPT_CHARS = 300


def validate_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    """Prompts stripped of surrounding blanks; PromptError when none, blank or too long."""
    cleaned = tuple(p.strip() for p in check_prompts([prompts] if isinstance(prompts, str) else prompts))
    for p in cleaned:
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"prompt of {len(p)} characters is too long (limit {MAX_PROMPT_CHARS})")
    return cleaned


class _Timer:
    """Collects wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class SLIP:
    """Text-prompted segmentation with an injected mask generator, filters and ranker."""

    def __init__(
        self,
        generator: MaskGenerator,
        ranker: Ranker,
        *,
        filters: Sequence | None = None,
        crop: CropConfig = CropConfig(),
        top_k: int = 5,
        threshold: float | None = None,
        one_to_one: bool = False,
        batch_size: int = 64,
        text_cache_size: int = 1024,
    ) -> None:
        self.generator = generator
        self.ranker = ranker
        self.filters = tuple(default_filters() if filters is None else filters)
        self.crop = crop
        self.top_k = top_k
        self.threshold = threshold
        self.one_to_one = one_to_one
        self.batch_size = batch_size
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size

    @property
    def device(self) -> torch.device:
        return self.ranker.device

    def params(self) -> dict:
        """JSON-serialisable description of every setting that changes the output."""
        return {
            "generator": self.generator.params(),
            "filters": [{"name": f.name, **f.params()} for f in self.filters],
            "crop": asdict(self.crop),
            "top_k": self.top_k,
            "threshold": self.threshold,
            "one_to_one": self.one_to_one,
            "ranker": self.ranker.spec,
        }

    def propose(self, image: np.ndarray, timer: _Timer | None = None) -> Proposals:
        """SAM proposals of an ``(H, W, 3) uint8`` image, after the annotation filters."""
        timer = timer or _Timer()
        # 1. every segment SAM finds
        with timer.stage("sam", self.device):
            masks = self.generator.generate_masks(image, timings=timer.seconds)
        # 2. remove duplicates, background and contained segments
        with timer.stage("filters", self.device):
            kept, stats = apply_filters(masks, self.filters)
        return Proposals(segments=kept, filter_stats=stats, generated=len(masks))

    def embed(self, image: np.ndarray, proposals: Proposals, timer: _Timer | None = None) -> torch.Tensor:
        """``(N, D)`` unit-norm ranker embeddings of the crops of each proposed segment."""
        timer = timer or _Timer()
        segments = proposals.segments
        chunks = []
        for start in range(0, len(segments), self.batch_size):
            part = segments.select(torch.arange(start, min(start + self.batch_size, len(segments))))
            with timer.stage("crops", self.device):
                pixels = crop_segments(image, part, self.crop, self.ranker.image_size)
            with timer.stage("clip_images", self.device):
                chunks.append(self.ranker.encode_images(pixels).float())
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
        self, embeddings: torch.Tensor, prompts: Sequence[str], timer: _Timer | None = None
    ) -> tuple[torch.Tensor, tuple[Match, ...]]:
        """Segments x prompts similarity ``(N, P)`` (CPU) and the match of each prompt."""
        timer = timer or _Timer()
        prompts = validate_prompts(prompts)
        with timer.stage("clip_text", self.device):
            texts = self.encode_prompts(prompts)
        with timer.stage("rank", self.device):
            return rank(
                embeddings.to(texts.device),
                texts,
                prompts,
                top_k=self.top_k,
                threshold=self.threshold,
                one_to_one=self.one_to_one,
            )

    def __call__(self, image: np.ndarray, prompts: Sequence[str]) -> SlipResult:
        """Segment ``image`` for each prompt; see :class:`slip.types.SlipResult`."""
        prompts = validate_prompts(prompts)
        timer = _Timer()
        proposals = self.propose(image, timer)
        embeddings = self.embed(image, proposals, timer)
        similarity, matches = self.rank(embeddings, prompts, timer)
        return SlipResult(
            image_size=(int(image.shape[0]), int(image.shape[1])),
            proposals=proposals,
            similarity=similarity,
            matches=matches,
            timings=timer.seconds,
        )

    def _embedding_dim(self) -> int:
        return int(self.encode_prompts(["object"]).shape[1])
