"""``slip weights fetch`` knows the engines' models: short names map to hub ids, ``hf-hub:`` ids are open_clip's,
and a gated repo (SAM 3) that cannot be fetched says where to accept the licence and that HF_TOKEN is needed."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from slip.cli.weights import weights_app
from slip.weights import HUB_ALIASES, gated_hint, hub_id


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name, expected", [
    ("sam2.1-hiera-large", "facebook/sam2.1-hiera-large"), ("sam2-hiera-tiny", "facebook/sam2-hiera-tiny"),
    ("sam3", "facebook/sam3"), ("siglip2", "google/siglip2-base-patch16-224"),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
])
def test_names_resolve_to_hub_ids(name, expected):
    assert hub_id(name) == expected


def test_every_sam2_size_has_a_short_name():
    assert {f"sam2.1-hiera-{s}" for s in ("tiny", "small", "base-plus", "large")} <= set(HUB_ALIASES)
    assert gated_hint("facebook/sam2.1-hiera-large") == ""


def _offline(monkeypatch, cache) -> None:
    monkeypatch.setenv("SLIP_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    proxy = f"http://127.0.0.1:{_closed_port()}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy)


def _one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_fetching_gated_sam3_offline_says_where_to_accept_the_licence(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    line = _one_line(CliRunner().invoke(weights_app, ["fetch", "sam3"]))
    assert "facebook/sam3" in line and "https://huggingface.co/facebook/sam3" in line and "HF_TOKEN" in line


def test_fetching_an_open_clip_id_offline_is_one_line(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    line = _one_line(CliRunner().invoke(weights_app, ["fetch", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"]))
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in line


def test_an_unknown_name_lists_the_engines_names(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIP_CACHE", str(tmp_path))
    line = _one_line(CliRunner().invoke(weights_app, ["fetch", "sam9"]))
    assert "sam2.1-hiera-large" in line and "sam3" in line and "hf-hub:" in line
