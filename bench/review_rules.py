"""The review bench's orderings (:mod:`bench.review`, ``--orders``): each rule maps the starting ranker's answers on
the job (per image its ``(N, P)`` segment x prompt similarities) and its threshold to a full review order.

"doubt" is the product's rule (:func:`slip.review.doubt_order` of expected corrections: the same order as "errors"
here, one threshold for every prompt); the others are the candidates it was chosen from on two development jobs (job
seeds 2 and 3: review-rules.json, review-rules-seed3.json; the rule had to beat random at 25 and 50 images on both; of
the three that did, "errors" keeps the per-prompt margin and threshold doubt, with "unclaimed" the one that never names
a prompt). In those two files "doubt" is the earlier product rule, now "round-robin" (it lost to random on job seed 3);
review-round-robin.json is that rule on the main job. "mix" and "density" are the cold-start remedies tried later on
the same two jobs (review-rules-mix-density.json): on the main job doubt reviews more unseen-class objects than random
yet learnt some classes less well at 25 images, the pattern of uncertainty sampling picking outliers or too few
typical examples. Neither beat doubt on both jobs, so the product rule stayed. "sampled" (doubt within a seeded random
sample of 300 images) tests the tail hypothesis: doubt won on every starting ranker of the 300-image jobs and was a
toss-up at 25 on the 1,000-image ones, as if the top 2.5 % of a big job were too atypical to learn from. It passed the
1,000-image development job (job seed 4: review-job4-sampled.json) but on the main job, from 6 starting rankers, it is
no better than doubt (review-sampled.json). Remedies that change what the fine-tune sees rather than the order:
:mod:`bench.review_pseudo`, ``--negatives`` and ``--balance``. :data:`ORACLES` are not rules a product could run:
they read the truth, to measure what any doubt rule could win at most (``oracle-errors``).
"""

from __future__ import annotations

import numpy as np

from slip.review import doubt_order, expected_corrections, image_doubt, prompt_certainty, unclaimed


def _corrections(sims, threshold) -> list[float]:
    """Per image, :func:`slip.review.expected_corrections` with one threshold for every prompt."""
    return [expected_corrections(s, [threshold] * s.shape[1]) for s in sims]


def _product(sims, threshold):
    return doubt_order(_corrections(sims, threshold))


def _certainty_row(sim: np.ndarray, threshold) -> list[float]:
    return [prompt_certainty(sim[:, p], threshold) for p in range(sim.shape[1])]


def _rounds(c: np.ndarray) -> list[int]:
    """Rounds over the columns of ``c`` (images x queues of certainty; the column whose least certain image is
    the most doubtful first), each taking its least certain image not taken yet."""
    queues = [list(np.lexsort((np.arange(len(c)), c[:, p]))) for p in range(c.shape[1])]
    turn = sorted(range(c.shape[1]), key=lambda p: (c[queues[p][0], p], p))
    taken, order = set(), []
    while len(order) < len(c):
        for p in turn:
            while queues[p] and queues[p][0] in taken:
                queues[p].pop(0)
            if queues[p]:
                taken.add(queues[p][0]), order.append(int(queues[p].pop(0)))
    return order


def _round_robin(sims, threshold) -> list[int]:
    """The earlier product rule: the prompts in turn, each taking its least certain image not taken yet."""
    return _rounds(np.array([_certainty_row(s, threshold) for s in sims]))


def _unclaimed(sim: np.ndarray, threshold) -> float:
    """:func:`slip.review.unclaimed` with one threshold for every prompt."""
    return unclaimed(sim, [threshold] * sim.shape[1])


def _with_unclaimed(sims, threshold) -> list[int]:
    """``round-robin`` with one more queue beside the prompts' own: the images with the most segments no prompt
    claims (objects the ranker cannot name) first; it takes its turn in every round like a prompt."""
    return _rounds(np.array([[*_certainty_row(s, threshold), -_unclaimed(s, threshold)] for s in sims]))


def _turns(first: list[int], second) -> list[int]:
    """Two orders of the same images taking turns (``first`` leads), each image once, at its earlier place."""
    taken, order = set(), []
    for pair in zip(first, second):
        for i in (int(j) for j in pair):
            if i not in taken:
                taken.add(i), order.append(i)
    return order


def _alternating(sims, threshold) -> list[int]:
    """``round-robin`` and ``unclaimed`` taking turns, each image once."""
    return _turns(_round_robin(sims, threshold), _by_score([_unclaimed(s, threshold) for s in sims]))


def _mix(sims, threshold) -> list[int]:
    """``doubt`` and a seeded shuffle of the job taking turns, each image once (typical images beside doubtful)."""
    return _turns(_product(sims, threshold), np.random.default_rng(7).permutation(len(sims)))


def _density(sims, threshold) -> list[int]:
    """``doubt`` weighted by how typical the image is (information density): the mean over its segments of the
    segment's mean cosine similarity, clipped at 0, to 2,000 of the job's segments (rows of ``(N, P)`` similarity
    centred on the job's mean), so outliers come later."""
    rows = np.concatenate([s for s in sims if len(s)])
    centre = rows.mean(0)

    def unit(x):
        x = x - centre
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)

    reference = unit(rows[np.random.default_rng(0).permutation(len(rows))[:2000]])
    typical = [float(np.clip(unit(s) @ reference.T, 0, None).mean()) if len(s) else 0.0 for s in sims]
    return _by_score(np.asarray(_corrections(sims, threshold)) * np.asarray(typical))


SAMPLE = 300  # images in the "sampled" rule's random sample: the size of the development jobs doubt won on


def _sampled(sims, threshold) -> list[int]:
    """``doubt`` within a seeded random sample of :data:`SAMPLE` images of the job first, then the rest of the job
    by doubt: the first 25 are the top 8 % of a 300-image job, as on the development jobs, not the top 2.5 % of
    1,000 (the tail hypothesis: the most doubtful images of a big job are atypical)."""
    inside = {int(i) for i in np.random.default_rng(300).permutation(len(sims))[:SAMPLE]}
    doubt = _product(sims, threshold)
    return [i for i in doubt if i in inside] + [i for i in doubt if i not in inside]


def _by_score(scores) -> list[int]:
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))]


def _oracle_errors(sims, threshold, misses: list[int]) -> list[int]:
    """A diagnostic, not a rule a product could run (it reads the truth): the images where the starting ranker
    is wrong most often first (``misses``: its wrong answers per image), ties in doubt order. The most errors any
    doubt estimate could put in front of reviewers."""
    place = {i: k for k, i in enumerate(_product(sims, threshold))}
    return sorted(range(len(sims)), key=lambda i: (-misses[i], place[i]))


ORACLES = {"oracle-errors": _oracle_errors}  # orderings that read the truth: (sims, threshold, misses) -> order

RULES = {
    "doubt": _product,
    "round-robin": _round_robin,
    "image-doubt": lambda sims, t: _by_score([image_doubt(s, [t] * s.shape[1]) for s in sims]),
    "unclaimed": lambda sims, t: _by_score([_unclaimed(s, t) for s in sims]),
    "errors": _product,  # image doubt + unclaimed: the candidate the product rule was (its name in review-rules*.json)
    "with-unclaimed": _with_unclaimed,
    "alternate": _alternating,
    "mix": _mix,
    "density": _density,
    "sampled": _sampled,
}
