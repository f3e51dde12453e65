"""Item names come from the submitted paths, never from where a symbolic link points (slip.inputs): one test
per case. (The outside run: one link in a submitted folder to a file elsewhere moved the job's root to `/`
and renamed every image.)"""

from __future__ import annotations

import os
from pathlib import Path

from slip.inputs import expand_paths, relative_names, submitted_root

from queue_helpers import make_images


def names(*paths) -> list[str]:
    return relative_names(expand_paths(paths))


def test_a_link_to_a_file_outside_the_folder_is_named_as_the_link(tmp_path):
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    make_images(folder, 2)
    (outside,) = make_images(elsewhere, 1, seed=1, prefix="far")
    os.symlink(outside, folder / "linked.png")
    files = expand_paths([folder])
    assert relative_names(files) == ["img_000.png", "img_001.png", "linked.png"]
    assert submitted_root(files) == folder  # not the common folder of the targets
    assert files[2].read_bytes() == outside.read_bytes()  # the bytes are the target's


def test_a_link_to_a_file_inside_the_folder_keeps_both_names(tmp_path):
    folder = tmp_path / "photos"
    (first,) = make_images(folder / "a", 1)
    os.symlink(first, folder / "alias.png")
    assert names(folder) == ["a/img_000.png", "alias.png"]


def test_a_link_to_a_folder_is_not_followed(tmp_path):
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    make_images(folder, 1)
    make_images(elsewhere, 3, seed=2, prefix="far")
    os.symlink(elsewhere, folder / "more", target_is_directory=True)
    assert names(folder) == ["img_000.png"]


def test_a_broken_link_is_skipped(tmp_path):
    folder = tmp_path / "photos"
    make_images(folder, 1)
    os.symlink(tmp_path / "gone.png", folder / "broken.png")
    assert names(folder) == ["img_000.png"]


def test_a_submitted_folder_that_is_a_link_names_items_under_the_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    make_images(real / "cats", 2)
    make_images(real / "dogs", 1, seed=3)
    os.symlink(real, link, target_is_directory=True)
    files = expand_paths([link])
    assert relative_names(files) == ["cats/img_000.png", "cats/img_001.png", "dogs/img_000.png"]
    assert submitted_root(files) == link and all(Path(f).is_relative_to(link) for f in files)
