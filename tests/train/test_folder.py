"""Labelled image folders: names, captions, the seeded 80/20 split, the torch dataset views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from slip.data.dataset import CaptionDataset
from slip.data.folder import clean_class_name, load_rgb, scan_folder, split_records
from slip.errors import ConfigError, DatasetError


@pytest.fixture
def kaggle_like(tmp_path):
    """The Kaggle "Pokemon Generation One" layout: one directory per Pokemon, JPEG/PNG images."""
    rng = np.random.default_rng(0)
    for name, n in (("Abra", 10), ("MrMime", 10), ("Farfetchd", 5), ("Nidoran_F", 7)):
        (tmp_path / name).mkdir()
        for i in range(n):
            array = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "notes.txt").write_text("not a class")
    return tmp_path


def test_scan_cleans_names_and_applies_the_caption_template(kaggle_like):
    folder = scan_folder(kaggle_like, caption_template="This is an image of {name}")
    assert folder.class_dirs == ("Abra", "Farfetchd", "MrMime", "Nidoran_F")
    assert folder.class_names == ("Abra", "Farfetchd", "Mr Mime", "Nidoran F")
    assert folder.captions[2] == "This is an image of Mr Mime"
    assert len(folder.records) == 32 and not folder.has_masks
    assert scan_folder(kaggle_like).captions[0] == "Abra"  # the paper's better template is the default


@pytest.mark.parametrize("raw,clean", [("Mr_Mime", "Mr Mime"), ("letter-A", "letter A"), ("  a__b ", "a b")])
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


def test_split_is_seeded_80_20_per_class_and_disjoint(kaggle_like):
    records = scan_folder(kaggle_like).records
    train, val = split_records(records, seed=0)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(records)
    per_class_val = {c: sum(r.label == c for r in val) for c in range(4)}
    assert per_class_val == {0: 2, 1: 1, 2: 2, 3: 1}  # round(0.2 * n) of 10, 5, 10, 7 images
    assert split_records(records, seed=0) == (train, val)
    assert split_records(records, seed=1)[1] != val


def test_bad_inputs_are_clear_errors(tmp_path, kaggle_like):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="name"):
        scan_folder(kaggle_like, caption_template="a photo")
    with pytest.raises(ConfigError, match="invalid"):
        scan_folder(kaggle_like, caption_template="{label}")
    (tmp_path / "one" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "a" / "x.png")
    with pytest.raises(DatasetError, match="at least 2"):
        scan_folder(tmp_path / "one")
    bad = kaggle_like / "Abra" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_rgb(bad)


def test_caption_dataset_views(synth_dir):
    folder = scan_folder(synth_dir)
    ds = CaptionDataset(folder.records[:4], image_size=24, segment_view_prob=1.0, random=False)
    whole, label = ds[0]
    cut, _ = ds[1]  # odd items take the segment view in deterministic mode
    assert whole.shape == cut.shape == (3, 24, 24) and whole.dtype == torch.float32
    assert label == folder.records[0].label
    assert 0.0 <= float(whole.min()) and float(whole.max()) <= 1.0
    black = (cut.sum(0) == 0).float().mean()
    assert black > 0.05 and (whole.sum(0) == 0).float().mean() < 0.01  # background blacked out only in the cut
    plain = CaptionDataset(folder.records[:4], image_size=24, segment_view_prob=0.0, random=False)
    assert torch.equal(plain[1][0], CaptionDataset(folder.records[:4], image_size=24)[1][0])
