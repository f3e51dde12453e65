"""Calibrate a ranker's "present" threshold on labelled composites, and read / write ``threshold.json``.

A threshold turns SLIP's argmax into an answer that can say "not found": a prompt whose best segment
scores below it gets no instance (:func:`slip.ranking.rank`). It is picked, per ranker, to maximise the
F1 of "the object is present and this is it" on 2x2 composites (the evaluation's machinery,
:mod:`slip.evaluate`), queried with

* the 4 classes **present** in each composite (positives), and
* classes **absent** from it (negatives): ``absent_fraction`` of all queries, sampled per composite.

At a threshold ``t`` a query is *answered* when its best segment scores ``>= t``. Counts:

* true positive: a present class answered with the prompted object (object-level, as in
  :mod:`slip.evaluate`: IoU > 0.5 with its true mask, or the oracle's object without masks);
* false positive ("false match"): any other answer — an absent class answered with some segment, or
  a present class answered with the wrong segment (a background, another object, a part);
* ``precision = TP / answered``, ``recall = TP / present queries`` (a present class answered with the
  wrong segment is a miss too), ``F1 = 2 TP / (answered + present queries)``;
* ``absent_false_match_rate``: share of absent-class queries answered with a segment.

The chosen threshold sits halfway between the best cut's lowest accepted score and the next score
below it (on ties in F1 the higher threshold wins: fewer false matches).

``threshold.json`` (beside a ranker's ``config.json``)::

    {"threshold": 0.42, "metric": "f1", "f1", "precision", "recall", "absent_false_match_rate",
     "present_queries", "absent_queries", "composites", "dataset", "split", "seed", "proposals", "sam",
     "absent_fraction", "ranker", "ranker_sha256", "heldout": {... the same figures on held-out composites}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from slip.data.composites import TILES, Composite, CompositeSource
from slip.errors import ConfigError, DatasetError
from slip.threshold import METRIC, THRESHOLD_FILE, read_threshold, write_threshold  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # the evaluation machinery is imported when used: read_threshold stays light
    from slip.evaluate import Proposer
    from slip.rankers.base import Ranker



@dataclass(frozen=True)
class Probe:
    """One query of a composite: the input of calibration."""

    present: bool  # the prompted class is in the composite
    score: float | None  # similarity of the best (argmax) segment; None = the composite had no segments
    hit: bool  # present, and the best segment is the prompted object (object-level)


@dataclass(frozen=True)
class OperatingPoint:
    """What one threshold does on a set of probes."""

    threshold: float  # answer when the best similarity is >= this
    f1: float  # 2 TP / (answered + present queries)
    precision: float  # TP / answered (1.0 when nothing is answered)
    recall: float  # TP / present queries
    absent_false_match_rate: float  # absent-class queries answered / absent-class queries
    present_queries: int  # probes of classes in the composite
    absent_queries: int  # probes of classes not in it

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def absent_per_composite(absent_fraction: float) -> int:
    """Absent-class queries per composite so that they are ``absent_fraction`` of all queries (rounded)."""
    if not 0.0 < absent_fraction < 1.0:
        raise ConfigError(f"absent fraction must be in (0, 1) (the share of queries of absent classes), "
                          f"got {absent_fraction}")
    return max(1, round(TILES * absent_fraction / (1.0 - absent_fraction)))


def absent_prompts(composite: Composite, captions: Sequence[str], count: int, *, seed: int = 0) -> tuple[str, ...]:
    """``count`` captions of classes not in ``composite``, seeded by ``(seed, composite.index)``."""
    present = set(composite.prompts)
    pool = sorted({c for c in captions if c not in present})
    if not pool:
        raise DatasetError(f"calibration needs classes absent from the composites: the dataset has only "
                           f"{len(set(captions))} classes, all in every composite (use more than {TILES})")
    rng = np.random.default_rng([seed, composite.index, 13])
    return tuple(pool[i] for i in rng.permutation(len(pool))[: min(count, len(pool))])


def collect_probes(ranker: Ranker, source: CompositeSource, composites: Iterable[Composite], *,
                   absent_fraction: float = 0.5, proposer: Proposer | None = None, seed: int = 0,
                   progress: bool = False) -> list[Probe]:
    """Query every composite with its 4 present classes and with absent ones (plain argmax)."""
    from slip.bars import progress_bar
    from slip.evaluate import TextCache, evaluate_composite

    count = absent_per_composite(absent_fraction)
    captions = source.folder.captions
    texts = TextCache(ranker)
    probes: list[Probe] = []
    for composite in progress_bar(composites, desc="calibrate", unit="composite", enabled=progress):
        absent = absent_prompts(composite, captions, count, seed=seed)
        done = evaluate_composite(composite, ranker, proposer=proposer, texts=texts, absent=absent)
        probes += [Probe(True, r.score, r.correct) for r in done.results if r.mode == "plain"]
        probes += [Probe(False, s, False) for s in done.absent_scores]
    return probes


def collect_engine_probes(engine, source: CompositeSource, composites: Iterable[Composite], *,
                          absent_fraction: float = 0.5, seed: int = 0, progress: bool = False) -> list[Probe]:
    """The probes of an engine that answers prompts itself (``slip.engines.build.build_engine``, built without a
    threshold): each query's best segment and its score, the same queries as :func:`collect_probes`."""
    from slip.bars import progress_bar
    from slip.evaluate import score_choice, truth_rule

    count = absent_per_composite(absent_fraction)
    captions = source.folder.captions
    probes: list[Probe] = []
    for composite in progress_bar(composites, desc="calibrate", unit="composite", enabled=progress):
        absent = absent_prompts(composite, captions, count, seed=seed)
        result = engine(composite.image, tuple(composite.prompts) + absent)
        masks = result.proposals.segments.masks.cpu().numpy()
        truth = truth_rule(composite, oracle=False, judged=False)
        for k, match in enumerate(result.matches):
            index, score = match.best if match.best is not None else (None, None)
            hit = k < TILES and score_choice(composite, masks, ("proposal",) * len(masks), k, index, score,
                                             "plain", truth).correct
            probes.append(Probe(k < TILES, score, hit))
    return probes


def operating_point(probes: Sequence[Probe], threshold: float) -> OperatingPoint:
    """Precision, recall, F1 and the absent false-match rate of ``threshold`` (see the module docstring)."""
    present = [p for p in probes if p.present]
    absent = [p for p in probes if not p.present]
    answered = [p for p in probes if p.score is not None and p.score >= threshold]
    tp = sum(p.hit for p in answered)
    false_absent = sum(not p.present for p in answered)
    return OperatingPoint(
        threshold=float(threshold),
        f1=2 * tp / (len(answered) + len(present)) if answered or present else 0.0,
        precision=tp / len(answered) if answered else 1.0,
        recall=tp / len(present) if present else 0.0,
        absent_false_match_rate=false_absent / len(absent) if absent else 0.0,
        present_queries=len(present),
        absent_queries=len(absent),
    )


def best_threshold(probes: Sequence[Probe]) -> OperatingPoint:
    """The threshold with the highest F1 (ties: the higher threshold), between two observed scores."""
    scored = sorted((p for p in probes if p.score is not None), key=lambda p: -p.score)
    if not any(p.hit for p in scored):
        raise DatasetError("no query was answered with the right object at any threshold: the ranker (or the "
                           "proposals) never find the prompted object, so no threshold can be calibrated")
    present = sum(p.present for p in probes)
    scores = np.array([p.score for p in scored])
    tp = np.cumsum([p.hit for p in scored])  # answering the first k + 1 probes
    f1 = 2 * tp / (np.arange(1, len(scored) + 1) + present)
    last = np.flatnonzero(np.r_[scores[1:] < scores[:-1], True])  # cuts between distinct scores only
    k = int(last[np.argmax(f1[last])])  # argmax: the first (highest) threshold among ties
    cut = float(scores[k]) if k + 1 == len(scores) else float((scores[k] + scores[k + 1]) / 2)
    return operating_point(probes, min(max(cut, -1.0), 1.0))


# --- threshold.json --------------------------------------------------------------------------------------


# --- several rankers on one dataset (slip calibrate) ------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """One ranker's calibrated threshold, its figures on held-out composites, and its threshold.json."""

    spec: str  # the ranker spec string
    directory: Path | None  # the ranker's directory (where threshold.json goes); None for tiny-random
    point: OperatingPoint  # the chosen threshold on the calibration composites
    heldout: OperatingPoint  # the same threshold on the held-out composites
    record: dict  # the threshold.json content


def ranker_directory(spec: str, cache_dir: Path | None = None) -> Path | None:
    """The directory behind a ranker spec (as :mod:`slip.rankers.loading` resolves it); None for tiny-random."""
    from slip.rankers.loading import SYNTH_SPEC
    from slip.rankers.hf_clip import TINY_SPEC
    from slip.weights import bundled_path, clip_path

    if spec == TINY_SPEC:
        return None
    if spec == SYNTH_SPEC:
        return bundled_path("synth-clip")
    path = Path(spec).expanduser()
    return path if path.exists() else clip_path(spec, cache_dir)


def calibrate_rankers(dataset: str | Path, specs: Sequence[str], *, composites: int = 200, seed: int = 0,
                      split: str = "val", split_seed: int = 0, heldout: str | Path | None = None,
                      heldout_seed: int | None = None, heldout_split: str | None = None,
                      caption_template: str = "{name}", tile_size: int = 128, proposals: str = "sam",
                      sam: str = "synth", absent_fraction: float = 0.5, device: str = "auto",
                      cache_dir: Path | None = None, progress: bool = False) -> list[Calibration]:
    """Pick each ranker's threshold on ``composites`` composites of ``dataset`` (``split``, ``seed``) and
    report it on held-out composites: of ``heldout`` (default: ``dataset``) with ``heldout_seed``
    (default ``seed + 1``) and ``heldout_split`` (default: ``"all"`` for another dataset, else ``split``)."""
    from slip.evaluate import composite_source, sam_proposer
    from slip.rankers.loading import load_ranker_bundle

    if proposals not in ("oracle", "sam"):
        raise ConfigError(f"proposals must be oracle or sam, got {proposals!r}")
    if composites < 1:
        raise ConfigError(f"need at least 1 composite, got {composites}")
    absent_per_composite(absent_fraction)  # validate before any model is loaded
    heldout_seed = seed + 1 if heldout_seed is None else heldout_seed
    heldout_split = heldout_split or ("all" if heldout is not None else split)
    common = dict(caption_template=caption_template, tile_size=tile_size, split_seed=split_seed)
    # 1. the calibration composites and the held-out ones (another seed, and/or another dataset)
    source = composite_source(dataset, seed=seed, split=split, **common)
    test = composite_source(heldout or dataset, seed=heldout_seed, split=heldout_split, **common)
    fit_items, test_items = source.take(composites), test.take(composites)
    proposer = sam_proposer(sam, device=device, cache_dir=cache_dir) if proposals == "sam" else None
    setting = {"composites": composites, "dataset": str(dataset), "split": split, "seed": seed,
               "proposals": proposals, "sam": sam if proposals == "sam" else None, "absent_fraction": absent_fraction}
    out = []
    for spec in specs:
        bundle = load_ranker_bundle(spec, device=device, cache_dir=cache_dir)
        # 2. probes: present and absent classes, best segment of each; 3. the best F1 cut; 4. held out
        probe = dict(absent_fraction=absent_fraction, proposer=proposer, seed=seed, progress=progress)
        point = best_threshold(collect_probes(bundle.ranker, source, fit_items, **probe))
        held = operating_point(collect_probes(bundle.ranker, test, test_items, **probe), point.threshold)
        held_setting = {"dataset": str(heldout or dataset), "split": heldout_split, "seed": heldout_seed,
                        "composites": composites}
        record = calibration_record(point, held, setting=setting, heldout=held_setting, ranker=spec,
                                    ranker_sha256=bundle.ref.sha256)
        out.append(Calibration(spec, ranker_directory(spec, cache_dir), point, held, record))
    return out


def calibrate_engine(dataset: str | Path, models, *, composites: int = 200, seed: int = 0, split: str = "val",
                     split_seed: int = 0, heldout: str | Path | None = None, caption_template: str = "{name}",
                     tile_size: int = 128, absent_fraction: float = 0.5, progress: bool = False) -> Calibration:
    """The threshold of an engine that scores its own answers (``models.engine``: ``sam3`` — SAM 3's score,
    presence included; ``sam3-rank`` — the ranker's score of SAM 3's proposals), picked and reported as
    :func:`calibrate_rankers` does. ``models``: a :class:`slip.settings.ModelSettings`. The record goes beside
    the model whose scale it is: the SAM 3 checkpoint (``sam3``) or the ranker (``sam3-rank``)."""
    from slip.engines.build import build_engine
    from slip.evaluate import composite_source
    from slip.options import SegmentOptions

    if models.engine == "slip":
        raise ConfigError("the slip engine's threshold is its ranker's: give --ranker SPEC (calibrate_rankers)")
    absent_per_composite(absent_fraction)
    common = dict(caption_template=caption_template, tile_size=tile_size, split_seed=split_seed)
    source = composite_source(dataset, seed=seed, split=split, **common)
    test = composite_source(heldout or dataset, seed=seed + 1, split="all" if heldout is not None else split, **common)
    engine = build_engine(models, SegmentOptions(calibrated=False))  # no threshold: every best is a probe
    probe = dict(absent_fraction=absent_fraction, seed=seed, progress=progress)
    point = best_threshold(collect_engine_probes(engine, source, source.take(composites), **probe))
    held = operating_point(collect_engine_probes(engine, test, test.take(composites), **probe), point.threshold)
    scale = engine.request.sam if models.engine == "sam3" else engine.request.ranker
    spec = models.sam if models.engine == "sam3" else models.clip
    setting = {"composites": composites, "dataset": str(dataset), "split": split, "seed": seed,
               "proposals": models.engine, "sam": models.sam, "absent_fraction": absent_fraction}
    held_setting = {"dataset": str(heldout or dataset), "split": "all" if heldout is not None else split,
                    "seed": seed + 1, "composites": composites}
    record = calibration_record(point, held, setting=setting, heldout=held_setting, ranker=spec,
                                ranker_sha256=scale.sha256)
    return Calibration(spec, engine_directory(models), point, held, record)


def engine_directory(models) -> Path | None:
    """Where an engine's ``threshold.json`` goes: beside the model whose score it thresholds (the SAM 3
    checkpoint for ``sam3``, the ranker for ``sam3-rank``); None for in-memory models."""
    if models.engine == "sam3":
        from slip.engines.sam3_model import sam3_directory

        return sam3_directory(models.sam, models.cache_dir)
    return ranker_directory(models.clip, models.cache_dir)


def calibration_record(point: OperatingPoint, held: OperatingPoint, *, setting: dict, heldout: dict, ranker: str,
                       ranker_sha256: str) -> dict:
    """The ``threshold.json`` content: the chosen point, how it was calibrated, and its held-out figures."""
    return {**point.to_json(), "metric": METRIC, **setting, "ranker": ranker, "ranker_sha256": ranker_sha256,
            "heldout": {**heldout, **held.to_json()}}


def check_writable(directory: Path | None, spec: str, *, bundle: bool = False) -> Path:
    """``directory`` if ``threshold.json`` may be written there, else ConfigError: a ranker without a
    directory (tiny-random), or one bundled inside the installed package without ``bundle=True``."""
    from slip.weights import BUNDLED_DIR

    if directory is None:
        raise ConfigError(f"ranker {spec!r} has no directory to write {THRESHOLD_FILE} into")
    if Path(directory).resolve().is_relative_to(BUNDLED_DIR.resolve()) and not bundle:
        raise ConfigError(f"{directory} is a ranker bundled inside the slip package: pass --bundle to write its "
                          f"{THRESHOLD_FILE} there (it ships with the package)")
    return Path(directory)


def save_calibration(calibration: Calibration, *, bundle: bool = False) -> Path:
    """Write ``threshold.json`` beside the ranker (see :func:`check_writable`)."""
    return write_threshold(check_writable(calibration.directory, calibration.spec, bundle=bundle), calibration.record)

