"""Annotation filters: prune and reshape SAM's proposals before they are cropped and ranked.

SAM's automatic generator proposes every segment it can find: whole objects, their parts, the
background, and near-duplicates. The SLIP paper post-processes them with "annotation filters which
separate out the intersecting segments without losing any relevant information". The default here,
:class:`Containment`, is that filter: a segment lying (mostly) inside a larger kept one is dropped,
then the largest segment is dropped as background.

Every filter is a small frozen dataclass with a ``name`` and ``params()`` (JSON-serialisable), defined
with its parameters in :mod:`slip.filter_chain` (re-exported here, with :func:`parse_filters`);
:func:`run_filter` runs its implementation here on a MaskSet, which keeps the surviving rows in their original order on
the input's device. :func:`apply_filters` runs a sequence and records a :class:`~slip.types.FilterStat`
per filter.

Overlaps are computed cheaply (see :func:`pairwise_intersections`): tight boxes first, then pixel
intersections only for pairs whose boxes overlap, each counted inside the smaller box.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from slip.filter_chain import FILTERS, Containment, Dedup, Disjoint, Filter, MinArea, parse_filters  # noqa: F401
from slip.types import FilterStat, MaskSet

_CHUNK_PIXELS = 1 << 26  # at most this many mask pixels are gathered at once (64 MiB of bool)


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


# --- implementations -----------------------------------------------------------------------------------


def _containment(f: Containment, segments: MaskSet) -> MaskSet:
    return _keep(segments, containment_keep(f, pairwise_intersections(segments.masks).numpy()))


def containment_keep(f: Containment, inter: np.ndarray) -> np.ndarray:
    """``(N, N)`` intersection matrix (diagonal = areas) -> ``(N,) bool`` rows to keep."""
    n = len(inter)
    areas = np.diag(inter).astype(np.int64)
    by_area = np.lexsort((np.arange(n), -areas))  # largest first, ties by lower index
    order = by_area if f.keep == "parent" else np.lexsort((np.arange(n), areas))
    keep = np.zeros(n, dtype=bool)
    for rank, i in enumerate(order):
        kept = order[:rank][keep[order[:rank]]]
        if f.keep == "parent":  # is i inside a kept larger segment?
            inside = inter[i, kept] > f.threshold * areas[i]
        else:  # does i contain a kept smaller segment?
            inside = inter[i, kept] > f.threshold * areas[kept]
        keep[i] = not inside.any()
    if f.drop_largest and keep.any():
        keep[by_area[keep[by_area]][0]] = False
    return keep


def _min_area(f: MinArea, segments: MaskSet) -> MaskSet:
    return _keep(segments, (segments.areas >= f.pixels).cpu().numpy())


def _dedup(f: Dedup, segments: MaskSet) -> MaskSet:
    inter = pairwise_intersections(segments.masks).numpy().astype(np.float64)
    areas = np.diag(inter)
    union = areas[:, None] + areas[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    keep = np.zeros(len(inter), dtype=bool)
    for i in _by_score(segments):
        keep[i] = not (iou[i, keep] > f.iou).any()
    return _keep(segments, keep)


def _disjoint(f: Disjoint, segments: MaskSet) -> MaskSet:
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


IMPLEMENTATIONS: dict[type, Callable[..., MaskSet]] = {
    Containment: _containment, MinArea: _min_area, Dedup: _dedup, Disjoint: _disjoint,
}


def run_filter(f: Filter, segments: MaskSet) -> MaskSet:
    """Apply one filter spec to ``segments``."""
    return IMPLEMENTATIONS[type(f)](f, segments)


def _by_score(segments: MaskSet) -> list[int]:
    """Row indices by ``predicted_iou``, best first, ties by lower index."""
    scores = segments.predicted_iou.detach().cpu().double().numpy()
    return np.lexsort((np.arange(len(scores)), -scores)).tolist()


# --- running -----------------------------------------------------------------------------------------


def default_filters() -> tuple[Filter, ...]:
    """The paper's setting: ``(Containment(),)``."""
    return (Containment(),)


def apply_filters(segments: MaskSet, filters: Sequence[Filter]) -> tuple[MaskSet, tuple[FilterStat, ...]]:
    """Run ``filters`` in order; returns the kept segments and one :class:`FilterStat` per filter."""
    stats = []
    for f in filters:
        before = len(segments)
        segments = run_filter(f, segments)
        stats.append(FilterStat(name=f.name, params=f.params(), before=before, removed=before - len(segments)))
    return segments, tuple(stats)
