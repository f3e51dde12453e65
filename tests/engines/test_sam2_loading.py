"""SAM 2 / 2.1 checkpoints: the official ``.pt`` format and Hugging Face ``Sam2Model`` directories load into the one
official model, give identical proposals, carry their digest, and fail in one line when they are wrong."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import official_tiny_sam2, put_in_hf_cache, save_hf_sam2, save_official, scene
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError
from slip.proposers.loading import load_proposer_model
from slip.proposers.sam2_generator import Sam2MaskGenerator
from slip.proposers.sam2_model import SAM2_ARCHS, build_sam2, detect_sam2_arch
from slip.weights import sha256_file

OPTIONS = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights as an official ``.pt`` and as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("sam2")
    model = official_tiny_sam2()
    pt = save_official(model, root / "official" / "sam2.1_hiera_tiny_random.pt")
    hf_dir = root / "hf"
    hf = save_hf_sam2(model, hf_dir)
    return model, pt, hf_dir, hf


def test_official_pt_and_hf_directory_give_identical_proposals(checkpoints):
    model, pt, hf_dir, _ = checkpoints
    official, converted = load_proposer_model(str(pt), device="cpu"), load_proposer_model(str(hf_dir), device="cpu")
    assert (official.family, converted.family) == ("sam2", "sam2")
    assert (official.ref.arch, converted.ref.arch) == ("tiny-random-sam2", "hf-tiny-random-sam2")
    assert official.ref.sha256 == sha256_file(pt)  # the digest of the file really loaded
    image = scene()
    a = Sam2MaskGenerator(official.model, **OPTIONS).generate(image)
    b = Sam2MaskGenerator(converted.model, **OPTIONS).generate(image)
    assert len(a) == len(b) >= 50
    for x, y in zip(a, b):
        assert (x["segmentation"] == y["segmentation"]).all()
        assert (x["predicted_iou"], x["stability_score"], x["bbox"]) == (y["predicted_iou"], y["stability_score"], y["bbox"])
    # every image-path tensor came from the checkpoint
    state = model.state_dict()
    for name, tensor in converted.model.state_dict().items():
        if name.startswith(("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")):
            assert torch.equal(tensor, state[name]), name


def test_the_name_mapping_means_the_same_model(checkpoints):
    """transformers' own Sam2Model on the mapped weights computes what the official decoder computes."""
    model, _, _, hf = checkpoints
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 1024, 1024)
    point, label = torch.tensor([[[300.0, 400.0]]]), torch.ones(1, 1, dtype=torch.int)
    with torch.no_grad():
        ours = model.forward_image(pixels)
        _, feats, _, _ = model._prepare_backbone_features(ours)
        feats[-1] = feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).view(1, -1, s, s) for f, s in zip(feats, (256, 128, 64))]
        sparse, dense = model.sam_prompt_encoder(points=(point, label), boxes=None, masks=None)
        logits, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=maps[-1], image_pe=model.sam_prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False, high_res_features=maps[:-1])
        theirs = hf(pixel_values=pixels, input_points=point[None], input_labels=label[None], multimask_output=True)
    assert torch.allclose(theirs.pred_masks[0, 0], logits[0], atol=1e-5)
    assert torch.allclose(theirs.iou_scores[0, 0], iou[0], atol=1e-6)


def test_a_cached_hub_id_loads_the_hugging_face_snapshot(checkpoints, tmp_path):
    _, _, hf_dir, _ = checkpoints
    put_in_hf_cache(tmp_path, "someone/sam2-tiny-random", hf_dir)
    loaded = load_proposer_model("someone/sam2-tiny-random", device="cpu", cache_dir=tmp_path)
    assert loaded.family == "sam2" and loaded.ref.spec == "someone/sam2-tiny-random"


def test_released_sizes_are_recognised_from_their_shapes():
    for name in ("sam2.1-hiera-tiny", "sam2-hiera-small"):
        with torch.random.fork_rng(devices=[]):
            state = build_sam2(SAM2_ARCHS[name]).state_dict()
        assert detect_sam2_arch(state).name == name


def test_a_missing_released_model_names_cache_fetch_command_and_official_file(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_proposer_model("sam2.1-hiera-large", device="cpu", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "hf") in message and "SLIP_CACHE" in message
    assert "slip weights fetch facebook/sam2.1-hiera-large" in message and "sam2.1_hiera_large.pt" in message


def test_a_corrupt_official_file_is_one_line(tmp_path):
    bad = tmp_path / "sam2.1_hiera_tiny.pt"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises((WeightsError, ConfigError)) as info:
        load_proposer_model(str(bad), device="cpu")
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_a_hugging_face_directory_with_a_missing_tensor_is_one_line(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, hf_dir, _ = checkpoints
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    state.pop("mask_decoder.iou_token.weight")
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(WeightsError, match="mask_decoder.iou_token.weight") as info:
        load_proposer_model(str(broken), device="cpu")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["tiny-random-sam3", "facebook/sam3", "sam3"])
def test_a_sam3_checkpoint_given_as_a_proposer_is_refused_before_loading(spec, tmp_path):
    with pytest.raises(ConfigError, match="--engine sam3") as info:
        load_proposer_model(spec, device="cpu", cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_a_sam3_directory_given_as_a_proposer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam3"}))
    with pytest.raises(ConfigError, match="SAM 3 checkpoint"):
        load_proposer_model(str(tmp_path), device="cpu")
