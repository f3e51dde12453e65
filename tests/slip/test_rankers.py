"""Rankers: Hugging Face CLIP directory and hub-cache round trips, spec dispatch, missing weights."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from slip.errors import ConfigError, WeightsNotFoundError
from slip.rankers import DEFAULT_CLIP, HFClipRanker, Ranker, build_tiny_clip, load_ranker, save_hf_clip
from slip.rankers.hf_clip import OPENAI_MEAN, OPENAI_STD

PROMPTS = ["a red ball", "a blue square on grass", "cat"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_clip(seed=0)


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved(tiny, tmp_path):
    model, tokenizer = tiny
    return save_hf_clip(model, tokenizer, tmp_path / "clip")


def test_tiny_clip_is_deterministic_and_seed_dependent():
    a, _ = build_tiny_clip(seed=0)
    b, _ = build_tiny_clip(seed=0)
    c, _ = build_tiny_clip(seed=1)
    w = "visual_projection.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_embeddings_have_shapes_and_unit_norm(tiny, pixels):
    ranker = HFClipRanker(*tiny, spec="tiny-random")
    assert isinstance(ranker, Ranker)
    images, texts = ranker.encode_images(pixels), ranker.encode_texts(PROMPTS)
    assert images.shape == (5, 32) and texts.shape == (3, 32)
    assert images.dtype == texts.dtype == torch.float32
    assert torch.allclose(images.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(images[0], images[1])  # different crops, different embeddings
    assert not torch.allclose(texts[0], texts[1])
    assert ranker.encode_images(pixels[:0]).shape == (0, 32)
    assert ranker.encode_texts([]).shape == (0, 32)


def test_hf_directory_round_trip_gives_identical_embeddings(tiny, saved, pixels):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        assert (saved / name).is_file(), name
    direct = HFClipRanker(*tiny, spec="tiny-random")
    loaded = load_ranker(str(saved), device="cpu")
    assert loaded.spec == str(saved)
    assert loaded.image_size == 32
    assert torch.equal(loaded.encode_images(pixels), direct.encode_images(pixels))
    assert torch.equal(loaded.encode_texts(PROMPTS), direct.encode_texts(PROMPTS))


def test_batching_does_not_change_embeddings(tiny, pixels):
    big = HFClipRanker(*tiny, spec="tiny-random", batch_size=64)
    small = HFClipRanker(*tiny, spec="tiny-random", batch_size=2)
    assert torch.allclose(small.encode_images(pixels), big.encode_images(pixels), atol=1e-5)
    assert torch.allclose(small.encode_texts(PROMPTS), big.encode_texts(PROMPTS), atol=1e-5)


def test_off_size_crops_are_resized(tiny, pixels):
    ranker = HFClipRanker(*tiny, spec="tiny-random")
    big = torch.nn.functional.interpolate(pixels, size=(64, 64), mode="nearest")  # each pixel 2x2
    assert ranker.encode_images(big).shape == (5, 32)
    # box-filter downsampling of a 2x2 nearest upsampling is close to the original crop
    assert torch.allclose(ranker.encode_images(big), ranker.encode_images(pixels), atol=0.05)


def test_normalisation_is_read_from_the_preprocessor_config(tiny, tmp_path, pixels):
    model, tokenizer = tiny
    default = load_ranker(str(save_hf_clip(model, tokenizer, tmp_path / "a")), device="cpu")
    custom = load_ranker(
        str(save_hf_clip(model, tokenizer, tmp_path / "b", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))),
        device="cpu",
    )
    assert torch.allclose(default._mean.flatten(), torch.tensor(OPENAI_MEAN))
    assert torch.allclose(default._std.flatten(), torch.tensor(OPENAI_STD))
    assert torch.allclose(custom._mean.flatten(), torch.full((3,), 0.5))
    assert not torch.allclose(custom.encode_images(pixels), default.encode_images(pixels), atol=1e-3)


def test_tiny_random_only_by_name():
    ranker = load_ranker("tiny-random", device="cpu")
    assert ranker.spec == "tiny-random"
    assert isinstance(ranker, HFClipRanker)


def test_missing_hub_id_names_the_fetch_command(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=f"slip weights fetch {DEFAULT_CLIP}"):
        load_ranker(device="cpu", cache_dir=tmp_path)


def test_hub_id_loads_from_the_cache_without_network(tiny, tmp_path, pixels):
    """A snapshot laid out exactly like huggingface_hub's cache is found by id, offline."""
    repo = tmp_path / "hf" / "models--org--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_hf_clip(*tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ranker = load_ranker("org/tiny-clip", device="cpu", cache_dir=tmp_path)
    assert ranker.spec == "org/tiny-clip"
    direct = HFClipRanker(*tiny, spec="tiny-random")
    assert torch.equal(ranker.encode_images(pixels), direct.encode_images(pixels))


def test_missing_directory_and_bad_specs(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="neither an existing directory"):
        load_ranker(str(tmp_path / "no" / "such" / "dir"), device="cpu")
    with pytest.raises(WeightsNotFoundError, match="neither an existing directory"):
        load_ranker("vit_b", device="cpu")  # a SAM name, not a hub id: no misleading fetch hint
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        load_ranker(str(tmp_path), device="cpu")  # exists, but holds no model
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="neither a Hugging Face CLIP"):
        load_ranker(str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="empty ranker spec"):
        load_ranker("  ", device="cpu")
    with pytest.raises(ConfigError, match="fp16"):
        load_ranker("tiny-random", device="cpu", dtype="fp16")


def test_dual_encoder_directory_goes_to_its_loader(tmp_path, monkeypatch, tiny):
    """``"architecture": "slip-dual-encoder"`` dispatches to slip.rankers.dual_encoder."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "slip-dual-encoder"}))
    calls = []

    def load_dual_encoder(path, *, device, dtype):
        calls.append((path, device, dtype))
        return HFClipRanker(*tiny, spec="from-loader", device=device, dtype=dtype)

    module = types.ModuleType("slip.rankers.dual_encoder")
    module.load_dual_encoder = load_dual_encoder
    monkeypatch.setitem(sys.modules, "slip.rankers.dual_encoder", module)
    ranker = load_ranker(str(tmp_path), device="cpu")
    assert calls == [(tmp_path, torch.device("cpu"), torch.float32)]
    assert ranker.spec == str(tmp_path)


# --- bundles: what results must know about a ranker ----------------------------------------------------------


def test_bundle_names_the_weights_by_their_digest(tiny, saved, tmp_path):
    from slip.rankers.loading import load_ranker_bundle
    from slip.weights import directory_sha256, tensors_sha256

    bundle = load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path / "cache")
    assert isinstance(bundle.ranker, HFClipRanker) and bundle.ranker.spec == str(saved)
    assert (bundle.ref.spec, bundle.ref.arch) == (str(saved), "hf-clip")
    assert bundle.ref.sha256 == directory_sha256(saved) and bundle.threshold is None
    tiny_bundle = load_ranker_bundle("tiny-random", device="cpu")
    assert tiny_bundle.ref.arch == "tiny-random"
    assert tiny_bundle.ref.sha256 == tensors_sha256(tiny[0].state_dict()), "built in memory: named by its tensors"
    assert load_ranker_bundle("synth", device="cpu").ref.arch == "synth-clip"


def test_bundle_reads_the_calibrated_threshold_beside_the_weights(saved, tmp_path):
    from slip.rankers.loading import load_ranker_bundle

    (saved / "threshold.json").write_text(json.dumps({"threshold": 0.21, "metric": "f1"}))
    bundle = load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path)
    assert bundle.threshold == 0.21
    assert bundle.ref == load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path).ref
    for bad in ("{0.2", json.dumps({"threshold": 1.5}), json.dumps({"threshold": True})):
        (saved / "threshold.json").write_text(bad)
        with pytest.raises(ConfigError, match="threshold.json"):
            load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path)


def test_a_threshold_calibrated_for_other_weights_is_refused(tiny, saved, tmp_path):
    """`slip calibrate --write` records the weights it calibrated (ranker_sha256); once the weights are
    replaced, that threshold means nothing for them and must not be applied silently."""
    from slip.rankers.loading import load_ranker_bundle

    calibrated_for = load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path).ref.sha256
    (saved / "threshold.json").write_text(json.dumps({"threshold": 0.21, "metric": "f1",
                                                      "ranker_sha256": calibrated_for}))
    assert load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path).threshold == 0.21
    model, tokenizer = build_tiny_clip(seed=1)  # other weights put in place, the old threshold.json kept
    save_hf_clip(model, tokenizer, saved)
    with pytest.raises(ConfigError, match="calibrated for other weights"):
        load_ranker_bundle(str(saved), device="cpu", cache_dir=tmp_path)


def test_every_ranker_name_loads_by_its_name(tmp_path, monkeypatch):
    """Each name of slip.names.RANKER_NAMES (the ones that win over a folder of that name at submit) is one the
    loader serves by name: run from a folder holding an empty folder of each name, each loads as itself."""
    from slip import names
    from slip.rankers.loading import load_ranker_bundle

    monkeypatch.chdir(tmp_path)
    for name in names.RANKER_NAMES:
        (tmp_path / name).mkdir()
        bundle = load_ranker_bundle(name, device="cpu")
        assert bundle.ref.spec == name and bundle.ref.arch in (name, "synth-clip"), bundle.ref
        assert len(bundle.ref.sha256) == 64
