"""SigLIP / SigLIP 2 and open_clip rankers: loaded by name, by path and by cached hub id from directories saved
from random weights of the real classes; SigLIP's own sigmoid score is the scale the pipeline thresholds on."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import put_in_hf_cache, scene
from slip.errors import WeightsError, WeightsNotFoundError
from slip.rankers.loading import load_ranker_bundle
from slip.rankers.open_clip import save_open_clip
from slip.rankers.siglip import SiglipRanker, build_tiny_siglip, save_siglip

TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                  "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def crops():
    return torch.rand((3, 3, 32, 32), generator=torch.Generator().manual_seed(0))


def test_tiny_random_siglip_is_loaded_only_by_name_and_scores_with_its_sigmoid(crops):
    bundle = load_ranker_bundle("tiny-random-siglip", device="cpu")
    ranker = bundle.ranker
    assert isinstance(ranker, SiglipRanker) and ranker.calibrated and bundle.ref.arch == "tiny-random-siglip"
    images, texts = ranker.encode_images(crops), ranker.encode_texts(["a cat", "a dog"])
    assert torch.allclose(images.norm(dim=1), torch.ones(3)) and texts.shape == (2, images.shape[1])
    model = ranker.model
    tokens = ranker.tokenizer(["a cat", "a dog"], padding="max_length", max_length=ranker.text_length,
                              return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], pixel_values=(crops - 0.5) / 0.5).logits_per_image
    assert torch.allclose(ranker.score(images @ texts.T), torch.sigmoid(logits), atol=1e-5)


def test_a_saved_siglip_directory_loads_by_path_and_by_cached_hub_id(tmp_path, crops):
    model, tokenizer = build_tiny_siglip(seed=3)
    directory = save_siglip(model, tokenizer, tmp_path / "siglip")
    by_path = load_ranker_bundle(str(directory), device="cpu")
    put_in_hf_cache(tmp_path / "cache", "google/siglip-tiny-random", directory)
    by_id = load_ranker_bundle("google/siglip-tiny-random", device="cpu", cache_dir=tmp_path / "cache")
    assert by_path.ref.arch == by_id.ref.arch == "hf-siglip" and by_path.ref.sha256 == by_id.ref.sha256
    reference = SiglipRanker(model, tokenizer, spec="memory")
    assert torch.allclose(by_path.ranker.encode_images(crops), reference.encode_images(crops), atol=1e-6)
    assert torch.allclose(by_id.ranker.encode_texts(["a cat"]), reference.encode_texts(["a cat"]), atol=1e-6)


def test_a_siglip2_naflex_directory_loads_and_embeds(tmp_path, crops):
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    from slip.rankers.hf_clip import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = Siglip2Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=8, num_patches=16))
    torch.manual_seed(0)
    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    directory = save_siglip(Siglip2Model(config).eval(), tokenizer, tmp_path / "siglip2", image_processor=processor)
    bundle = load_ranker_bundle(str(directory), device="cpu")
    assert bundle.ref.arch == "hf-siglip2" and bundle.ranker.image_size == 32
    images = bundle.ranker.encode_images(crops)
    assert images.shape[0] == 3 and torch.allclose(images.norm(dim=1), torch.ones(3))
    assert bundle.ranker.score(images @ bundle.ranker.encode_texts(["x"]).T).shape == (3, 1)


def test_an_open_clip_checkpoint_loads_from_local_files_and_a_cached_hf_hub_id(tmp_path, crops):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP).eval()
    directory = save_open_clip(model, TINY_OPEN_CLIP, tmp_path / "oc", preprocess_cfg={"mean": [0.5] * 3,
                                                                                        "std": [0.5] * 3})
    by_path = load_ranker_bundle(str(directory), device="cpu")
    put_in_hf_cache(tmp_path / "cache", "laion/tiny-random-clip", directory)
    by_id = load_ranker_bundle("hf-hub:laion/tiny-random-clip", device="cpu", cache_dir=tmp_path / "cache")
    assert by_path.ref.arch == by_id.ref.arch == "open-clip" and not by_path.ranker.calibrated
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image((crops - 0.5) / 0.5), dim=-1)
    assert torch.allclose(by_path.ranker.encode_images(crops), expected, atol=1e-6)
    assert torch.allclose(by_id.ranker.encode_texts(["a cat"]), by_path.ranker.encode_texts(["a cat"]))


def test_a_missing_hf_hub_id_names_the_fetch_command(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="slip weights fetch laion/missing") as info:
        load_ranker_bundle("hf-hub:laion/missing", device="cpu", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_a_broken_siglip_directory_is_one_line(tmp_path):
    model, tokenizer = build_tiny_siglip()
    directory = save_siglip(model, tokenizer, tmp_path / "broken")
    (directory / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(WeightsError) as info:
        load_ranker_bundle(str(directory), device="cpu")
    assert "\n" not in str(info.value) and str(directory) in str(info.value)


def test_the_pipeline_thresholds_a_calibrated_ranker_on_its_own_score():
    from slip.engines.build import build_engine
    from slip.options import SegmentOptions
    from slip.settings import ModelSettings

    settings = ModelSettings(sam="tiny-random", clip="tiny-random-siglip", device="cpu")
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "filters": "none"}
    image = scene()
    result = build_engine(settings, SegmentOptions.parse({**options, "threshold": 0.0}))(image, ["a cat"])
    assert len(result.proposals.segments) > 0
    assert ((result.similarity > 0) & (result.similarity < 1)).all()  # probabilities, not cosines
    (match,) = result.matches
    assert match.instances and match.instances[0][1] == pytest.approx(float(result.similarity[:, 0].max()))
    strict = build_engine(settings, SegmentOptions.parse({**options, "threshold": 0.999}))(image, ["a cat"])
    assert not strict.matches[0].instances  # no pair reaches 99.9 %
