"""Datasets and checkpoints travel through the object store: content-addressed, verified, safe paths."""

from __future__ import annotations

import pytest

from slip.errors import DatasetError
from jobs.store import Store
from jobs.training import materialize, ranker_directory, upload_directory


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_upload_then_materialize_gives_the_same_tree(tmp_path, synth_dir):
    store = Store(str(tmp_path / "store"))
    key = upload_directory(store, synth_dir)
    assert upload_directory(store, synth_dir) == key  # content-addressed: the same digest, nothing new
    local = materialize(store, key, tmp_path / "cache")
    assert _files(local) == _files(synth_dir)
    assert materialize(store, key, tmp_path / "cache") == local  # second call: the cached copy


def test_corrupt_blob_and_unsafe_paths_are_refused(tmp_path, synth_dir):
    store = Store(str(tmp_path / "store"))
    key = upload_directory(store, synth_dir)
    manifest = store.get_json(f"datasets/{key}/manifest.json")
    store.put_bytes(f"datasets/blobs/{manifest['files'][0]['sha256']}", b"tampered")
    with pytest.raises(DatasetError, match="corrupt"):
        materialize(store, key, tmp_path / "cache")
    bad = {"files": [{"path": "../escape.png", "sha256": manifest["files"][1]["sha256"], "size": 1}]}
    store.put_json("datasets/" + "0" * 64 + "/manifest.json", bad)
    with pytest.raises(DatasetError, match="unsafe path"):
        materialize(store, "0" * 64, tmp_path / "cache")
    assert not (tmp_path / "cache" / "datasets" / "escape.png").exists()


def test_store_ranker_specs_resolve_to_directories(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.put_bytes("jobs/j1/cells/0/ranker/config.json", b"{}")
    assert ranker_directory(store, "store:jobs/j1/cells/0/ranker", tmp_path) == store.path("jobs/j1/cells/0/ranker")
    assert ranker_directory(store, "openai/clip-vit-base-patch32", tmp_path) == "openai/clip-vit-base-patch32"
    memory = Store("memory://slip-test-rankers")
    memory.put_bytes("jobs/j1/cells/0/ranker/config.json", b"{}")
    local = ranker_directory(memory, "store:jobs/j1/cells/0/ranker", tmp_path)
    assert (tmp_path / "rankers").is_dir() and open(f"{local}/config.json", "rb").read() == b"{}"
