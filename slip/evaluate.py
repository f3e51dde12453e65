"""Judge-free scoring of a ranker on 2x2 composites: the paper's protocol, corrected.

For every composite **each** of its 4 class captions is queried (the paper's notebook scored only the
last query of each composite). A query is correct when the chosen segment lies mostly (more than
``IN_TILE`` of its area) inside the tile of the prompted class. With ground-truth object masks
(synthetic data) the IoU of the chosen segment with the prompted object is reported too, and
``iou50_accuracy`` counts queries whose chosen segment has IoU > 0.5 with it.

Every composite is scored twice from one similarity matrix: plain argmax per prompt
(``one_to_one=False``) and with the Hungarian one-to-one assignment (``one_to_one=True``).

Proposals are either the oracle segments (:func:`slip.data.composites.oracle_segments`), which
isolate the ranker as the paper intended, or any ``proposer(image) -> MaskSet`` (e.g. SAM + filters:
``lambda im: slip_pipeline.propose(im).segments``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from slip.crops import CropConfig, crop_segments
from slip.data.composites import Composite, CompositeSource, oracle_segments
from slip.data.dataset import maskset_from_masks
from slip.data.folder import scan_folder, split_records
from slip.errors import ConfigError
from slip.rankers.base import Ranker
from slip.ranking import rank
from slip.types import MaskSet

IN_TILE = 0.5  # a chosen segment must have more than this fraction of its area in the prompted tile
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
    in_tile: float  # fraction of the chosen segment's area inside the prompted tile (0 without a choice)
    correct: bool  # in_tile > IN_TILE
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
                       judge=None) -> CompositeEval:
    """Propose, embed, and score all 4 prompts of ``composite`` in both modes.

    ``judge`` (a :class:`slip.train.judge.Judge`) also scores each choice as the paper did: correct
    when the judge classifies the chosen segment's crop as the prompted class.
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
    text_emb = (texts or TextCache(ranker))(composite.prompts)
    if len(segments):
        image_emb = ranker.encode_images(crop_segments(composite.image, segments, crop, ranker.image_size)).float()
    else:
        image_emb = torch.zeros((0, text_emb.shape[1]), device=text_emb.device)
    # 3. choose per prompt (plain, one-to-one) and judge each choice against the tiles
    results, similarity = [], None
    for mode in MODES:
        similarity, matches = rank(image_emb, text_emb.to(image_emb.device), composite.prompts, top_k=0,
                                   one_to_one=mode == "one_to_one")
        results += [_score_choice(composite, masks, kinds, tile, m.index, m.score, mode) for tile, m in enumerate(matches)]
    if judge is not None:
        results = _classifier_judge(judge, composite, segments, crop, results)
    return CompositeEval(composite, masks, tuple(kinds), similarity.numpy(), tuple(results))


def _classifier_judge(judge, composite: Composite, segments: MaskSet, crop: CropConfig,
                      results: list[QueryResult]) -> list[QueryResult]:
    """Fill ``judge_correct``: the judge's label of the chosen segment's crop equals the prompted class."""
    chosen = sorted({r.chosen for r in results if r.chosen is not None})
    labels = {}
    if chosen:
        pixels = crop_segments(composite.image, segments.select(torch.tensor(chosen)), crop, judge.image_size)
        labels = dict(zip(chosen, (judge.class_names[i] for i in judge.classify(pixels).tolist())))
    return [replace(r, judge_correct=r.chosen is not None and labels[r.chosen] == r.class_name) for r in results]


def _score_choice(composite: Composite, masks: np.ndarray, kinds: Sequence[str], tile: int, index: int | None,
           score: float | None, mode: str) -> QueryResult:
    """Score one choice: fraction inside the prompted tile, and IoU with the prompted object."""
    in_tile, iou = 0.0, None
    if index is not None:
        chosen = masks[index]
        area = int(chosen.sum())
        x0, y0, x1, y1 = composite.tile_boxes[tile]
        in_tile = float(chosen[y0:y1, x0:x1].sum()) / area if area else 0.0
    if composite.object_masks is not None:
        iou = 0.0 if index is None else _iou(masks[index], composite.object_masks[tile])
    return QueryResult(
        composite=composite.index, prompt=composite.prompts[tile], class_name=composite.class_names[tile],
        tile=tile, mode=mode, chosen=index, chosen_kind=None if index is None else kinds[index],
        in_tile=in_tile, correct=in_tile > IN_TILE, iou=iou, score=score,
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
    for composite in tqdm(composites, desc="evaluate", unit="composite", disable=not progress):
        done = evaluate_composite(composite, ranker, proposer=proposer, crop=crop, oracle_seed=oracle_seed, texts=texts,
                                  judge=judge)
        results.extend(done.results)
        if keep is not None:
            keep(done)
    return results


def summarize(results: Iterable[QueryResult]) -> dict:
    """Per mode: composites, queries, correct, accuracy, per-class accuracy, mean IoU, kinds chosen.

    Accepts results from any number of chunks (fan-out); counts add up, so the order does not matter.
    """
    out = {}
    results = list(results)
    for mode in MODES:
        rows = [r for r in results if r.mode == mode]
        per_class: dict[str, dict] = {}
        for r in rows:
            entry = per_class.setdefault(r.class_name, {"queries": 0, "correct": 0})
            entry["queries"] += 1
            entry["correct"] += int(r.correct)
        for entry in per_class.values():
            entry["accuracy"] = entry["correct"] / entry["queries"]
        ious = [r.iou for r in rows if r.iou is not None]
        kinds: dict[str, int] = {}
        for r in rows:
            kinds[str(r.chosen_kind)] = kinds.get(str(r.chosen_kind), 0) + 1
        correct = sum(r.correct for r in rows)
        judged = [r.judge_correct for r in rows if r.judge_correct is not None]
        out[mode] = {
            "composites": len({r.composite for r in rows}),
            "queries": len(rows),
            "correct": correct,
            "accuracy": correct / len(rows) if rows else 0.0,
            "per_class": dict(sorted(per_class.items())),
            "mean_iou": float(np.mean(ious)) if ious else None,
            "iou50_accuracy": float(np.mean([i > 0.5 for i in ious])) if ious else None,
            "chosen_kinds": dict(sorted(kinds.items())),
            "judge_accuracy": float(np.mean(judged)) if judged else None,
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

    def to_json(self) -> dict:
        return {"spec": self.spec, "summary": self.summary, "curve": self.curve, "seconds": round(self.seconds, 2)}


def composite_source(dataset: str | Path, *, seed: int = 0, split_seed: int = 0, caption_template: str = "{name}",
                     tile_size: int = 128, val_fraction: float = 0.2) -> CompositeSource:
    """The seeded composites over the held-out split of ``dataset`` (the split training used)."""
    folder = scan_folder(dataset, caption_template=caption_template)
    _, val = split_records(folder.records, val_fraction=val_fraction, seed=split_seed)
    return CompositeSource(folder, val, seed=seed, tile_size=tile_size)


def sam_proposer(sam, *, device: str = "auto", cache_dir: Path | None = None, generator: dict | None = None,
                 recommended: dict | None = None, filters: str | None = None,
                 recommended_filters: str | None = None) -> Proposer:
    """SAM's automatic masks after the annotation filters, memoised per composite image.

    ``sam``: a SAM spec string (loaded here) or an already loaded ``segment_anything`` model.
    ``recommended`` / ``recommended_filters``: the checkpoint's generator.json options / filters.json chain;
    None looks them up for a spec string (:func:`slip.sam.recommended_generator_params`,
    :func:`slip.sam.recommended_filters`) and means none for a loaded model.
    Generator options: SAM's defaults < ``recommended`` < ``generator`` (explicit overrides).
    Filter chain: the paper's ``containment`` < ``recommended_filters`` < ``filters`` (explicit).
    """
    from slip.filters import apply_filters, parse_filters
    from slip.generator import MaskGenerator
    from slip.sam import load_sam, recommended_generator_params, resolve_filters
    from slip.sam import recommended_filters as filters_of

    if isinstance(sam, str):
        if recommended is None:
            recommended = recommended_generator_params(sam, cache_dir=cache_dir)
        if recommended_filters is None:
            recommended_filters = filters_of(sam, cache_dir=cache_dir)
        sam = load_sam(sam, device=device, cache_dir=cache_dir)
    mask_generator = MaskGenerator(sam, **{**(recommended or {}), **(generator or {})})
    chain = parse_filters(resolve_filters(filters, recommended_filters))
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
                     filters: str | None = None) -> list[RankerRun]:
    """Score each ranker spec on the same ``composites`` seeded composites; see :func:`evaluate`.

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
                              tile_size=tile_size)
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
                              seconds=time.perf_counter() - start))
    return runs


def _curve_of(spec: str) -> dict | None:
    path = Path(spec) / "curve.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def format_table(runs: Sequence[RankerRun]) -> str:
    """A plain-text accuracy table: one row per ranker (and the paper's reference rows)."""
    judged = any(run.summary["plain"].get("judge_accuracy") is not None for run in runs)
    head = f"{'ranker':<44} {'queries':>7} {'accuracy':>9} {'1-to-1':>8} {'mean IoU':>9}" + (f" {'judge':>7}" if judged else "")
    lines = [head, "-" * len(head)]
    for run in runs:
        plain, one = run.summary["plain"], run.summary["one_to_one"]
        iou = "-" if plain["mean_iou"] is None else f"{plain['mean_iou']:.3f}"
        name = run.spec if len(run.spec) <= 44 else "..." + run.spec[-41:]
        row = f"{name:<44} {plain['queries']:>7} {plain['accuracy']:>8.1%} {one['accuracy']:>7.1%} {iou:>9}"
        if judged:
            row += f" {plain['judge_accuracy']:>6.1%}" if plain.get("judge_accuracy") is not None else f" {'-':>7}"
        lines.append(row)
    return "\n".join(lines)
