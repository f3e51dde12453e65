"""Evaluation composites and oracle proposals: seeded, 4 distinct classes, masks in the right tiles."""

from __future__ import annotations

import numpy as np
import pytest

from slip.data.composites import CompositeSource, oracle_segments
from slip.data.folder import load_rgb, scan_folder, split_records
from slip.errors import ConfigError, DatasetError


@pytest.fixture
def source(synth_dir):
    folder = scan_folder(synth_dir)
    _, val = split_records(folder.records, seed=0)
    return CompositeSource(folder, val, seed=5, tile_size=40)


def test_composites_are_deterministic_for_a_seed(source):
    again = CompositeSource(source.folder, [r for rs in source.by_label.values() for r in rs], seed=5, tile_size=40)
    for a, b in zip(source.take(6), again.take(6)):
        assert np.array_equal(a.image, b.image) and a.labels == b.labels and a.sources == b.sources
        assert np.array_equal(a.object_masks, b.object_masks)
    other = CompositeSource(source.folder, [r for rs in source.by_label.values() for r in rs], seed=6, tile_size=40)
    assert any(a.labels != b.labels for a, b in zip(source.take(6), other.take(6)))
    assert source[3].sources == source.take(1, start=3)[0].sources  # random access = sequential access


def test_composite_layout(source):
    for c in source.take(8):
        assert c.image.shape == (80, 80, 3) and len(set(c.labels)) == 4
        assert c.class_names == tuple(source.folder.class_names[l] for l in c.labels)
        assert c.prompts == c.class_names  # caption template {name}
        for k in range(4):
            x0, y0, x1, y1 = c.tile_boxes[k]
            assert (x1 - x0, y1 - y0) == (40, 40)
            mask = c.object_masks[k]
            assert mask.any() and not (mask & ~c.tile_mask(k)).any()  # the object lies in its own tile
            held_out = {str(r.path.relative_to(source.folder.root)) for r in source.by_label[c.labels[k]]}
            assert c.sources[k] in held_out  # only held-out images are composited


def test_composite_tile_is_the_source_image(source):
    c = source[0]
    src = load_rgb(source.folder.root / c.sources[0])  # 48 px source, 40 px tile
    tile = c.image[0:40, 0:40].astype(int)
    from PIL import Image
    expected = np.asarray(Image.fromarray(src).resize((40, 40), Image.BILINEAR)).astype(int)
    assert np.abs(tile - expected).max() == 0


def test_oracle_segments(source):
    c = source[1]
    oracle = oracle_segments(c, seed=0)
    assert len(oracle.masks) == 12 and sorted(oracle.kinds).count("object") == 4
    for mask, kind, tile in zip(oracle.masks, oracle.kinds, oracle.tiles):
        assert mask.any() and not (mask & ~c.tile_mask(tile)).any()
        if kind == "object":
            assert np.array_equal(mask, c.object_masks[tile])
        if kind == "partial":
            assert not (mask & ~c.object_masks[tile]).any() and mask.sum() < c.object_masks[tile].sum()
        if kind == "background":
            assert not (mask & c.object_masks[tile]).any()
    again = oracle_segments(c, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(oracle.masks, again.masks))
    assert len(oracle_segments(c, distractors=False).masks) == 4


def test_too_few_held_out_classes(synth_dir):
    folder = scan_folder(synth_dir)
    three = [r for r in folder.records if r.label < 3]
    with pytest.raises(DatasetError, match="at least 4"):
        CompositeSource(folder, three)


def test_class_weights_make_a_long_tail(source):
    # with weights a class of weight 0 never comes and a class of weight 0.1 is rarer than every other; bad
    # weights are one line each
    names = source.folder.class_names
    rare, never = names[source.labels[0]], names[source.labels[1]]
    tailed = CompositeSource(source.folder, [r for rs in source.by_label.values() for r in rs], seed=5, tile_size=40,
                             weights={rare: 0.1, never: 0.0})
    counts = np.zeros(len(names), int)
    for c in tailed.take(150):
        assert len(set(c.labels)) == 4
        counts[list(c.labels)] += 1
    assert counts[source.labels[1]] == 0 and 0 < counts[source.labels[0]] < counts[source.labels[2:]].min() / 3
    with pytest.raises(ConfigError, match="not classes of the held-out images"):
        CompositeSource(source.folder, source.folder.records, weights={"unicorn": 2.0})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        CompositeSource(source.folder, source.folder.records, weights={rare: -1.0})
    with pytest.raises(ConfigError, match="a composite needs 4"):
        CompositeSource(source.folder, source.folder.records, weights={n: 0.0 for n in names[:3]})
