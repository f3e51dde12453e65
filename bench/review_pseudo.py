"""Pseudo-labels for the review bench (``python -m bench.review --pseudo K``), a remedy tried and dropped.

CEAL (Wang et al., "Cost-Effective Active Learning for Deep Image Classification", 2016): people label the least
certain samples, the model labels the most certain ones itself. The forgetting hypothesis: doubt's fine-tunes lose
seen classes its images hold few of; replaying the starting ranker's most certain answers on unreviewed images
(``--pseudo K`` per prompt) would keep every prompt in the fine-tune. It does not: the confident answers of names the
ranker never learnt are wrong (``review-pseudo.json``: every prompt, both arms about 3 points lower); for the names it
learnt only (``--pseudo-prompts seen``) doubt beats random on the development job 4 but both arms lose accuracy, random
more (``review-job4-pseudo-seen.json``). Not in the product.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slip.review import prompt_certainty, write_crop


def confident_answers(sims, thresholds, *, per_prompt: int, exclude=()) -> list[tuple[int, int, int]]:
    """Pseudo-labels ``(image, prompt, segment)``, sorted: for each prompt with a threshold, among the images not in
    ``exclude`` whose best segment for it scores at least the threshold, the ``per_prompt`` where that answer is the
    most certain (:func:`slip.review.prompt_certainty`), ties to the lower image; ``sims[i]`` is ``(N, P)``."""
    skip = {int(i) for i in exclude}
    picked = []
    for p, threshold in enumerate(thresholds if per_prompt > 0 else ()):
        if threshold is None:
            continue
        ranked = sorted((-prompt_certainty(s[:, p], threshold), i, int(np.argmax(s[:, p])))
                        for i, s in enumerate(sims) if i not in skip and len(s) and s[:, p].max() >= threshold)
        picked += [(i, p, j) for _, i, j in ranked[:per_prompt]]
    return sorted(picked)


def write_pseudo(labels: Path, answers, source, proposals, *, first: int) -> None:
    """Each answer's segment as a training crop of its prompt's class folder (with its mask), beside the review's
    own crops; no background crops (the image's other objects are unlabelled, not rejected). ``source[i].image`` is
    image ``i`` (``(H, W, 3) uint8``), ``proposals(i)`` its segment records (COCO RLE ``segmentation``). Names follow
    :func:`slip.review.write_labels`'s, the pseudo-labelled images numbered from ``first``."""
    from slip.outputs import decode_rle

    dirs = {c["name"]: c["dir"] for c in json.loads((labels / "classes.json").read_text())["classes"]}
    prompts = list(dirs)
    by_image: dict[int, list] = {}
    for i, p, j in answers:
        by_image.setdefault(i, []).append((p, j))
    for k, (i, pairs) in enumerate(sorted(by_image.items()), start=first):
        image = source[i].image
        records = proposals(i)
        for n, (p, j) in enumerate(pairs):
            mask = decode_rle([records[j]["segmentation"]], *image.shape[:2])[0]
            write_crop(labels / dirs[prompts[p]] / f"{k:06d}-{i:05d}-{n}.png", image, mask)


def precision(answers, world) -> float | None:
    """Share of pseudo-labels (image, prompt, segment) that are right: the image holds the prompt's class and
    the segment is its object (IoU > 0.5; ``world`` is :func:`bench.review.job_world`'s); None without any."""
    if not answers:
        return None
    o, labels = world["offsets"], world["labels"]
    right = [p in labels[i] and bool(world["ious"][o[i] + j, list(labels[i]).index(p)] > 0.5) for i, p, j in answers]
    return float(np.mean(right))
