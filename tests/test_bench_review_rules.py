"""The review bench's candidate doubt rules ``mix``, ``density`` and ``sampled`` (:data:`bench.review_rules.RULES`): each a full,
deterministic review order of the job built from the starting ranker's answers; and the diagnostic ``oracle-errors``
(:data:`bench.review_rules.ORACLES`), which also reads the truth."""

from __future__ import annotations

import numpy as np

from bench.review_rules import ORACLES, RULES, SAMPLE

THRESHOLD = 0.5


def _image(best: float, second: float) -> np.ndarray:
    """Two segments x three prompts: prompt 0's best segment scores ``best`` and its other ``second``."""
    return np.array([[best, 0.1, 0.1], [second, 0.1, 0.1]], np.float64)


def test_mix_takes_turns_between_doubt_and_a_seeded_shuffle():
    sims = [_image(0.9, 0.1), _image(0.52, 0.50), _image(0.9, 0.2), _image(0.6, 0.58), _image(0.95, 0.1)]
    doubt = RULES["doubt"](sims, THRESHOLD)
    order = RULES["mix"](sims, THRESHOLD)
    assert sorted(order) == list(range(len(sims))) and order == RULES["mix"](sims, THRESHOLD)
    shuffle = np.random.default_rng(7).permutation(len(sims))
    assert order[0] == doubt[0] == 1  # the most doubtful first; the shuffle's first second, unless it is that one
    assert order[1] == (shuffle[0] if shuffle[0] != doubt[0] else doubt[1])


def test_density_puts_a_doubtful_outlier_after_an_equally_doubtful_typical_image():
    typical = [_image(0.9, 0.1) for _ in range(6)]
    usual = _image(0.52, 0.50)
    outlier = usual[:, ::-1].copy()  # as doubtful (prompt 2 instead of 0), but its segments are like no other
    sims = typical + [outlier, usual]
    assert RULES["doubt"](sims, THRESHOLD)[:2] == [6, 7]  # doubt alone: a tie, kept in job order
    order = RULES["density"](sims, THRESHOLD)
    assert sorted(order) == list(range(len(sims)))
    assert order.index(7) < order.index(6)


def test_sampled_orders_a_seeded_sample_by_doubt_before_the_rest():
    rng = np.random.default_rng(0)
    sims = [_image(float(b), float(b) - float(g)) for b, g in zip(rng.uniform(0.5, 0.9, 400), rng.uniform(0, 0.3, 400))]
    doubt = RULES["doubt"](sims, THRESHOLD)
    order = RULES["sampled"](sims, THRESHOLD)
    assert sorted(order) == list(range(len(sims))) and order == RULES["sampled"](sims, THRESHOLD)
    sample = {int(i) for i in np.random.default_rng(300).permutation(len(sims))[:SAMPLE]}
    assert SAMPLE < len(sims) and set(order[:SAMPLE]) == sample  # the sample first ...
    assert order[:SAMPLE] == [i for i in doubt if i in sample]  # ... by doubt, then the rest by doubt
    assert order[SAMPLE:] == [i for i in doubt if i not in sample]
    assert order[:25] != doubt[:25]  # not the job's own 25 most doubtful


def test_oracle_errors_orders_by_the_starting_rankers_true_errors_then_by_doubt():
    sims = [_image(0.9, 0.1), _image(0.52, 0.50), _image(0.9, 0.2), _image(0.6, 0.58), _image(0.95, 0.1)]
    misses = [2, 0, 2, 1, 4]  # wrong answers per image (the truth)
    doubt = RULES["doubt"](sims, THRESHOLD)
    order = ORACLES["oracle-errors"](sims, THRESHOLD, misses)
    assert sorted(order) == list(range(len(sims)))
    assert order[0] == 4 and order[3:] == [3, 1]  # most errors first; the most doubtful image has none: last
    assert order[1:3] == sorted([0, 2], key=doubt.index)  # a tie in errors: in doubt order
