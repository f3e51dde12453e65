"""EdgeTAM and the SAM 3 tracker as proposers (transformers models with SAM 2's prompt interface): seeded tiny-random
builds of the real classes, ``save_pretrained`` directories and cached snapshots (facebook/sam3's own layout for the
tracker) that load by spec with their digest, our generator against transformers' ``mask-generation`` pipeline, the
one-line errors, ``slip weights fetch`` and ``slip segment`` end to end. The fast point decoder equals the model's own
forward bit for bit."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from engine_helpers import put_in_hf_cache, scene
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError
from slip.proposers.hf_tracker_fast import HfFastPointDecoder
from slip.proposers.hf_tracker_generator import HfPointDecoder, HfTrackerMaskGenerator
from slip.proposers.hf_trackers import FAMILIES, attach_processor, build_tiny_tracker, image_processor_of, save_tracker
from slip.proposers.loading import load_proposer_model
from slip.weights import directory_sha256, hub_id, tensors_sha256

FAMILY_NAMES = list(FAMILIES)  # edgetam, sam3-tracker
NO_FILTERS = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny-random model and its ``save_pretrained`` directory (model + image processor)."""
    root = tmp_path_factory.mktemp("trackers")
    out = {}
    for name in FAMILY_NAMES:
        model, processor = build_tiny_tracker(name)
        attach_processor(model, processor)
        out[name] = model, save_tracker(model, processor, root / name)
    return out


def test_tiny_random_builds_are_seeded_deterministic_and_tiny():
    for name in FAMILY_NAMES:
        a, b, other = build_tiny_tracker(name)[0], build_tiny_tracker(name)[0], build_tiny_tracker(name, seed=1)[0]
        assert tensors_sha256(a.state_dict()) == tensors_sha256(b.state_dict()) != tensors_sha256(other.state_dict())
        assert sum(p.numel() for p in a.parameters()) < 200_000
        assert a.config.model_type in FAMILIES[name].model_types
    state = torch.random.get_rng_state()
    build_tiny_tracker("edgetam")
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left as it was
    ref = load_proposer_model("tiny-random-sam3-tracker", device="cpu").ref
    expected = tensors_sha256(build_tiny_tracker("sam3-tracker")[0].state_dict())
    assert ref.arch == "tiny-random-sam3-tracker" and ref.sha256 == expected


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_saved_directory_and_a_cached_hub_id_give_the_in_memory_proposals(saved, name, tmp_path):
    model, directory = saved[name]
    loaded = load_proposer_model(str(directory), device="cpu")
    assert (loaded.family, loaded.ref.arch) == (name, f"hf-{name}")
    assert loaded.ref.sha256 == directory_sha256(directory)  # the files really loaded
    assert loaded.generator["pred_iou_thresh"] == 0.8 and loaded.filters is None
    reference = model.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in loaded.model.state_dict().items())
    image = scene()
    options = dict(points_per_side=6, **NO_FILTERS)
    ours, theirs = (HfTrackerMaskGenerator(m, **options).generate(image) for m in (model, loaded.model))
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert np.array_equal(a["segmentation"], b["segmentation"])
        assert all(a[k] == b[k] for k in a if k != "segmentation")
    put_in_hf_cache(tmp_path, f"someone/{name}-tiny", directory)
    cached = load_proposer_model(f"someone/{name}-tiny", device="cpu", cache_dir=tmp_path)
    assert cached.family == name and cached.ref.sha256 == loaded.ref.sha256


VIDEO_CLASSES = {"edgetam": "EdgeTamVideoModel", "sam3-tracker": "Sam3TrackerVideoModel"}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_video_model_directory_proposes_with_its_image_model(saved, name, tmp_path):
    """``edgetam_video`` / ``sam3_tracker_video`` directories (the video model: the image model plus memory
    modules) load as the family's proposer, with the image model's tensors and its proposals."""
    import transformers

    model, _ = saved[name]
    video_class = getattr(transformers, VIDEO_CLASSES[name])
    parts = {k: getattr(model.config, k).to_dict() for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        video = video_class(video_class.config_class(**parts)).eval()
    unexpected = video.load_state_dict(model.state_dict(), strict=False).unexpected_keys  # every image tensor is in it
    assert not unexpected and video.config.model_type in FAMILIES[name].model_types
    directory = save_tracker(video, image_processor_of(model), tmp_path / f"{name}-video")
    loaded = load_proposer_model(str(directory), device="cpu")
    assert loaded.family == name and loaded.ref.sha256 == directory_sha256(directory)
    reference = model.state_dict()
    assert loaded.model.state_dict().keys() == reference.keys()
    assert all(torch.equal(t, reference[k]) for k, t in loaded.model.state_dict().items())
    options = dict(points_per_side=4, **NO_FILTERS)
    ours, theirs = (HfTrackerMaskGenerator(m, **options).generate(scene()) for m in (model, loaded.model))
    assert len(ours) == len(theirs) > 0
    assert all(np.array_equal(a["segmentation"], b["segmentation"]) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_fast_point_decoder_is_bit_identical_to_the_model_forward(name):
    model = build_tiny_tracker(name)[0]
    with torch.inference_mode():
        pixels = image_processor_of(model)(images=scene(), return_tensors="pt")["pixel_values"]
        features = model.get_image_embeddings(pixels)
        for points, chunk in ((64, None), (7, None), (1, None), (16, 3)):
            torch.manual_seed(points)
            coords = torch.rand(points, 2) * model.config.prompt_encoder_config.image_size
            logits, iou = HfPointDecoder(model, features)(coords)
            fast_logits, fast_iou = HfFastPointDecoder(model, features, chunk=chunk)(coords)
            assert logits.shape[:2] == (points, 3) and torch.equal(fast_logits, logits) and torch.equal(fast_iou, iou)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_ours_equals_the_transformers_mask_generation_pipeline(name):
    """Thresholds 0, no crop layers, NMS at 1.0 on both sides (every mask kept), a square image (the pipeline
    misplaces grid points on other shapes: see slip.proposers.hf_tracker_generator): the same masks, scores and
    boxes, in the same order — bit for bit, not just IoU >= 0.99."""
    from transformers import pipeline

    model, processor = build_tiny_tracker(name)
    attach_processor(model, processor)
    image = scene(112, 112, seed=3)
    ours = HfTrackerMaskGenerator(model, points_per_side=8, box_nms_thresh=1.0, **NO_FILTERS).generate_masks(image)
    generate = pipeline("mask-generation", model=model, image_processor=processor, device="cpu")
    theirs = generate(Image.fromarray(image), points_per_crop=8, points_per_batch=64, crops_nms_thresh=1.0,
                      output_bboxes_mask=True, **NO_FILTERS)
    assert len(ours) == len(theirs["masks"]) == 3 * 64
    assert torch.equal(ours.masks, torch.stack(theirs["masks"]))
    assert torch.equal(ours.predicted_iou, theirs["scores"])
    assert torch.equal(ours.boxes, theirs["bounding_boxes"].float())
    assert len({int(m.sum()) for m in ours.masks}) > 3  # masks of several sizes, not one repeated


def test_crop_layers_small_regions_and_rle_records():
    model = load_proposer_model("tiny-random-edgetam", device="cpu").model
    image = scene()
    records = HfTrackerMaskGenerator(model, points_per_side=4, crop_n_layers=1, min_mask_region_area=20,
                                     output_mode="coco_rle", **NO_FILTERS).generate(image)
    crops = {tuple(r["crop_box"]) for r in records}
    assert len(crops) > 1 and (0.0, 0.0, 128.0, 96.0) in crops
    for record in records:
        x, y, w, h = record["bbox"]
        cx, cy, cw, ch = record["crop_box"]
        assert cx <= x and cy <= y and x + w <= cx + cw and y + h <= cy + ch
        assert record["segmentation"]["size"] == [96, 128] and isinstance(record["segmentation"]["counts"], str)


def test_points_on_a_non_square_crop_are_mapped_as_the_processor_maps_user_points():
    from transformers import Sam2Processor

    model, processor = build_tiny_tracker("edgetam")
    generator = HfTrackerMaskGenerator(model, points_per_side=4, **NO_FILTERS)
    points = generator.point_grids[0] * np.array([128, 96])

    class Crop:  # what MaskGenerator passes: the crop's (h, w)
        size = (96, 128)

    theirs = Sam2Processor(image_processor=processor)._normalize_coordinates(1024, torch.tensor(points), (96, 128))
    assert torch.equal(generator._model_coords(points, Crop), theirs.float())


@pytest.fixture(scope="module")
def sam3_snapshot(tmp_path_factory):
    """A tiny SAM 3 saved the way facebook/sam3 is (``Sam3VideoModel``: detector, tracker, tracker neck), in a
    weights cache as the hub snapshot ``facebook/sam3``; returns ``(cache, state dict)``."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    from slip.engines.sam3_model import build_tiny_sam3

    detector, _ = build_tiny_sam3()
    tracker = build_tiny_tracker("sam3-tracker")[0].config.to_dict()
    tracker.update(model_type="sam3_tracker_video", memory_attention_hidden_size=32, memory_attention_num_layers=1,
                   memory_attention_feed_forward_hidden_size=64, memory_encoder_hidden_size=32,
                   memory_encoder_output_channels=16, mask_downsampler_embed_dim=32, memory_fuser_embed_dim=32,
                   memory_fuser_intermediate_dim=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        video = Sam3VideoModel(Sam3VideoConfig(detector_config=detector.config.to_dict(), tracker_config=tracker))
    root = tmp_path_factory.mktemp("sam3")
    video.save_pretrained(root / "snapshot")
    build_tiny_tracker("sam3-tracker")[1].save_pretrained(root / "snapshot")
    put_in_hf_cache(root / "cache", "facebook/sam3", root / "snapshot")
    return root / "cache", video.state_dict()


def test_sam3_tracker_loads_the_tracker_out_of_the_cached_facebook_sam3(sam3_snapshot):
    cache, video = sam3_snapshot
    loaded = load_proposer_model("sam3-tracker", device="cpu", cache_dir=cache)
    assert (loaded.family, loaded.ref.spec, loaded.ref.arch) == ("sam3-tracker", "sam3-tracker", "hf-sam3-tracker")

    def source(name: str) -> str:  # facebook/sam3's name of a Sam3TrackerModel tensor
        if name.startswith("vision_encoder.backbone."):
            return f"detector_model.{name}"
        if name.startswith("vision_encoder.neck."):
            return "tracker_neck." + name.removeprefix("vision_encoder.neck.")
        return f"tracker_model.{name}"

    state = loaded.model.state_dict()
    assert len(state) > 150 and all(torch.equal(t, video[source(k)]) for k, t in state.items())
    assert len(loaded.mask_generator(dict(points_per_side=4, **NO_FILTERS)).generate(scene())) > 0
    for spec in ("sam3", "facebook/sam3"):  # SAM 3 itself stays an engine
        with pytest.raises(ConfigError, match="--engine sam3.*--sam sam3-tracker"):
            load_proposer_model(spec, device="cpu", cache_dir=cache)


@pytest.mark.parametrize("spec, expected", [
    ("edgetam", ["'yonigozlan/EdgeTAM-hf'", "slip weights fetch yonigozlan/EdgeTAM-hf"]),
    ("yonigozlan/EdgeTAM-hf", ["slip weights fetch yonigozlan/EdgeTAM-hf"]),
    ("sam3-tracker", ["'facebook/sam3'", "slip weights fetch facebook/sam3", "https://huggingface.co/facebook/sam3",
                      "HF_TOKEN"]),
])
def test_a_missing_snapshot_is_one_line_with_cache_variable_and_fetch_command(spec, expected, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_proposer_model(spec, device="cpu", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "hf") in message and "SLIP_CACHE" in message
    assert all(part in message for part in expected), message


@pytest.mark.parametrize("spec", ["sam3", "facebook/sam3", "tiny-random-sam3"])
def test_sam3_as_a_proposer_is_refused_in_one_line_naming_the_tracker(spec, tmp_path):
    with pytest.raises(ConfigError, match="--engine sam3") as info:
        load_proposer_model(spec, device="cpu", cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "--sam sam3-tracker" in str(info.value)


def test_the_engine_checks_know_the_tracker_names_before_loading():
    from slip.engines.build import check_engine_sam

    for spec in ("sam3-tracker", "tiny-random-sam3-tracker", "edgetam", "tiny-random-edgetam"):
        check_engine_sam("slip", spec)
        with pytest.raises(ConfigError, match="needs a SAM 3 checkpoint"):
            check_engine_sam("sam3", spec)
    with pytest.raises(ConfigError, match="--sam sam3-tracker"):
        check_engine_sam("slip", "sam3")


def test_a_directory_with_a_missing_tensor_is_one_line(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, directory = saved["edgetam"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in ("config.json", "preprocessor_config.json"):
        (broken / file).write_text((directory / file).read_text())
    state = load_file(str(directory / "model.safetensors"))
    state.pop("mask_decoder.iou_token.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="mask_decoder.iou_token.weight") as info:
        load_proposer_model(str(broken), device="cpu")
    assert "\n" not in str(info.value) and str(broken) in str(info.value)


def test_weights_fetch_knows_the_new_names(monkeypatch, tmp_path):
    from slip.cli.weights import weights_app

    assert (hub_id("edgetam"), hub_id("sam3-tracker")) == ("yonigozlan/EdgeTAM-hf", "facebook/sam3")
    monkeypatch.setenv("SLIP_CACHE", str(tmp_path))
    for var in ("HF_ENDPOINT", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{_closed_port()}")  # no network: the fetch fails at once
    result = CliRunner().invoke(weights_app, ["fetch", "sam3-tracker"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "facebook/sam3" in lines[0] and "https://huggingface.co/facebook/sam3" in lines[0] and "HF_TOKEN" in lines[0]
    unknown = CliRunner().invoke(weights_app, ["fetch", "sam9"]).output
    assert "edgetam" in unknown and "sam3-tracker" in unknown


def test_slip_segment_with_tiny_random_edgetam_records_the_proposer(tmp_path):
    from producer.cli import build_app

    path = tmp_path / "scene.png"
    Image.fromarray(scene()).save(path)
    args = ["segment", str(path), "-p", "x", "--sam", "tiny-random-edgetam", "--clip", "tiny-random", "--out",
            str(tmp_path / "out"), "--device", "cpu", "--points-per-side", "4", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--filters", "none"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "scene" / "segments.json").read_text())
    expected = load_proposer_model("tiny-random-edgetam", device="cpu").ref
    assert doc["request"]["sam"] == {"spec": "tiny-random-edgetam", "arch": "tiny-random-edgetam",
                                     "sha256": expected.sha256}
    assert doc["generated"] > 0 and len(doc["segments"]) > 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
