"""The procedural dataset: deterministic, masks right, layout readable by the folder loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slip.data.folder import scan_folder
from slip.data.synth import CLASS_NAMES, generate_dataset, render_object, render_scene
from slip.errors import ConfigError, DatasetError


def test_catalogue_has_twenty_distinct_named_classes():
    assert len(CLASS_NAMES) >= 20
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    masks = [render_object(n, np.random.default_rng(0), 64)[1] for n in CLASS_NAMES]
    # same seed, same placement and colours: only the drawing differs, so every pair of masks differs
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).any(), (CLASS_NAMES[i], CLASS_NAMES[j])


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_render_object_is_deterministic_and_its_mask_is_the_object(name):
    image, mask = render_object(name, np.random.default_rng(3), 64)
    again, mask2 = render_object(name, np.random.default_rng(3), 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert np.array_equal(image, again) and np.array_equal(mask, mask2)
    assert 0.02 < mask.mean() < 0.8  # non-empty, and not the whole image
    other, _ = render_object(name, np.random.default_rng(4), 64)
    assert not np.array_equal(image, other)


def test_masks_are_inside_the_image_and_objects_are_whole():
    for k, name in enumerate(CLASS_NAMES):
        for seed in range(5):
            _, mask = render_object(name, np.random.default_rng([seed, k]), 48)
            ys, xs = np.nonzero(mask)
            assert len(ys) > 0
            assert ys.min() >= 0 and xs.min() >= 0 and ys.max() < 48 and xs.max() < 48


def test_unknown_class_and_tiny_size_are_refused():
    with pytest.raises(ConfigError, match="unknown synthetic class"):
        render_object("dragon", np.random.default_rng(0), 64)
    with pytest.raises(ConfigError, match="at least 16"):
        render_object("circle", np.random.default_rng(0), 8)


def test_render_scene_gives_disjoint_visible_masks():
    image, masks = render_scene(["circle", "star", "fish"], np.random.default_rng(1), 128)
    assert image.shape == (128, 128, 3) and masks.shape == (3, 128, 128)
    assert masks.sum(0).max() <= 1  # an occluded pixel belongs to the object in front only
    assert masks[-1].any()


def test_generate_dataset_is_deterministic_and_loads_as_a_folder(tmp_path, synth_dir):
    again = generate_dataset(tmp_path / "again", classes=6, per_class=10, size=48, seed=0)
    files = sorted(p.relative_to(synth_dir) for p in synth_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (synth_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    manifest = json.loads((synth_dir / "classes.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == list(CLASS_NAMES[:6])
    folder = scan_folder(synth_dir)
    assert folder.class_names == CLASS_NAMES[:6]
    assert len(folder.records) == 60  # masks are not images
    assert folder.has_masks and all(not r.path.name.endswith(".mask.png") for r in folder.records)


def test_generate_dataset_seed_changes_images(tmp_path):
    a = generate_dataset(tmp_path / "a", classes=2, per_class=2, size=32, seed=0)
    b = generate_dataset(tmp_path / "b", classes=2, per_class=2, size=32, seed=1)
    assert (a / "circle" / "00000.png").read_bytes() != (b / "circle" / "00000.png").read_bytes()


def test_generate_dataset_refuses_a_foreign_directory_and_bad_counts(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        generate_dataset(tmp_path, classes=2, per_class=1)
    with pytest.raises(ConfigError, match="--classes"):
        generate_dataset(tmp_path / "x", classes=len(CLASS_NAMES) + 1, per_class=1)
    with pytest.raises(ConfigError, match="--per-class"):
        generate_dataset(tmp_path / "y", classes=2, per_class=0)
