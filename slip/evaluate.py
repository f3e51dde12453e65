"""Object-level scoring of a ranker on 2x2 composites: the paper's protocol, corrected.

For every composite **each** of its 4 class captions is queried (the paper's notebook scored only the
last query of each composite). A query is **correct** when the chosen segment *is* the prompted object
(``QueryResult.truth`` says how that was decided):

* ``"mask"`` — ground-truth object masks (synthetic data): IoU > ``OBJECT_IOU`` with the true mask;
* ``"judge"`` — no masks, a classifier judge given: the judge names the prompted class (the paper);
* ``"oracle"`` — no masks, oracle proposals: the chosen segment is the oracle's object (the tile);
* ``"tile"`` — no masks, no judge, SAM proposals: IoU > ``OBJECT_IOU`` with the whole tile (weak).

The old criterion, the chosen segment lies mostly (more than ``IN_TILE`` of its area) in the prompted
tile, is kept as ``tile_correct`` / ``tile_accuracy``: it also accepts the oracle's same-tile
distractors (background blob, partial object), so it overstates a ranker that picks backgrounds.

Every composite is scored twice from one similarity matrix: plain argmax per prompt and one-to-one.

Proposals: the oracle segments (:func:`slip.data.composites.oracle_segments`: the ranker alone, as the
paper intended), or any ``proposer(image) -> MaskSet`` (SAM + filters: :func:`sam_proposer`).

Held-out images: composites come from the validation part of the training split (``split="val"``,
the images that also chose the checkpoint) or from every image of a dataset (``split="all"``): the
honest test is ``split="all"`` on a dataset training never saw (for synthetic data: another seed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from slip.bars import progress_bar
from slip.crops import CropConfig, crop_segments
from slip.data.composites import Composite, CompositeSource, heldout_records, oracle_segments
from slip.data.dataset import maskset_from_masks
from slip.data.folder import scan_folder
from slip.errors import ConfigError
from slip.rankers.base import Ranker
from slip.ranking import rank
from slip.types import MaskSet

IN_TILE = 0.5  # tile_correct: more than this fraction of the chosen segment's area lies in the prompted tile
OBJECT_IOU = 0.5  # correct: the chosen segment's IoU with the prompted object's mask is above this
MODES = ("plain", "one_to_one")
Proposer = Callable[[np.ndarray], MaskSet]


@dataclass(frozen=True)
class QueryResult:
    """The outcome of one prompt on one composite under one assignment mode."""

    composite: int  # composite index
    prompt: str  # the query text (the class caption)
    class_name: str  # display name of the prompted class
    tile: int  # tile of the prompted class (0..3)
    mode: str  # "plain" (argmax per prompt) or "one_to_one" (Hungarian)
    chosen: int | None  # index of the chosen segment among the proposals; None = no segment
    chosen_kind: str | None  # oracle segment kind ("object", "background", "partial"), "proposal" otherwise
    correct: bool  # object-level: the chosen segment is the prompted object (decided as `truth` says)
    truth: str  # how `correct` was decided: "mask" | "judge" | "oracle" | "tile" (module docstring)
    in_tile: float  # fraction of the chosen segment's area inside the prompted tile (0 without a choice)
    tile_correct: bool  # in_tile > IN_TILE (the old, lenient criterion)
    iou: float | None  # IoU of the chosen segment with the prompted object (ground-truth masks only)
    score: float | None  # cosine similarity of the chosen segment and the prompt
    judge_correct: bool | None = None  # the classifier judge names the prompted class (paper's scoring); None = no judge

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "QueryResult":
        return QueryResult(**data)


@dataclass(frozen=True)
class CompositeEval:
    """Everything scored on one composite: its proposals and the 4 x 2 query results."""

    composite: Composite
    masks: np.ndarray  # (N, H, W) bool proposals
    kinds: tuple[str, ...]  # kind of each proposal
    similarity: np.ndarray  # (N, 4) float32, proposals x prompts (tile order)
    results: tuple[QueryResult, ...]  # 4 queries x 2 modes, plain first
    absent_scores: tuple[float | None, ...] = ()  # best similarity of each absent prompt; None = no segments


class TextCache:
    """Encodes each distinct prompt once for a ranker."""

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker
        self._rows: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        if missing:
            self._rows.update(zip(missing, self.ranker.encode_texts(missing).float()))
        return torch.stack([self._rows[p] for p in prompts])


def evaluate_composite(composite: Composite, ranker: Ranker, *, proposer: Proposer | None = None,
                       crop: CropConfig = CropConfig(), oracle_seed: int = 0, texts: TextCache | None = None,
                       judge=None, absent: Sequence[str] = ()) -> CompositeEval:
    """Propose, embed, and score all 4 prompts of ``composite`` in both modes.

    ``judge`` (a :class:`slip.train.judge.Judge`) also scores each choice as the paper did: correct
    when the judge classifies the chosen segment's crop as the prompted class. ``absent``: captions of
    classes not in the composite; their best similarity (plain argmax) goes to ``absent_scores``.
    """
    # 1. proposals: the oracle's known segments, or the proposer's (SAM) segments
    if proposer is None:
        oracle = oracle_segments(composite, seed=oracle_seed)
        masks, kinds = oracle.masks, oracle.kinds
        segments = maskset_from_masks(torch.from_numpy(masks))
    else:
        segments = proposer(composite.image)
        masks = segments.masks.cpu().numpy()
        kinds = ("proposal",) * len(masks)
    # 2. prompts -> text embeddings; one crop per segment -> unit-norm image embeddings
    prompts = tuple(composite.prompts) + tuple(absent)
    text_emb = (texts or TextCache(ranker))(prompts)
    if len(segments):
        image_emb = ranker.encode_images(crop_segments(composite.image, segments, crop, ranker.image_size)).float()
    else:
        image_emb = torch.zeros((0, text_emb.shape[1]), device=text_emb.device)
    # 3. choose per prompt (plain, one-to-one: among the 4 present classes) and judge each choice
    truth = truth_rule(composite, oracle=proposer is None, judged=judge is not None)
    results, similarity = [], None
    for mode in MODES:
        similarity, matches = rank(image_emb, text_emb[:4].to(image_emb.device), composite.prompts, top_k=0,
                                   one_to_one=mode == "one_to_one")
        results += [score_choice(composite, masks, kinds, tile, m.index, m.score, mode, truth)
                    for tile, m in enumerate(matches)]
    if judge is not None:
        results = _classifier_judge(judge, composite, segments, crop, results)
    # 4. absent classes: how high does a class that is not there score?
    absent_scores = ()
    if absent:
        _, missing = rank(image_emb, text_emb[4:].to(image_emb.device), absent, top_k=0)
        absent_scores = tuple(m.score for m in missing)
    return CompositeEval(composite, masks, tuple(kinds), similarity.numpy(), tuple(results), absent_scores)


def truth_rule(composite: Composite, *, oracle: bool, judged: bool) -> str:
    """How object-level correctness is decided for this composite (see the module docstring)."""
    if composite.object_masks is not None:
        return "mask"
    return "judge" if judged else "oracle" if oracle else "tile"


def _classifier_judge(judge, composite: Composite, segments: MaskSet, crop: CropConfig,
                      results: list[QueryResult]) -> list[QueryResult]:
    """Fill ``judge_correct``: the judge's label of the chosen segment's crop equals the prompted class;
    it is also ``correct`` when the composite has no object masks (``truth == "judge"``)."""
    chosen = sorted({r.chosen for r in results if r.chosen is not None})
    labels = {}
    if chosen:
        pixels = crop_segments(composite.image, segments.select(torch.tensor(chosen)), crop, judge.image_size)
        labels = dict(zip(chosen, (judge.class_names[i] for i in judge.classify(pixels).tolist())))
    out = []
    for r in results:
        ok = r.chosen is not None and labels[r.chosen] == r.class_name
        out.append(replace(r, judge_correct=ok, correct=ok if r.truth == "judge" else r.correct))
    return out


def score_choice(composite: Composite, masks: np.ndarray, kinds: Sequence[str], tile: int, index: int | None,
                  score: float | None, mode: str, truth: str) -> QueryResult:
    """Score one choice: the object-level verdict, the fraction inside the prompted tile, the IoU."""
    in_tile, iou, correct = 0.0, None, False
    if index is not None:
        chosen = masks[index]
        area = int(chosen.sum())
        x0, y0, x1, y1 = composite.tile_boxes[tile]
        in_tile = float(chosen[y0:y1, x0:x1].sum()) / area if area else 0.0
        if truth == "oracle":
            correct = kinds[index] == "object" and in_tile == 1.0
        elif truth == "tile":
            correct = _iou(chosen, composite.tile_mask(tile)) > OBJECT_IOU
    if composite.object_masks is not None:
        iou = 0.0 if index is None else _iou(masks[index], composite.object_masks[tile])
        correct = iou > OBJECT_IOU
    return QueryResult(
        composite=composite.index, prompt=composite.prompts[tile], class_name=composite.class_names[tile],
        tile=tile, mode=mode, chosen=index, chosen_kind=None if index is None else kinds[index], correct=correct,
        truth=truth, in_tile=in_tile, tile_correct=in_tile > IN_TILE, iou=iou, score=score,
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def evaluate(ranker: Ranker, composites: Iterable[Composite], *, proposer: Proposer | None = None,
             crop: CropConfig = CropConfig(), oracle_seed: int = 0, progress: bool = False,
             keep: Callable[[CompositeEval], None] | None = None, judge=None) -> list[QueryResult]:
    """Score every composite; returns all query results (4 per composite and mode).

    ``keep`` sees each :class:`CompositeEval` (e.g. to collect gallery items) before it is dropped.
    """
    texts = TextCache(ranker)
    results: list[QueryResult] = []
    for composite in progress_bar(composites, desc="evaluate", unit="composite", enabled=progress):
        done = evaluate_composite(composite, ranker, proposer=proposer, crop=crop, oracle_seed=oracle_seed, texts=texts,
                                  judge=judge)
        results.extend(done.results)
        if keep is not None:
            keep(done)
    return results


def _rate(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def summarize(results: Iterable[QueryResult]) -> dict:
    """Per mode: composites, queries, correct, ``accuracy`` (object-level, the headline),
    ``tile_accuracy``, ``truth`` (how correctness was decided: counts), per-class accuracy, mean IoU,
    IoU > 0.5 accuracy, kinds chosen, judge accuracy.

    Accepts results from any number of chunks (fan-out); counts add up, so the order does not matter.
    """
    out = {}
    results = list(results)
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        per_class: dict[str, dict] = {}
        for r in rows:
            entry = per_class.setdefault(r.class_name, {"queries": 0, "correct": 0, "tile_correct": 0})
            entry["queries"] += 1
            entry["correct"] += int(r.correct)
            entry["tile_correct"] += int(r.tile_correct)
        for entry in per_class.values():
            entry["accuracy"] = entry["correct"] / entry["queries"]
            entry["tile_accuracy"] = entry["tile_correct"] / entry["queries"]
        ious = [r.iou for r in rows if r.iou is not None]
        kinds, truths = Counter(str(r.chosen_kind) for r in rows), Counter(r.truth for r in rows)
        correct = sum(r.correct for r in rows)
        out[mode] = {
            "composites": len({r.composite for r in rows}),
            "queries": len(rows),
            "correct": correct,
            "accuracy": correct / len(rows) if rows else 0.0,
            "tile_accuracy": _rate([r.tile_correct for r in rows]) or 0.0,
            "truth": dict(sorted(truths.items())),
            "per_class": dict(sorted(per_class.items())),
            "mean_iou": float(np.mean(ious)) if ious else None,
            "iou50_accuracy": _rate([i > OBJECT_IOU for i in ious]),
            "chosen_kinds": dict(sorted(kinds.items())),
            "judge_accuracy": _rate([r.judge_correct for r in rows if r.judge_correct is not None]),
        }
    return out


# --- several rankers on one dataset (slip evaluate-local) ---------------------------------------------


@dataclass
class RankerRun:
    """One ranker's evaluation: summary, training curve (when its directory has one), gallery."""

    spec: str  # the ranker spec string
    summary: dict  # summarize() of its query results
    curve: dict | None = None  # curve.json of the ranker's directory, if any
    gallery: list = field(default_factory=list)  # slip.report.GalleryItem of the first composites
    seconds: float = 0.0  # wall-clock evaluation time
    split: str = "val"  # which images the composites came from (slip.data.composites.SPLITS)

    def to_json(self) -> dict:
        return {"spec": self.spec, "split": self.split, "summary": self.summary, "curve": self.curve,
                "seconds": round(self.seconds, 2)}


def composite_source(dataset: str | Path, *, seed: int = 0, split_seed: int = 0, caption_template: str = "{name}",
                     tile_size: int = 128, val_fraction: float = 0.2, split: str = "val") -> CompositeSource:
    """The seeded composites over the ``split`` images of ``dataset``.

    ``split="val"``: the validation part of the training split (``split_seed``, ``val_fraction`` as in
    training; these images also chose the checkpoint); ``"all"``: every image (a dataset training never
    saw, e.g. synthetic data of another seed: the honest test).
    """
    folder = scan_folder(dataset, caption_template=caption_template)
    records = heldout_records(folder, split, val_fraction=val_fraction, split_seed=split_seed)
    return CompositeSource(folder, records, seed=seed, tile_size=tile_size)


def sam_proposer(sam, *, device: str = "auto", cache_dir: Path | None = None, generator: dict | None = None,
                 filters: str | None = None) -> Proposer:
    """SAM's automatic masks after the annotation filters, memoised per composite image.

    ``sam``: a SAM 1 / SAM 2 spec string (loaded here) or a loaded :class:`slip.proposers.loading.ProposerModel`
    (or :class:`slip.sam.SamBundle`). Generator options and
    the filter chain are resolved by :func:`slip.request.resolve_proposals`: ``generator`` / ``filters``
    given explicitly > the checkpoint's generator.json / filters.json > SAM's and the paper's defaults.
    """
    from slip.filters import apply_filters, parse_filters
    from slip.options import SegmentOptions
    from slip.proposers.loading import load_proposer_model, mask_generator_for
    from slip.request import chain_text, resolve_proposals

    bundle = load_proposer_model(sam, device=device, cache_dir=cache_dir) if isinstance(sam, str) else sam
    explicit = SegmentOptions.parse({**(generator or {}), "filters": filters})
    options, chain = resolve_proposals(explicit, sam_spec=bundle.ref.spec, sam_generator=bundle.generator,
                                       sam_filters=bundle.filters)
    mask_generator = mask_generator_for(bundle.model, **options.to_json())
    chain = parse_filters(chain_text(chain))
    memo: dict[bytes, MaskSet] = {}

    def propose(image: np.ndarray) -> MaskSet:
        key = hashlib.sha1(image.tobytes()).digest()
        if key not in memo:
            memo[key] = apply_filters(mask_generator.generate_masks(image), chain)[0].to("cpu")
        return memo[key]

    return propose


def evaluate_rankers(dataset: str | Path, specs: Sequence[str], *, composites: int = 200, seed: int = 0,
                     split_seed: int = 0, caption_template: str = "{name}", tile_size: int = 128,
                     proposals: str = "oracle", sam: str = "synth", device: str = "auto",
                     cache_dir: Path | None = None, progress: bool = False, gallery: int = 6,
                     judge: str | Path | None = None, generator: dict | None = None,
                     filters: str | None = None, split: str = "val") -> list[RankerRun]:
    """Score each ranker spec on the same ``composites`` seeded composites; see :func:`evaluate`.

    ``split``: ``"val"`` (the training split's validation images) or ``"all"`` (every image of a dataset
    training never saw); see :func:`composite_source`.
    ``judge``: a directory written by ``slip train-judge``; adds the paper's classifier-judged accuracy.
    ``generator`` (MaskGenerator keyword overrides, over the SAM's generator.json) and ``filters`` (the filter
    chain; None = the SAM's filters.json chain, else the paper's ``containment``) apply to ``proposals="sam"``.
    """
    from slip.rankers.loading import load_ranker
    from slip.report import gallery_item

    if proposals not in ("oracle", "sam"):
        raise ConfigError(f"proposals must be oracle or sam, got {proposals!r}")
    if composites < 1:
        raise ConfigError(f"need at least 1 composite, got {composites}")
    source = composite_source(dataset, seed=seed, split_seed=split_seed, caption_template=caption_template,
                              tile_size=tile_size, split=split)
    items = source.take(composites)
    proposer = None
    if proposals == "sam":
        proposer = sam_proposer(sam, device=device, cache_dir=cache_dir, generator=generator, filters=filters)
    if judge is not None:
        from slip.train.judge import load_judge

        judge = load_judge(judge, device=device)
    runs = []
    for spec in specs:
        start = time.perf_counter()
        ranker = load_ranker(spec, device=device, cache_dir=cache_dir)
        kept: list = []
        keep = (lambda ev: kept.append(gallery_item(ev, ranker=spec)) if len(kept) < gallery else None)
        results = evaluate(ranker, items, proposer=proposer, progress=progress, keep=keep, judge=judge)
        runs.append(RankerRun(spec=spec, summary=summarize(results), curve=_curve_of(spec), gallery=kept,
                              seconds=time.perf_counter() - start, split=split))
    return runs


def _curve_of(spec: str) -> dict | None:
    path = Path(spec) / "curve.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def format_table(runs: Sequence[RankerRun]) -> str:
    """A plain-text accuracy table, one row per ranker: object-level accuracy (plain, one-to-one) first,
    then the lenient tile accuracy, the mean IoU with the true object, and the judge's accuracy if scored."""
    judged = any(run.summary["plain"].get("judge_accuracy") is not None for run in runs)
    head = (f"{'ranker':<44} {'queries':>7} {'object':>7} {'1-to-1':>7} {'tile':>7} {'mean IoU':>9}"
            + (f" {'judge':>7}" if judged else ""))
    lines = [head, "-" * len(head)]
    for run in runs:
        plain, one = run.summary["plain"], run.summary["one_to_one"]
        iou = "-" if plain["mean_iou"] is None else f"{plain['mean_iou']:.3f}"
        name = run.spec if len(run.spec) <= 44 else "..." + run.spec[-41:]
        row = (f"{name:<44} {plain['queries']:>7} {plain['accuracy']:>7.1%} {one['accuracy']:>7.1%} "
               f"{plain['tile_accuracy']:>7.1%} {iou:>9}")
        if judged:
            row += f" {plain['judge_accuracy']:>6.1%}" if plain.get("judge_accuracy") is not None else f" {'-':>7}"
        lines.append(row)
    truth = sorted({t for run in runs for t in run.summary["plain"].get("truth", {})})
    lines.append(f"object = the chosen segment is the prompted object (decided by: {', '.join(truth) or '-'}); "
                 f"tile = it lies mostly in the prompted tile")
    return "\n".join(lines)
