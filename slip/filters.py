"""Annotation filters: prune and reshape SAM's proposals before they are cropped and ranked.

SAM's automatic generator proposes every segment it can find: whole objects, their parts, the
background, and near-duplicates. The SLIP paper post-processes them with "annotation filters which
separate out the intersecting segments without losing any relevant information". The default here,
:class:`Containment`, is that filter: a segment lying (mostly) inside a larger kept one is dropped,
then the largest segment is dropped as background.

Every filter is a small frozen dataclass with a ``name``, ``params()`` (JSON-serialisable) and
``__call__(MaskSet) -> MaskSet``; the result keeps the surviving rows in their original order and
stays on the input's device. :func:`apply_filters` runs a sequence and records a
:class:`~slip.types.FilterStat` per filter; :func:`parse_filters` builds one from a CLI string.

Overlaps are computed cheaply (see :func:`pairwise_intersections`): tight boxes first, then pixel
intersections only for pairs whose boxes overlap, each counted inside the smaller box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from slip.errors import ConfigError
from slip.types import FilterStat, MaskSet

_CHUNK_PIXELS = 1 << 26  # at most this many mask pixels are gathered at once (64 MiB of bool)


class Filter(Protocol):
    """What :func:`apply_filters` expects of a filter."""

    name: str

    def params(self) -> dict: ...

    def __call__(self, segments: MaskSet) -> MaskSet: ...


# --- geometry ---------------------------------------------------------------------------------------


def tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W) bool`` -> ``(N, 4) int64`` inclusive XYXY pixel boxes; empty masks get ``(0, 0, -1, -1)``.

    O(N·H·W) time, computed from the masks themselves (never trusts stale ``MaskSet.boxes``).
    """
    n, h, w = masks.shape
    as_bytes = masks.view(torch.uint8)  # amax over uint8 is ~2x faster than any() over bool on CPU
    rows, cols = as_bytes.amax(2) > 0, as_bytes.amax(1) > 0  # (N, H), (N, W)
    y1 = rows.int().argmax(1)
    y2 = h - 1 - rows.flip(1).int().argmax(1)
    x1 = cols.int().argmax(1)
    x2 = w - 1 - cols.flip(1).int().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).long()
    empty = ~rows.any(1)
    boxes[empty] = torch.tensor([0, 0, -1, -1], device=masks.device)
    return boxes


def candidate_pairs(boxes: torch.Tensor) -> torch.Tensor:
    """Inclusive ``(N, 4)`` XYXY boxes -> ``(K, 2) int64`` CPU pairs ``(i, j)``, ``i != j``, whose boxes overlap.

    Each unordered pair appears once, ordered so that box ``i`` is the smaller (ties: lower index),
    which is where their intersection is counted. O(N²) box tests with :func:`torchvision.ops.box_iou`.
    """
    boxes = boxes.cpu()
    valid = torch.nonzero(boxes[:, 2] >= boxes[:, 0]).flatten()  # non-empty masks only
    if len(valid) < 2:
        return torch.zeros((0, 2), dtype=torch.long)
    half_open = boxes[valid].double() + torch.tensor([0, 0, 1, 1], dtype=torch.double)
    overlap = box_iou(half_open, half_open) > 0  # (M, M), symmetric
    area = (half_open[:, 2] - half_open[:, 0]) * (half_open[:, 3] - half_open[:, 1])
    order_key = area * (len(valid) + 1) + torch.arange(len(valid), dtype=torch.double)
    smaller_first = order_key[:, None] < order_key[None, :]  # i's box is the smaller one
    i, j = torch.nonzero(overlap & smaller_first, as_tuple=True)
    return torch.stack([valid[i], valid[j]], 1)


def pairwise_intersections(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W) bool`` -> ``(N, N) int64`` CPU matrix of pixel intersections; the diagonal is the areas.

    Complexity: two O(N·H·W) reductions for the tight boxes, O(N²) box tests, then for each mask
    ``i`` one batched AND+count over ``i`` itself and the candidates ``C_i`` whose (larger) boxes
    overlap its box, cropped to ``box_i``: O(Σ_i (1 + |C_i|)·|box_i|). That reaches the brute-force
    O(N²·H·W) only when every box covers the whole image; SAM's proposals are mostly small and far
    apart, so it is usually far less. Works on any device: the counts are computed where the masks live.
    """
    n = masks.shape[0]
    inter = torch.zeros((n, n), dtype=torch.long)
    boxes = tight_boxes(masks).cpu()
    pairs = candidate_pairs(boxes)
    firsts, seconds, counts = [], [], []  # counts stay on the device until the end: one sync, not N
    for i in range(n):
        x1, y1, x2, y2 = boxes[i].tolist()
        if x2 < x1:
            continue  # empty mask: area 0, intersects nothing
        rows = torch.cat([torch.tensor([i]), pairs[pairs[:, 0] == i, 1]])  # i itself gives its area
        window = masks[:, y1 : y2 + 1, x1 : x2 + 1]  # a view; only these rows are gathered below
        chunk = max(1, _CHUNK_PIXELS // window[0].numel())
        for part in rows.split(chunk):
            counts.append((window[part.to(masks.device)] & window[i]).flatten(1).sum(1))
            firsts.append(torch.full_like(part, i))
            seconds.append(part)
    if counts:
        i, j, c = torch.cat(firsts), torch.cat(seconds), torch.cat(counts).cpu()
        inter[i, j] = c
        inter[j, i] = c
    return inter


def _keep(segments: MaskSet, keep: np.ndarray) -> MaskSet:
    """Rows where ``keep`` ((N,) bool numpy) is true, in their original order, on the same device."""
    index = torch.from_numpy(np.flatnonzero(keep)).to(segments.masks.device)
    return segments.select(index)


# --- filters ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Containment:
    """Drop segments nested in others (the SLIP paper's filter), then the largest one as background.

    ``keep="parent"`` (default): segments are visited by area, largest first (ties: lower index); one
    is dropped when its intersection with an already KEPT larger segment exceeds ``threshold`` of its
    own area. ``keep="child"``: visited smallest first; a segment is dropped when a KEPT smaller
    segment lies inside it by the same measure (the parent goes, the part stays).
    ``drop_largest``: afterwards the largest surviving segment is dropped as the background.
    Without ``drop_largest`` the filter is idempotent; with it, a second pass drops the next largest.

    The authors' notebook (``filter_annotations`` then ``pop(0)``) differs in two details: there a
    segment already dropped can still drop smaller ones, and equal-area segments never drop each other
    (so exact duplicates both survive); here only kept segments count and ties go to the lower index.
    Beware: with ``keep="parent"`` a whole-image proposal contains every object, so all of them go and
    then it goes as background, leaving nothing; use ``keep="child"`` for proposals that include one.
    """

    threshold: float = 0.8  # fraction of the smaller segment's area that must lie inside the other
    drop_largest: bool = True  # drop the largest surviving segment as background
    keep: str = "parent"  # "parent": keep the container; "child": keep the contained part

    name = "containment"

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"containment threshold must be in [0, 1], got {self.threshold}")
        if self.keep not in ("parent", "child"):
            raise ConfigError(f"containment keep must be 'parent' or 'child', got {self.keep!r}")

    def params(self) -> dict:
        return asdict(self)

    def __call__(self, segments: MaskSet) -> MaskSet:
        return _keep(segments, self.keep_mask(pairwise_intersections(segments.masks).numpy()))

    def keep_mask(self, inter: np.ndarray) -> np.ndarray:
        """``(N, N)`` intersection matrix (diagonal = areas) -> ``(N,) bool`` rows to keep."""
        n = len(inter)
        areas = np.diag(inter).astype(np.int64)
        by_area = np.lexsort((np.arange(n), -areas))  # largest first, ties by lower index
        order = by_area if self.keep == "parent" else np.lexsort((np.arange(n), areas))
        keep = np.zeros(n, dtype=bool)
        for rank, i in enumerate(order):
            kept = order[:rank][keep[order[:rank]]]
            if self.keep == "parent":  # is i inside a kept larger segment?
                inside = inter[i, kept] > self.threshold * areas[i]
            else:  # does i contain a kept smaller segment?
                inside = inter[i, kept] > self.threshold * areas[kept]
            keep[i] = not inside.any()
        if self.drop_largest and keep.any():
            keep[by_area[keep[by_area]][0]] = False
        return keep


@dataclass(frozen=True)
class MinArea:
    """Drop segments smaller than ``pixels``."""

    pixels: int = 0  # minimum area in pixels; a segment with exactly this many is kept

    name = "min_area"

    def __post_init__(self) -> None:
        if self.pixels < 0:
            raise ConfigError(f"min_area must be >= 0 pixels, got {self.pixels}")

    def params(self) -> dict:
        return asdict(self)

    def __call__(self, segments: MaskSet) -> MaskSet:
        return _keep(segments, (segments.areas >= self.pixels).cpu().numpy())


@dataclass(frozen=True)
class Dedup:
    """Greedy mask NMS: of two segments with mask IoU above ``iou``, keep the higher ``predicted_iou``.

    Segments are visited by ``predicted_iou``, best first (ties: lower index); one is dropped when its
    IoU with an already kept segment exceeds ``iou``. Idempotent.
    """

    iou: float = 0.9  # mask IoU above which two segments count as duplicates

    name = "dedup"

    def __post_init__(self) -> None:
        if not 0.0 <= self.iou <= 1.0:
            raise ConfigError(f"dedup iou must be in [0, 1], got {self.iou}")

    def params(self) -> dict:
        return asdict(self)

    def __call__(self, segments: MaskSet) -> MaskSet:
        inter = pairwise_intersections(segments.masks).numpy().astype(np.float64)
        areas = np.diag(inter)
        union = areas[:, None] + areas[None, :] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        keep = np.zeros(len(inter), dtype=bool)
        for i in _by_score(segments):
            keep[i] = not (iou[i, keep] > self.iou).any()
        return _keep(segments, keep)


@dataclass(frozen=True)
class Disjoint:
    """Make segments pairwise disjoint; each overlapping pixel goes to the better-scored segment.

    Scores are ``predicted_iou`` (ties: lower index). The union of all masks is unchanged; segments
    left with no pixels are removed (and counted as removed); boxes are recomputed. Idempotent.
    Cost: O(N·H·W) worst case, in practice O(Σ_i |box_i|), with one ``(H, W)`` scratch mask.
    """

    name = "disjoint"

    def params(self) -> dict:
        return {}

    def __call__(self, segments: MaskSet) -> MaskSet:
        masks = segments.masks.clone()
        claimed = torch.zeros(segments.image_size, dtype=torch.bool, device=masks.device)
        boxes = tight_boxes(masks).cpu()
        for i in _by_score(segments):
            x1, y1, x2, y2 = boxes[i].tolist()
            if x2 < x1:
                continue  # already empty
            window = (slice(y1, y2 + 1), slice(x1, x2 + 1))
            own = masks[i][window] & ~claimed[window]
            claimed[window] |= masks[i][window]
            masks[i][window] = own
        nonempty = masks.flatten(1).any(1).cpu().numpy()
        return _keep(segments.with_masks(masks), nonempty)


def _by_score(segments: MaskSet) -> list[int]:
    """Row indices by ``predicted_iou``, best first, ties by lower index."""
    scores = segments.predicted_iou.detach().cpu().double().numpy()
    return np.lexsort((np.arange(len(scores)), -scores)).tolist()


# --- running and parsing ----------------------------------------------------------------------------


def default_filters() -> tuple[Filter, ...]:
    """The paper's setting: ``(Containment(),)``."""
    return (Containment(),)


def apply_filters(segments: MaskSet, filters: Sequence[Filter]) -> tuple[MaskSet, tuple[FilterStat, ...]]:
    """Run ``filters`` in order; returns the kept segments and one :class:`FilterStat` per filter."""
    stats = []
    for f in filters:
        before = len(segments)
        segments = f(segments)
        stats.append(FilterStat(name=f.name, params=f.params(), before=before, removed=before - len(segments)))
    return segments, tuple(stats)


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"not a boolean: {text!r}")
    return lowered in ("true", "1", "yes")


# name -> (constructor, ordered parameter names, parameter parsers)
FILTERS: dict[str, tuple[Callable[..., Filter], tuple[str, ...], dict[str, Callable[[str], object]]]] = {
    "containment": (Containment, ("threshold", "keep", "drop_largest"),
                    {"threshold": float, "keep": str, "drop_largest": _to_bool}),
    "min_area": (MinArea, ("pixels",), {"pixels": int}),
    "dedup": (Dedup, ("iou",), {"iou": float}),
    "disjoint": (Disjoint, (), {}),
}


def parse_filters(spec: str) -> tuple[Filter, ...]:
    """A CLI string -> filters, e.g. ``"containment:0.8,min_area:50,disjoint"``.

    Items are comma-separated, ``name[:arg[:arg...]]``; an argument is positional or ``key=value``,
    e.g. ``"containment:0.9:keep=child:drop_largest=false"``. ``"none"`` means no filters.
    Raises :class:`~slip.errors.ConfigError` naming the bad item.
    """
    if spec.strip().lower() == "none":
        return ()
    if not spec.strip():
        raise ConfigError("empty filter spec: give e.g. 'containment:0.8,disjoint', or 'none' for no filters")
    return tuple(_parse_item(item.strip()) for item in spec.split(","))


def _parse_item(item: str) -> Filter:
    name, *args = item.split(":")
    if name not in FILTERS:
        raise ConfigError(f"unknown filter {name!r} in {item!r}: use one of {', '.join(FILTERS)}")
    build, names, parsers = FILTERS[name]
    kwargs: dict[str, object] = {}
    for position, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if not sep:
            if position >= len(names):
                raise ConfigError(f"filter {item!r}: {name} takes at most {len(names)} argument(s)")
            key, value = names[position], arg
        if key not in parsers:
            raise ConfigError(f"filter {item!r}: {name} has no parameter {key!r} (has: {', '.join(names) or 'none'})")
        if key in kwargs:
            raise ConfigError(f"filter {item!r}: parameter {key!r} given twice")
        try:
            kwargs[key] = parsers[key](value)
        except ValueError as e:
            raise ConfigError(f"filter {item!r}: bad value {value!r} for {key}") from e
    return build(**kwargs)
