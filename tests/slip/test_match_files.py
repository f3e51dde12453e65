"""Matching a COCO truth's ``file_name``s to image paths, however a labelling tool wrote them
(``slip.inputs.match_files``)."""

from __future__ import annotations

import pytest

from slip.inputs import match_files

PATHS = ["/e/images/abc-x.png", "/e/images/def-y.png", "/e/c/z.png", "/e/1/dup.png", "/e/2/dup.png", "/e/b/cat.png",
         "/e/circle/00000.png", "/e/square/00000.png"]


@pytest.mark.parametrize("name, path", [
    ("circle/00000.png", "/e/circle/00000.png"),  # relative to the images' folder (slip data synth, CVAT)
    ("images/abc-x.png", "/e/images/abc-x.png"),  # the export's folder in front (Label Studio)
    ("/data/upload/1/def-y.png", "/e/images/def-y.png"),  # the server's path: its file name is unique here
    ("c\\z.png", "/e/c/z.png"),  # backslashes
    ("./b/cat.png", "/e/b/cat.png"),
    ("dup.png", None),  # two paths end so: neither is picked
    ("00000.png", None),  # likewise, in two class folders
    ("elsewhere/abc-x.png", "/e/images/abc-x.png"),  # the longest tail that names one path
    ("missing.png", None),
    ("images/0f1e2d3c-abc-x.png", "/e/images/abc-x.png"),  # Label Studio's prefix on an uploaded file, dropped
    ("images/0f1e2d3g-abc-x.png", None),  # not 8 hex digits: a name like any other
])
def test_a_file_name_matches_the_one_path_it_ends(name, path):
    found = match_files([name], PATHS)
    assert found == ({} if path is None else {0: PATHS.index(path)})


def test_names_sharing_a_tail_match_only_by_a_longer_one():
    names = ["a/cat.png", "b/cat.png"]  # b/cat.png is here; a/cat.png is not and must not take it
    assert match_files(names, PATHS) == {1: PATHS.index("/e/b/cat.png")}


def test_a_path_is_matched_once():
    names = ["images/abc-x.png", "other/abc-x.png"]  # the first takes the path by its whole length
    assert match_files(names, PATHS) == {0: PATHS.index("/e/images/abc-x.png")}


def test_a_name_with_the_upload_prefix_matches_a_path_that_has_it_first():
    paths = ["/e/media/0f1e2d3c-cat.png", "/e/originals/cat.png"]
    assert match_files(["0f1e2d3c-cat.png"], paths) == {0: 0}
    assert match_files(["0f1e2d3c-cat.png"], paths[1:]) == {0: 0}  # without it, the uploaded file's own name
