"""Prompt-to-segment ranking: argmax, top-k, thresholds, instances, one-to-one assignment, edge cases.

Embeddings are built so the outcome is known: ``at_angles`` gives unit vectors in the plane whose
cosine similarity is the cosine of their angle difference. The same on real models (the bundled synth
pair on a drawn scene): tests/slip/test_instances.py.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slip.errors import ConfigError, PromptError
from slip.ranking import rank, validate_prompts


def at_angles(*degrees: float) -> torch.Tensor:
    """Unit vectors in the plane; the cosine of two of them is the cosine of their angle difference."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], 1).float()


def unit(rows: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1)


def test_argmax_per_prompt_and_similarity_matrix():
    segments, texts = unit(7, seed=1), unit(3, seed=2)
    similarity, matches = rank(segments, texts, ["a", "b", "c"])
    assert similarity.shape == (7, 3) and similarity.dtype == torch.float32 and similarity.device.type == "cpu"
    torch.testing.assert_close(similarity, segments @ texts.T)
    for p, match in enumerate(matches):
        assert match.prompt == "abc"[p] and match.matched
        assert match.index == int(similarity[:, p].argmax())
        assert match.score == pytest.approx(float(similarity[:, p].max()))


def test_top_k_is_sorted_best_first_with_ties_by_index():
    segments = at_angles(90, 0, 45, 0, -45)  # segments 1 and 3 are identical
    _, (match,) = rank(segments, at_angles(0), ["x"], top_k=3)
    assert [i for i, _ in match.top_k] == [1, 3, 2] and match.index == 1  # 2 and 4 tie too: lower index first
    scores = [s for _, s in match.top_k]
    assert scores == sorted(scores, reverse=True) and len(match.top_k) == 3
    _, (everything,) = rank(segments, at_angles(0), ["x"], top_k=10)
    assert len(everything.top_k) == 5
    _, (none,) = rank(segments, at_angles(0), ["x"], top_k=0)
    assert none.top_k == () and none.index == 1


def test_threshold_turns_weak_matches_into_no_match():
    segments = at_angles(0, 60)
    _, (strong, weak) = rank(segments, at_angles(10, 150), ["near", "far"], threshold=0.5)
    assert strong.index == 0 and strong.score == pytest.approx(math.cos(math.radians(10)), abs=1e-6)
    assert weak.index is None and not weak.matched
    assert weak.score == pytest.approx(math.cos(math.radians(90)), abs=1e-6)  # best it reached (segment 1)
    assert weak.top_k[0][0] == 1


def test_hungarian_resolves_a_conflict_that_argmax_gets_wrong():
    segments = at_angles(0, 90)
    texts = at_angles(10, 40)  # both prompts are closest to segment 0
    _, greedy = rank(segments, texts, ["p0", "p1"])
    assert [m.index for m in greedy] == [0, 0]
    _, assigned = rank(segments, texts, ["p0", "p1"], one_to_one=True)
    assert [m.index for m in assigned] == [0, 1]  # cos10 + cos50 > cos80 + cos40
    assert assigned[1].score == pytest.approx(math.cos(math.radians(50)), abs=1e-6)
    assert assigned[1].top_k[0][0] == 0  # top-k stays the plain ranking


def test_more_prompts_than_segments():
    segments = at_angles(0)
    _, matches = rank(segments, at_angles(5, 30, 80), ["a", "b", "c"], one_to_one=True)
    assert [m.index for m in matches] == [0, None, None]
    assert matches[2].score == pytest.approx(math.cos(math.radians(80)), abs=1e-6)


def test_one_to_one_with_threshold():
    _, matches = rank(at_angles(0, 90), at_angles(10, 40), ["a", "b"], one_to_one=True, threshold=0.7)
    assert [m.index for m in matches] == [0, None]  # b's assigned segment 1 scores cos50 = 0.64 < 0.7


def test_zero_segments():
    similarity, matches = rank(torch.zeros((0, 16)), unit(2), ["a", "b"], one_to_one=True, threshold=0.1)
    assert similarity.shape == (0, 2)
    assert all(m.index is None and m.score is None and m.top_k == () for m in matches)
    assert all(m.instances == () and m.best is None and m.threshold == 0.1 for m in matches)
    _, (m,) = rank(torch.zeros((0, 2)), at_angles(0), ["a"], instances="all", masks=torch.zeros((0, 4, 4), dtype=torch.bool))
    assert m.instances == () and not m.matched


def test_numpy_thresholds_are_numbers():
    _, (m,) = rank(at_angles(0), at_angles(10), ["x"], threshold=np.float32(0.99))
    assert m.threshold == pytest.approx(0.99) and m.instances == ()


def test_match_shape_and_compatibility_properties():
    _, (hit, miss) = rank(at_angles(0, 60), at_angles(10, 150), ["near", "far"], threshold=[0.5, 0.2], top_k=1)
    assert hit.instances == ((0, pytest.approx(math.cos(math.radians(10)), abs=1e-6)),)
    assert hit.best == hit.instances[0] and hit.threshold == 0.5 and hit.matched
    assert (hit.index, hit.score) == hit.instances[0]
    assert miss.instances == () and miss.index is None and not miss.matched and miss.threshold == 0.2
    assert miss.best == (1, pytest.approx(0.0, abs=1e-6)) and miss.score == miss.best[1]  # the best it reached


# --- instances="all" ------------------------------------------------------------------------------------


def boxes_masks(*boxes: tuple[int, int, int, int], size: int = 20) -> torch.Tensor:
    """``(N, size, size)`` bool masks, each a filled half-open XYXY box."""
    out = torch.zeros((len(boxes), size, size), dtype=torch.bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        out[k, y0:y1, x0:x1] = True
    return out


def test_all_instances_above_the_threshold_best_first():
    segments = at_angles(5, 60, 0, 20, 90)  # cos to the prompt at 0: .996, .5, 1, .94, 0
    masks = boxes_masks((0, 0, 4, 4), (5, 0, 9, 4), (10, 0, 14, 4), (15, 0, 19, 4), (0, 10, 4, 14))
    _, (m,) = rank(segments, at_angles(0), ["x"], threshold=0.45, instances="all", masks=masks)
    assert [i for i, _ in m.instances] == [2, 0, 3, 1]
    assert [s for _, s in m.instances] == sorted((s for _, s in m.instances), reverse=True)
    assert m.index == 2 and m.best[0] == 2
    _, (one,) = rank(segments, at_angles(0), ["x"], threshold=0.45, masks=masks)
    assert [i for i, _ in one.instances] == [2]  # "one" is the argmax only


def test_all_instances_without_a_threshold_is_the_argmax_only():
    masks = boxes_masks((0, 0, 4, 4), (5, 0, 9, 4), (10, 0, 14, 4))
    _, (m,) = rank(at_angles(5, 0, 10), at_angles(0), ["x"], instances="all", masks=masks)
    assert m.instances == ((1, pytest.approx(1.0)),) and m.threshold is None


def test_duplicates_go_by_mask_iou_the_lower_score_first():
    segments = at_angles(0, 5, 10, 15)
    masks = boxes_masks((0, 0, 10, 10), (0, 0, 10, 9), (0, 0, 10, 4), (12, 0, 20, 10))  # IoU(0,1)=.9, IoU(0,2)=.4
    _, (m,) = rank(segments, at_angles(0), ["x"], threshold=0.5, instances="all", masks=masks)
    assert [i for i, _ in m.instances] == [0, 2, 3]  # 1 duplicates 0 (and scores lower)
    _, (loose,) = rank(segments, at_angles(0), ["x"], threshold=0.5, instances="all", masks=masks, dedup_iou=0.95)
    assert [i for i, _ in loose.instances] == [0, 1, 2, 3]
    _, (strict,) = rank(segments, at_angles(0), ["x"], threshold=0.5, instances="all", masks=masks, dedup_iou=0.3)
    assert [i for i, _ in strict.instances] == [0, 3]  # 2 (IoU .4 with 0) goes too
    # masks whose boxes overlap but pixels do not are no duplicates (the box bound is only a shortcut)
    ring = boxes_masks((0, 0, 10, 10))
    ring[0, 2:8, 2:8] = False
    inner = boxes_masks((2, 2, 8, 8))
    _, (both,) = rank(at_angles(0, 5), at_angles(0), ["x"], threshold=0.5, instances="all",
                      masks=torch.cat([ring, inner]), dedup_iou=0.1)
    assert [i for i, _ in both.instances] == [0, 1]


def test_thresholds_per_prompt_and_explicit_empty_answers():
    segments = at_angles(0, 30, 100, 120)
    masks = boxes_masks((0, 0, 4, 4), (5, 0, 9, 4), (10, 0, 14, 4), (15, 0, 19, 4))
    _, (a, b, c) = rank(segments, at_angles(0, 110, 200), ["a", "b", "c"], threshold=[0.8, 0.95, None],
                        instances="all", masks=masks)
    assert [i for i, _ in a.instances] == [0, 1] and a.threshold == 0.8  # cos30 = .87 passes
    assert [i for i, _ in b.instances] == [2, 3]  # cos10 = .985 each
    assert [i for i, _ in c.instances] == [3] and c.threshold is None  # no threshold: the argmax
    _, (strict, none) = rank(segments, at_angles(0, 110), ["a", "b"], threshold=[0.99, 0.999])
    assert strict.instances == ((0, pytest.approx(1.0)),)
    assert none.instances == () and none.best == (2, pytest.approx(math.cos(math.radians(10)), abs=1e-6))


def test_one_to_one_with_instances():
    # a at 0 and b at 20; segments at 0, 8, 25, -12 and 200 (nobody's)
    segments = at_angles(0, 8, 25, -12, 200)
    masks = boxes_masks(*[(4 * k, 0, 4 * k + 3, 3) for k in range(5)])
    _, (a, b) = rank(segments, at_angles(0, 20), ["a", "b"], threshold=0.9, one_to_one=True, instances="all", masks=masks)
    # Hungarian first: a -> 0, b -> 2 (cos0 + cos5 is the best total); then greedily by similarity:
    # segment 1 scores cos8 for a and cos12 for b, so a takes it; 3 is a's only (cos12; b: cos32 < .9)
    assert [i for i, _ in a.instances] == [0, 1, 3]
    assert [i for i, _ in b.instances] == [2]
    _, plain = rank(segments, at_angles(0, 20), ["a", "b"], threshold=0.9, instances="all", masks=masks)
    assert [i for i, _ in plain[0].instances] == [0, 1, 3, 2]  # without one-to-one segments are shared
    assert [i for i, _ in plain[1].instances] == [2, 1, 0]


def test_one_to_one_serves_as_many_prompts_above_their_threshold_as_possible():
    # a (at 0) clears 0.9 on segment 0 (cos0) and 1 (cos25 = .906); b (at 5) clears 0.97 only on 0 (cos5).
    # The largest total (a->0, b->1: 1 + cos20) would leave b below its threshold; a->1, b->0 serves both.
    _, (a, b) = rank(at_angles(0, 25), at_angles(0, 5), ["a", "b"], one_to_one=True, threshold=[0.9, 0.97])
    assert (a.index, b.index) == (1, 0) and a.best[0] == 0
    _, (a, b) = rank(at_angles(0, 25), at_angles(0, 5), ["a", "b"], one_to_one=True, threshold=[0.95, 0.97])
    assert (a.index, b.index) == (0, None) and b.best[0] == 0  # b's only option is a's: an empty answer


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": [0.1]}, "1 thresholds for 2 prompts"),
    ({"threshold": [0.1, 1.5]}, r"\[-1, 1\]"),
    ({"threshold": -1.01}, r"\[-1, 1\]"),
    ({"threshold": float("nan")}, r"\[-1, 1\]"),
    ({"threshold": ["0.3", None]}, r"\[-1, 1\]"),
    ({"threshold": "0.3"}, r"\[-1, 1\]"),
    ({"instances": "some"}, "instances must be one of one, all"),
    ({"instances": "all"}, "needs the segment masks"),
    ({"instances": "all", "masks": torch.zeros((3, 4, 4), dtype=torch.bool)}, r"masks must be \(N=2"),
    ({"instances": "all", "masks": torch.zeros((2, 4, 4), dtype=torch.bool), "dedup_iou": 1.5}, "dedup_iou"),
])
def test_invalid_options_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        rank(unit(2), unit(2), ["a", "b"], **kwargs)
    assert "\n" not in str(e.value)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))
def test_one_to_one_maximises_the_total_similarity(n, p, seed):
    segments, texts = unit(n, dim=4, seed=seed), unit(p, dim=4, seed=seed + 1)
    similarity, matches = rank(segments, texts, [f"p{i}" for i in range(p)], one_to_one=True)
    chosen = [m.index for m in matches]
    used = [i for i in chosen if i is not None]
    assert len(used) == len(set(used)) == min(n, p)
    total = sum(float(similarity[i, q]) for q, i in enumerate(chosen) if i is not None)
    sim = similarity.numpy()
    if n >= p:
        best = max(sum(sim[perm[q], q] for q in range(p)) for perm in itertools.permutations(range(n), p))
    else:
        best = max(sum(sim[s, perm[s]] for s in range(n)) for perm in itertools.permutations(range(p), n))
    assert total == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("prompts", [[], [""], ["ok", "   "], ["\n\t"], "a cat", [3]])
def test_bad_prompts(prompts):
    with pytest.raises(PromptError):
        validate_prompts(prompts)
    with pytest.raises(PromptError):
        rank(unit(2), unit(max(len(prompts), 1)), prompts)


def test_shape_mismatches():
    with pytest.raises(ConfigError, match="prompts"):
        rank(unit(2), unit(3), ["a", "b"])
    with pytest.raises(ConfigError, match="D="):
        rank(unit(2, dim=8), unit(1, dim=16), ["a"])
    with pytest.raises(ConfigError, match="top_k"):
        rank(unit(2), unit(1), ["a"], top_k=-1)


def test_nan_embeddings_are_rejected_by_the_assignment():
    segments = unit(2)
    segments[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        rank(segments, unit(1), ["a"], one_to_one=True)
    assert np.isnan(rank(segments, unit(1), ["a"])[0][0, 0].item())
