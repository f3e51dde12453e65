"""The review bench's pseudo-labels (``--pseudo K``, the CEAL remedy tried in :mod:`bench.review_pseudo`): which answers
are taken, and that they land as training crops of their prompt beside the review's own, with no background."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from PIL import Image

from bench.review_pseudo import confident_answers, write_pseudo
from slip.data.folder import scan_folder
from slip.data.synth import render_scene
from slip.review import ReviewedImage, ReviewedObject, prompt_certainty, rle_of, write_labels

THRESHOLD = 0.5


def _image(score: float, second: float) -> np.ndarray:
    """Two segments x two prompts: prompt 0 answered by segment 0 with ``score`` over ``second``; prompt 1 never
    above the threshold."""
    return np.array([[score, 0.1], [second, 0.2]], np.float64)


def test_each_prompt_takes_its_most_certain_answers_above_the_threshold_outside_the_review():
    sims = [_image(0.9, 0.1), _image(0.55, 0.2), _image(0.8, 0.1), _image(0.45, 0.1), _image(0.9, 0.1),
            _image(0.7, 0.68)]
    answers = confident_answers(sims, [THRESHOLD, THRESHOLD], per_prompt=2, exclude=[0])
    above = [i for i, s in enumerate(sims) if i != 0 and s[:, 0].max() >= THRESHOLD]
    expected = sorted(above, key=lambda i: (-prompt_certainty(sims[i][:, 0], THRESHOLD), i))[:2]
    assert answers == [(i, 0, 0) for i in sorted(expected)] == [(2, 0, 0), (4, 0, 0)]
    assert confident_answers(sims, [None, THRESHOLD], per_prompt=5) == []  # no threshold, nothing above one
    assert confident_answers(sims, [THRESHOLD, THRESHOLD], per_prompt=0) == []
    tie = confident_answers([_image(0.9, 0.1)] * 4, [THRESHOLD, None], per_prompt=2, exclude=[0])
    assert tie == [(1, 0, 0), (2, 0, 0)]  # equal certainty: the lower images


def test_pseudo_labels_become_crops_of_their_prompt_beside_the_review(tmp_path):
    prompts = ("circle", "square")
    scenes = [render_scene(["circle", "square"], np.random.default_rng([18, k]), size=96, scale=(0.35, 0.45))
              for k in range(3)]
    source = [SimpleNamespace(image=image) for image, _ in scenes]
    records = [[{"segmentation": rle_of(objects[0])}, {"segmentation": rle_of(objects[1])}] for _, objects in scenes]
    reviewed = [ReviewedImage("00000.png", 0, 96, 96, tuple(ReviewedObject(p, rle_of(m))
                                                            for p, m in zip(prompts, scenes[0][1])))]
    labels = write_labels(tmp_path / "labels", reviewed, prompts=prompts, image=lambda r: _png(scenes[0][0]),
                          proposals=lambda r: None, source="test", export="truth", job=None, heldout_fraction=0.0)
    answers = [(1, 0, 0), (2, 0, 0), (2, 1, 1)]  # image 1's circle, image 2's circle and square
    write_pseudo(labels, answers, source, lambda i: records[i], first=1)
    folder = scan_folder(labels)
    names = {r.path.name: folder.class_names[r.label] for r in folder.records}
    assert names == {"000000-00000-0.png": "circle", "000000-00000-1.png": "square", "000001-00001-0.png": "circle",
                     "000002-00002-0.png": "circle", "000002-00002-1.png": "square"}
    assert "background" not in folder.class_names and all(r.mask_path is not None for r in folder.records)
    crop = np.asarray(Image.open(labels / "square" / "000002-00002-1.mask.png"))
    ys, xs = np.nonzero(scenes[2][1][1])
    assert crop.max() == 255 and (crop > 0).sum() == len(ys)  # the whole square, inside its grown box


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
