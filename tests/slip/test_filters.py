"""Annotation filters: hand-made scenes, brute-force references and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slip.errors import ConfigError
from slip.filters import (
    Containment,
    Dedup,
    Disjoint,
    MinArea,
    apply_filters,
    candidate_pairs,
    default_filters,
    pairwise_intersections,
    parse_filters,
    run_filter,
    tight_boxes,
)
from slip.types import MaskSet

SIZE = 16


def make_set(masks: torch.Tensor, scores=None) -> MaskSet:
    """A MaskSet whose point_coords[:, 0] holds each row's original index (to track rows)."""
    n = masks.shape[0]
    scores = torch.linspace(0.9, 0.5, n) if scores is None else torch.as_tensor(scores, dtype=torch.float32)
    ids = torch.arange(n, dtype=torch.float32)
    return MaskSet(
        masks=masks,
        boxes=torch.zeros((n, 4)),
        predicted_iou=scores,
        stability_score=torch.ones(n),
        point_coords=torch.stack([ids, ids], 1),
        crop_boxes=torch.zeros((n, 4)),
    ).with_masks(masks)


def ids(segments: MaskSet) -> list[int]:
    return segments.point_coords[:, 0].long().tolist()


def rect(h, w, y0, x0, y1, x1) -> torch.Tensor:
    m = torch.zeros((h, w), dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


@st.composite
def mask_sets(draw, max_n: int = 8, size: int = SIZE) -> MaskSet:
    """Random small sets mixing rectangles, noise, exact copies, sub-masks of earlier masks and empties."""
    n = draw(st.integers(0, max_n))
    masks = torch.zeros((n, size, size), dtype=torch.bool)
    coord = st.integers(0, size)
    for i in range(n):
        kind = draw(st.sampled_from(["rect", "rect", "noise", "copy", "sub", "empty"]))
        if kind in ("copy", "sub") and i == 0:
            kind = "rect"
        if kind == "rect":
            y0, y1 = sorted((draw(coord), draw(coord)))
            x0, x1 = sorted((draw(coord), draw(coord)))
            masks[i, y0:y1, x0:x1] = True
        elif kind == "noise":
            rng = np.random.default_rng(draw(st.integers(0, 2**16)))
            masks[i] = torch.from_numpy(rng.random((size, size)) < draw(st.sampled_from([0.1, 0.5, 0.9])))
        elif kind == "copy":
            masks[i] = masks[draw(st.integers(0, i - 1))]
        elif kind == "sub":
            y0, y1 = sorted((draw(coord), draw(coord)))
            x0, x1 = sorted((draw(coord), draw(coord)))
            masks[i, y0:y1, x0:x1] = masks[draw(st.integers(0, i - 1)), y0:y1, x0:x1]
    scores = draw(st.lists(st.sampled_from([0.5, 0.7, 0.9, 0.95]), min_size=n, max_size=n))
    return make_set(masks, scores)


def brute_intersections(masks: torch.Tensor) -> np.ndarray:
    flat = masks.flatten(1).numpy().astype(np.int64)
    return flat @ flat.T


def reference_containment(masks: torch.Tensor, threshold: float, keep: str, drop_largest: bool) -> list[int]:
    """Plain O(N² H W) containment, written independently of slip.filters."""
    inter = brute_intersections(masks)
    areas = np.diag(inter)
    n = len(areas)
    if keep == "parent":
        order = sorted(range(n), key=lambda i: (-areas[i], i))
    else:
        order = sorted(range(n), key=lambda i: (areas[i], i))
    kept: list[int] = []
    for i in order:
        if keep == "parent":
            inside = any(inter[i, k] > threshold * areas[i] for k in kept)
        else:
            inside = any(inter[i, k] > threshold * areas[k] for k in kept)
        if not inside:
            kept.append(i)
    if drop_largest and kept:
        kept.remove(min(kept, key=lambda i: (-areas[i], i)))
    return sorted(kept)


def same(a: MaskSet, b: MaskSet) -> bool:
    return a.masks.shape == b.masks.shape and bool((a.masks == b.masks).all()) and ids(a) == ids(b)


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IDEMPOTENT = [
    Containment(drop_largest=False),
    Containment(threshold=0.5, keep="child", drop_largest=False),
    Containment(threshold=0.0, drop_largest=False),
    MinArea(10),
    Dedup(0.9),
    Dedup(0.3),
    Disjoint(),
]


# --- geometry -------------------------------------------------------------------------------------------


@FAST
@given(mask_sets())
def test_pairwise_intersections_match_brute_force(segments):
    assert np.array_equal(pairwise_intersections(segments.masks).numpy(), brute_intersections(segments.masks))


def test_far_apart_masks_need_no_pixel_comparisons():
    masks = torch.stack([rect(64, 64, 0, 0, 8, 8), rect(64, 64, 20, 20, 30, 30), rect(64, 64, 50, 50, 64, 64)])
    assert len(candidate_pairs(tight_boxes(masks))) == 0
    overlapping = torch.stack([rect(64, 64, 0, 0, 8, 8), rect(64, 64, 7, 7, 9, 9), rect(64, 64, 50, 50, 64, 64)])
    assert candidate_pairs(tight_boxes(overlapping)).tolist() == [[1, 0]]  # counted inside the smaller box


def test_tight_boxes_are_inclusive_and_mark_empty_masks():
    masks = torch.stack([rect(10, 12, 2, 3, 5, 9), torch.zeros((10, 12), dtype=torch.bool)])
    assert tight_boxes(masks).tolist() == [[3, 2, 8, 4], [0, 0, -1, -1]]


# --- containment ------------------------------------------------------------------------------------------


def scene() -> torch.Tensor:
    """Background (complement of the objects), object A, a part of A, object B, a tiny speck in B."""
    a, part, b = rect(SIZE, SIZE, 1, 1, 9, 9), rect(SIZE, SIZE, 2, 2, 5, 5), rect(SIZE, SIZE, 10, 10, 15, 15)
    speck = rect(SIZE, SIZE, 11, 11, 12, 12)
    background = ~(a | b)
    return torch.stack([part, background, a, b, speck])


def test_paper_containment_keeps_whole_objects_and_drops_background():
    out, stats = apply_filters(make_set(scene()), default_filters())
    assert ids(out) == [2, 3]  # A and B; the part, the speck and the background are gone
    assert stats[0].name == "containment" and stats[0].before == 5 and stats[0].removed == 3
    assert stats[0].params == {"threshold": 0.8, "drop_largest": True, "keep": "parent"}


def test_child_containment_keeps_parts_and_drops_their_parents():
    out = run_filter(Containment(keep="child"), make_set(scene()))
    assert ids(out) == [0, 4]  # the part of A and the speck in B; A, B and the background are gone


def test_threshold_is_a_fraction_of_the_smaller_area():
    big = rect(SIZE, SIZE, 0, 0, 10, 10)
    half_in = rect(SIZE, SIZE, 0, 5, 4, 15)  # 40 px, 20 of them inside big
    masks = torch.stack([big, half_in])
    assert ids(run_filter(Containment(threshold=0.6, drop_largest=False), make_set(masks))) == [0, 1]
    assert ids(run_filter(Containment(threshold=0.4, drop_largest=False), make_set(masks))) == [0]


def test_whole_image_mask_with_keep_parent_swallows_everything():
    """Documented hazard of the paper's filter: a full-frame proposal contains every object."""
    masks = torch.cat([torch.ones((1, SIZE, SIZE), dtype=torch.bool), scene()[[2, 3]]])
    assert len(run_filter(Containment(), make_set(masks))) == 0
    assert ids(run_filter(Containment(keep="child", drop_largest=False), make_set(masks))) == [1, 2]


def test_single_segment_is_the_background():
    assert len(run_filter(Containment(), make_set(scene()[[2]]))) == 0
    assert len(run_filter(Containment(drop_largest=False), make_set(scene()[[2]]))) == 1


@FAST
@given(mask_sets(), st.sampled_from([0.0, 0.5, 0.8, 1.0]), st.sampled_from(["parent", "child"]), st.booleans())
def test_containment_removes_exactly_what_brute_force_says(segments, threshold, keep, drop_largest):
    out = run_filter(Containment(threshold=threshold, keep=keep, drop_largest=drop_largest), segments)
    assert ids(out) == reference_containment(segments.masks, threshold, keep, drop_largest)


@FAST
@given(mask_sets(), st.sampled_from([0.5, 0.8]))
def test_keep_parent_invariants(segments, threshold):
    out = run_filter(Containment(threshold=threshold, drop_largest=False), segments)
    inter, kept = brute_intersections(segments.masks), set(ids(out))
    areas = np.diag(inter)
    for i in range(len(segments)):
        others = [k for k in kept if k != i and (areas[k], -k) > (areas[i], -i)]
        contained = any(inter[i, k] > threshold * areas[i] for k in others)
        assert contained == (i not in kept)  # removed <=> inside a kept larger segment


@FAST
@given(mask_sets())
def test_drop_largest_twice_drops_the_next_largest(segments):
    once = run_filter(Containment(), segments)
    twice = run_filter(Containment(), once)
    if len(once) == 0:
        assert len(twice) == 0
        return
    areas = once.areas.tolist()
    largest = min(range(len(once)), key=lambda r: (-areas[r], r))
    assert ids(twice) == [i for r, i in enumerate(ids(once)) if r != largest]


# --- min area, dedup, disjoint ------------------------------------------------------------------------


def test_min_area_keeps_exactly_the_threshold():
    masks = torch.stack([rect(SIZE, SIZE, 0, 0, 3, 3), rect(SIZE, SIZE, 0, 0, 2, 5), rect(SIZE, SIZE, 0, 0, 1, 1)])
    assert ids(run_filter(MinArea(9), make_set(masks))) == [0, 1]  # 9 px and 10 px
    assert ids(run_filter(MinArea(10), make_set(masks))) == [1]
    assert ids(run_filter(MinArea(1), make_set(masks))) == [0, 1, 2]


def test_dedup_keeps_the_better_scored_duplicate():
    a = rect(SIZE, SIZE, 0, 0, 10, 10)
    near = rect(SIZE, SIZE, 0, 0, 10, 9)  # IoU 0.9 exactly: not above 0.9, kept
    other = rect(SIZE, SIZE, 12, 12, 16, 16)
    out = run_filter(Dedup(0.9), make_set(torch.stack([a, a.clone(), near, other]), scores=[0.7, 0.95, 0.8, 0.1]))
    assert ids(out) == [1, 2, 3]  # the copy with predicted_iou 0.95 beats the original
    assert ids(run_filter(Dedup(0.85), make_set(torch.stack([a, near]), scores=[0.7, 0.8]))) == [1]


def test_disjoint_hand_case():
    low, high = rect(SIZE, SIZE, 0, 0, 6, 6), rect(SIZE, SIZE, 3, 3, 9, 9)
    inside = rect(SIZE, SIZE, 4, 4, 5, 5)  # wholly inside `high`, worse score: emptied
    out, stats = apply_filters(make_set(torch.stack([low, high, inside]), scores=[0.5, 0.9, 0.1]), [Disjoint()])
    assert ids(out) == [0, 1] and stats[0].removed == 1
    assert bool((out.masks[1] == high).all()) and bool((out.masks[0] == (low & ~high)).all())
    assert out.boxes.tolist() == [[0.0, 0.0, 5.0, 5.0], [3.0, 3.0, 8.0, 8.0]]


@FAST
@given(mask_sets())
def test_disjoint_partitions_the_union_by_score(segments):
    out = run_filter(Disjoint(), segments)
    assert int(out.masks.long().sum(0).max()) <= 1 if len(out) else True  # pairwise disjoint
    union_in = segments.masks.any(0) if len(segments) else torch.zeros((SIZE, SIZE), dtype=torch.bool)
    union_out = out.masks.any(0) if len(out) else torch.zeros((SIZE, SIZE), dtype=torch.bool)
    assert bool((union_in == union_out).all())  # coverage unchanged
    assert bool(out.masks.flatten(1).any(1).all())  # no empty segment survives
    scores = segments.predicted_iou.tolist()
    for row, i in enumerate(ids(out)):  # each pixel belongs to the best-scored segment covering it
        for y, x in torch.nonzero(out.masks[row]).tolist():
            covering = [j for j in range(len(segments)) if segments.masks[j, y, x]]
            assert i == min(covering, key=lambda j: (-scores[j], j))


@FAST
@given(mask_sets(), st.sampled_from(IDEMPOTENT))
def test_filters_are_idempotent(segments, f):
    once = run_filter(f, segments)
    assert same(run_filter(f, once), once)


@FAST
@given(mask_sets(), st.lists(st.sampled_from(IDEMPOTENT + [Containment()]), max_size=4))
def test_stats_count_what_each_filter_removed(segments, filters):
    out, stats = apply_filters(segments, filters)
    expected, current = [], segments
    for f in filters:
        nxt = run_filter(f, current)
        expected.append((f.name, len(current), len(current) - len(nxt)))
        current = nxt
    assert [(s.name, s.before, s.removed) for s in stats] == expected
    assert same(out, current)
    assert len(out) == len(segments) - sum(s.removed for s in stats)


@pytest.mark.parametrize("f", IDEMPOTENT + [Containment()], ids=repr)
def test_empty_input(f):
    out, stats = apply_filters(MaskSet.empty(SIZE, SIZE), [f])
    assert len(out) == 0 and out.image_size == (SIZE, SIZE) and stats[0].removed == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("f", IDEMPOTENT + [Containment()], ids=repr)
def test_cuda_matches_cpu(f):
    segments = make_set(scene())
    out_gpu = run_filter(f, segments.to("cuda"))
    assert out_gpu.masks.device.type == "cuda"
    assert same(out_gpu.to("cpu"), run_filter(f, segments))


# --- parsing ----------------------------------------------------------------------------------------------


def test_parse_filters():
    assert parse_filters("containment:0.8,min_area:50,disjoint") == (Containment(0.8), MinArea(50), Disjoint())
    assert parse_filters("containment:0.9:keep=child:drop_largest=false") == (
        Containment(threshold=0.9, keep="child", drop_largest=False),
    )
    assert parse_filters(" dedup:iou=0.7 , containment ") == (Dedup(0.7), Containment())
    assert parse_filters("none") == ()
    assert all(isinstance(v, (int, float, str, bool)) for f in parse_filters("containment,dedup") for v in f.params().values())


@pytest.mark.parametrize(
    "spec",
    ["", "  ", "foo", "containment:abc", "containment:0.8:child:true:extra", "containment:keep=banana",
     "containment:threshold=0.5:threshold=0.6", "min_area:-1", "min_area:1.5", "dedup:iou=2", ",", "disjoint:1",
     "containment:drop_largest=maybe", "containment:colour=red"],
)
def test_parse_filters_rejects_bad_specs(spec):
    with pytest.raises(ConfigError):
        parse_filters(spec)
