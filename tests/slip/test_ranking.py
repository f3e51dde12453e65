"""Prompt-to-segment ranking: argmax, top-k, threshold, one-to-one assignment, edge cases."""

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
