"""Weights cache: missing-file messages, official SAM format round trip, verified downloads, CLI."""

from __future__ import annotations

import functools
import json
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bad_weights import WORDS, write_bad_checkpoints
from slip.cli.weights import weights_app
from slip.errors import ChecksumError, ConfigError, WeightsError, WeightsNotFoundError
from slip.sam import load_sam
from slip.weights import (
    OFFICIAL_SAM,
    Checkpoint,
    bundled_path,
    clip_path,
    fetch_clip,
    fetch_sam,
    sam_checkpoint,
    sha256_file,
)

# --- missing weights ------------------------------------------------------------------------------------


def test_missing_official_checkpoint_message_says_what_to_do(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        sam_checkpoint("vit_b", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "sam" / "sam_vit_b_01ec64.pth") in message
    assert "SLIP_CACHE" in message
    assert "slip weights fetch vit_b" in message
    assert OFFICIAL_SAM["vit_b"].url in message
    assert "\n" not in message


def test_load_sam_of_missing_official_checkpoint_raises_before_building(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="slip weights fetch vit_h"):
        load_sam("vit_h", device="cpu", cache_dir=tmp_path)


def test_unknown_sam_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vit_x"):
        sam_checkpoint("vit_x", tmp_path)


def test_sha_values_are_not_the_filename_suffixes():
    for entry in OFFICIAL_SAM.values():
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.url.endswith("/" + entry.filename)
    assert OFFICIAL_SAM["vit_b"].sha256.startswith("ec2df627")


def test_bundled_model_not_built_names_the_build_command(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="slip train-sam --bundle"):
        bundled_path("synth-sam", root=tmp_path)
    (tmp_path / "synth-clip").mkdir()  # an empty folder is not a model either
    with pytest.raises(WeightsNotFoundError, match="slip train-ranker --bundle"):
        bundled_path("synth-clip", root=tmp_path)
    (tmp_path / "synth-clip" / "config.json").write_text("{}")
    assert bundled_path("synth-clip", root=tmp_path) == tmp_path / "synth-clip"


# --- official format round trip (one vit_b build for the module) ----------------------------------------


@pytest.fixture(scope="module")
def official_vit_b(tmp_path_factory):
    """A randomly initialised vit_b saved exactly like Meta's file, in a fresh cache dir."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    cache = tmp_path_factory.mktemp("cache")
    path = cache / "sam" / OFFICIAL_SAM["vit_b"].filename
    path.parent.mkdir()
    torch.save(state, path)
    return cache, path, state


def _assert_same_weights(sam, state):
    loaded = sam.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_official_checkpoint_loads_from_the_cache(official_vit_b):
    cache, path, state = official_vit_b
    assert sam_checkpoint("vit_b", cache) == path
    sam = load_sam("vit_b", device="cpu", cache_dir=cache)
    assert sam.image_encoder.patch_embed.proj.out_channels == 768
    assert not sam.training
    _assert_same_weights(sam, state)


def test_official_checkpoint_loads_from_its_path_with_type_detected(official_vit_b):
    _, path, state = official_vit_b
    sam = load_sam(str(path), device="cpu")
    assert len(sam.image_encoder.blocks) == 12
    _assert_same_weights(sam, state)


# --- verified downloads ---------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base URL, www dir)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _sources(url: str, sha: str) -> dict[str, Checkpoint]:
    return {"vit_b": Checkpoint("sam_vit_b_test.pth", url, sha)}


def test_fetch_verifies_and_renames_into_place(server, tmp_path):
    base, www = server
    payload = bytes(range(256)) * 3000  # 768 000 bytes, several read blocks
    (www / "ckpt.pth").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    path = fetch_sam("vit_b", cache, progress=False, sources=_sources(f"{base}/ckpt.pth", sha))
    assert path == cache / "sam" / "sam_vit_b_test.pth"
    assert path.read_bytes() == payload
    assert sha256_file(path) == sha
    assert sorted(p.name for p in path.parent.iterdir()) == ["sam_vit_b_test.pth"]  # no temp left
    # present and valid: kept without touching the network (the source is gone now)
    (www / "ckpt.pth").unlink()
    assert fetch_sam("vit_b", cache, progress=False, sources=_sources(f"{base}/ckpt.pth", sha)) == path


def test_fetch_rejects_a_checksum_mismatch_and_leaves_nothing(server, tmp_path):
    base, www = server
    (www / "ckpt.pth").write_bytes(b"not the published file")
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="expected " + "0" * 64):
        fetch_sam("vit_b", cache, progress=False, sources=_sources(f"{base}/ckpt.pth", "0" * 64))
    assert list((cache / "sam").iterdir()) == []


def test_fetch_replaces_a_corrupt_file(server, tmp_path):
    base, www = server
    (www / "ckpt.pth").write_bytes(b"good bytes")
    sha = hashlib.sha256(b"good bytes").hexdigest()
    target = tmp_path / "cache" / "sam" / "sam_vit_b_test.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    fetch_sam("vit_b", tmp_path / "cache", progress=False, sources=_sources(f"{base}/ckpt.pth", sha))
    assert target.read_bytes() == b"good bytes"


def test_fetch_http_error_is_a_weights_error(server, tmp_path):
    base, _ = server
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch_sam("vit_b", tmp_path, progress=False, sources=_sources(f"{base}/missing.pth", "0" * 64))
    assert list((tmp_path / "sam").iterdir()) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_without_network_is_a_weights_error(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/ckpt.pth"
    with pytest.raises(WeightsError, match="cannot download"):
        fetch_sam("vit_b", tmp_path, progress=False, sources=_sources(url, "0" * 64))


def test_fetch_clip_without_network_is_a_weights_error(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(WeightsError, match="openai/clip-vit-base-patch32"):
        fetch_clip("openai/clip-vit-base-patch32", tmp_path, endpoint=endpoint)


def test_clip_path_of_missing_id_names_the_fetch_command(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="slip weights fetch org/missing-model"):
        clip_path("org/missing-model", tmp_path)


# --- CLI --------------------------------------------------------------------------------------------------


def _offline_env(monkeypatch, cache: Path) -> None:
    """SLIP_CACHE at ``cache`` and every proxy pointing at a closed port: no download can succeed."""
    proxy = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("SLIP_CACHE", str(cache))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_fetch_without_network_exits_2_with_one_line(monkeypatch, tmp_path):
    _offline_env(monkeypatch, tmp_path)
    result = CliRunner().invoke(weights_app, ["fetch", "vit_b", "--quiet"])
    assert result.exit_code == 2
    assert "sam_vit_b_01ec64.pth" in _one_line_error(result)
    assert list((tmp_path / "sam").iterdir()) == []  # no partial file left behind


def test_cli_fetch_unknown_name_exits_2_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIP_CACHE", str(tmp_path))
    result = CliRunner().invoke(weights_app, ["fetch", "vit_q"])
    assert result.exit_code == 2
    assert "vit_q" in _one_line_error(result)


def test_cli_list_shows_cached_files_with_sizes(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIP_CACHE", str(tmp_path))
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / OFFICIAL_SAM["vit_l"].filename).write_bytes(b"x" * 3 * 1024 * 1024)
    result = CliRunner().invoke(weights_app, ["list"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path) in result.stdout
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("  sam")}
    assert "3.0 MiB" in lines["vit_l"]
    assert "slip weights fetch vit_b" in lines["vit_b"]


# --- digests of loaded weights ----------------------------------------------------------------------------


def test_cached_sha256_falls_back_to_the_cache_when_it_cannot_write_beside_the_file(tmp_path):
    from slip.weights import DIGEST_SUFFIX, cached_sha256

    weights = tmp_path / "models" / "w.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"weights" * 1000)
    (weights.parent / (weights.name + DIGEST_SUFFIX)).mkdir()  # something that cannot be written in the way
    sha = cached_sha256(weights, cache_dir=tmp_path / "cache")
    assert sha == hashlib.sha256(weights.read_bytes()).hexdigest()
    (record,) = (tmp_path / "cache" / "digests").iterdir()
    assert json.loads(record.read_text())["sha256"] == sha and json.loads(record.read_text())["file"] == str(weights)
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "e" * 64}))
    assert cached_sha256(weights, cache_dir=tmp_path / "cache") == "e" * 64, "read from the cache's record"


def test_directory_sha256_covers_weights_and_config_not_recommendations(tmp_path):
    from slip.weights import directory_sha256

    folder = tmp_path / "ranker"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"tensors")
    first = directory_sha256(folder)
    assert directory_sha256(folder) == first, "stable, and the digest records it wrote do not count"
    for name in ("threshold.json", "generator.json", "filters.json", "curve.json", "README.md"):
        (folder / name).write_text("{}")
    assert directory_sha256(folder) == first
    (folder / "config.json").write_text('{"a": 2}')
    assert directory_sha256(folder) != first
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "threshold.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="no weight files"):
        directory_sha256(tmp_path / "empty")


def test_tensors_sha256_is_order_free_and_sees_every_value_dtype_and_shape():
    from slip.weights import tensors_sha256

    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)
    base = tensors_sha256({"a": a, "b": b})
    assert tensors_sha256({"b": b, "a": a.clone()}) == base
    changed = a.clone()
    changed[1, 2] += 1
    for other in ({"a": changed, "b": b}, {"a": a.double(), "b": b}, {"a": a.reshape(3, 2), "b": b},
                  {"a2": a, "b": b}):
        assert tensors_sha256(other) != base, other.keys()


# --- bad checkpoints: one line, never a traceback, never unpickled ------------------------------------------


@pytest.fixture
def bad_checkpoints(tmp_path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (the --sam path, the file the message must name, words it must hold)."""
    paths = write_bad_checkpoints(tmp_path)
    config_json = paths["config"].parent / "config.json"
    return {"corrupt": (paths["corrupt"], paths["corrupt"], WORDS["corrupt"]),
            "unsafe": (paths["unsafe"], paths["unsafe"], WORDS["unsafe"]),
            "config": (paths["config"], config_json, WORDS["config"]),
            "config-dir": (paths["config"].parent, config_json, WORDS["config"])}


@pytest.mark.parametrize("case", ["corrupt", "unsafe", "config", "config-dir"])
def test_cli_segment_with_a_bad_checkpoint_exits_2_with_one_line(bad_checkpoints, case, tmp_path):
    from PIL import Image

    from producer.cli import build_app

    spec, named, words = bad_checkpoints[case]
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(image)
    result = CliRunner().invoke(build_app(), ["segment", str(image), "--prompt", "x", "--out", str(tmp_path / "out"),
                                              "--sam", str(spec), "--clip", "tiny-random", "--device", "cpu"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    line = _one_line_error(result)
    assert str(named) in line and words in line, line
    assert not (tmp_path / "pwned").exists(), "the pickle payload ran"
    assert not (tmp_path / "out").exists(), "nothing was written"
