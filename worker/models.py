"""The warm models of one worker process, and what it assembles from them per request.

A worker is about model reuse: what is costly to load stays loaded, what a request names is assembled over it.

* **the engine and its SAM** (``SLIP_ENGINE``, ``SLIP_SAM``): loaded once at process start through the one
  builder (:func:`slip.engines.build.load_engine_models`: SAM 1, SAM 2 / 2.1, or SAM 3). They are what this
  worker serves: a job naming another engine or SAM fails for now with :class:`jobs.errors.ModelMismatchError`
  (another worker may serve it; :func:`mismatch` says which one to start);
* **rankers** (``SLIP_CLIP`` and any other a job names): ``SLIP_CLIP`` is loaded at start and stays; another
  ranker (a hub id in this worker's cache, ``store:rankers/<digest>`` uploaded by the producer — see
  :mod:`jobs.rankers` —, ``synth``, ...) is loaded on first use into an LRU of :data:`RANKER_CACHE`;
* **engines**: one per (ranker, request options, points per batch), assembled over the warm models (assembling
  loads nothing), an LRU of :data:`ENGINE_CACHE`; evicting a ranker drops the engines that hold it;
* **SAM 3 vision features** (engine ``sam3``): an LRU of :data:`FEATURE_CACHE` images by (image SHA-256,
  proposal digest), in front of the store's copy (:mod:`worker.proposals`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jobs.segment import SegmentSpec
from jobs.store import Store
from slip.options import SegmentOptions

log = logging.getLogger("slip.worker")

RANKER_CACHE = 2  # rankers loaded on demand, kept beside SLIP_CLIP's (LRU)
ENGINE_CACHE = 8  # engines assembled for distinct requests (LRU)
FEATURE_CACHE = 8  # SAM 3 images whose vision features stay in process (LRU; ~110 MB each at fp32 for the real model)


@dataclass
class WarmModels:
    """The process's loaded models (:class:`slip.engines.build.EngineModels`) and its caches."""

    loaded: Any  # slip.engines.build.EngineModels: settings, sam, ranker (SLIP_CLIP's; None for sam3), concepts
    store: Store  # where store: rankers are read from
    cache_root: Path  # where rankers fetched from a remote store are kept
    _rankers: OrderedDict = field(default_factory=OrderedDict)  # job's clip spec -> RankerBundle
    _engines: OrderedDict = field(default_factory=OrderedDict)  # (clip, options json, ppb) -> engine
    _features: OrderedDict = field(default_factory=OrderedDict)  # (image sha, proposal digest) -> Sam3Vision

    @property
    def settings(self):
        """The slip.settings.ModelSettings the models were loaded for."""
        return self.loaded.settings

    @property
    def device(self):
        """The torch device the models are on."""
        return next(self.loaded.sam.model.parameters()).device

    def ranker(self, clip: str):
        """The RankerBundle of the job's ranker spec ``clip``: SLIP_CLIP's, or one loaded on demand (LRU)."""
        if self.loaded.ranker is not None and clip == self.settings.clip:
            return self.loaded.ranker
        if clip in self._rankers:
            self._rankers.move_to_end(clip)
            return self._rankers[clip]
        from jobs.rankers import local_ranker
        from slip.rankers.loading import load_ranker_bundle

        start, models = time.perf_counter(), self.settings
        bundle = load_ranker_bundle(local_ranker(self.store, clip, self.cache_root), device=models.device,
                                    dtype=models.dtype, cache_dir=models.cache_dir)
        bundle = replace(bundle, ref=replace(bundle.ref, spec=clip))  # results name it as the job did
        log.info("loaded ranker %s (sha256 %s) in %.1f s", clip, bundle.ref.sha256[:12], time.perf_counter() - start)
        self._rankers[clip] = bundle
        while len(self._rankers) > RANKER_CACHE:
            _, gone = self._rankers.popitem(last=False)
            for key in [k for k, e in self._engines.items() if getattr(e, "ranker", None) is gone.ranker]:
                del self._engines[key]
        return bundle

    def engine(self, options: SegmentOptions, *, clip: str | None = None, points_per_batch: int | None = None):
        """The engine for a request (``options`` and the ranker ``clip``, default SLIP_CLIP's), assembled once."""
        from slip.engines.build import assemble_engine

        models = self.settings
        clip = None if models.engine == "sam3" else (clip or models.clip)
        ppb = points_per_batch or models.points_per_batch
        key = (clip, options.model_dump_json(), ppb)
        if key not in self._engines:
            ranker = None if clip is None else self.ranker(clip)
            self._engines[key] = assemble_engine(self.loaded, options, ranker=ranker, points_per_batch=ppb)
        self._engines.move_to_end(key)
        while len(self._engines) > ENGINE_CACHE:
            self._engines.popitem(last=False)
        return self._engines[key]

    def features(self, key: tuple[str, str]):
        """SAM 3 vision features kept in process for ``(image sha, proposal digest)``, or None."""
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        return None

    def keep_features(self, key: tuple[str, str], vision) -> None:
        self._features[key] = vision
        while len(self._features) > FEATURE_CACHE:
            self._features.popitem(last=False)

    def health(self) -> dict:
        """What is loaded: the engine, SAM and ranker records, rankers loaded on demand, cache sizes."""
        ranker = self.loaded.ranker
        return {
            "engine": self.settings.engine,
            "sam": self.loaded.sam.ref.to_json(),
            "clip": ranker.ref.to_json() if ranker is not None else None,
            "rankers_on_demand": [b.ref.to_json() for b in self._rankers.values()],
            "recommended_generator": dict(getattr(self.loaded.sam, "generator", {}) or {}),
            "recommended_filters": getattr(self.loaded.sam, "filters", None),
            "recommended_threshold": ranker.threshold if ranker is not None else self.loaded.sam.threshold,
            "cached": {"engines": len(self._engines), "features": len(self._features)},
        }


def mismatch(models, spec: SegmentSpec, hostname: str) -> str | None:
    """Why a worker loading ``models`` (ModelSettings) cannot serve ``spec`` (another engine or SAM), in one line
    naming the worker to start; None when it can."""
    engine, sam, want_engine, want_sam = models.engine, models.sam, spec.engine, spec.sam
    if (engine, sam) == (want_engine, want_sam):
        return None
    ours = f"sam={sam}" + ("" if engine == "slip" else f" (engine {engine})")
    theirs = f"sam={want_sam}" + ("" if want_engine == "slip" else f" (engine {want_engine})")
    start = (f"SLIP_ENGINE={want_engine} " if want_engine != engine else "") + f"SLIP_SAM={want_sam}"
    return f"worker {hostname} serves {ours}, but the job asks for {theirs}: start a worker with {start}"


def load_warm_models(models, store: Store) -> tuple[WarmModels, float]:
    """Load the engine's models for ``models`` (a ModelSettings) once; the warm models and the seconds it took."""
    from slip.engines.build import load_engine_models
    from slip.weights import resolve_cache_dir

    start = time.perf_counter()
    loaded = load_engine_models(models, image_cache=0)  # the worker keeps SAM 3 features itself (by image digest)
    return WarmModels(loaded, store, resolve_cache_dir(models.cache_dir)), time.perf_counter() - start
