"""SAM training: the recipe learns, checkpoints round-trip, freezing freezes, COCO input works.

Tiny data (synthetic objects at 64 px) and the ``tiny-random`` architecture (img_size 128), CPU only.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from slip.data.synth import generate_dataset, render_object
from slip.errors import ConfigError, DatasetError
from slip.sam import SAM_ARCHS, build_sam, build_tiny_sam, load_sam, load_sam_checkpoint, save_sam
from slip.train.sam import (
    SYNTH_SAM_ARCH,
    SamTrainConfig,
    arch_of,
    read_generator_params,
    train_sam,
)
from slip.train.sam_data import (
    PLAIN_SCENES,
    InstanceImage,
    PromptConfig,
    SceneConfig,
    build_scene,
    coco_bank,
    sample_prompts,
)
from slip.train.sam_step import collate, decode, evaluate, predict, validation_batches

TINY = dict(
    batch_images=8,
    prompts_per_image=4,
    warmup_steps=2,
    val_scenes=8,
    val_fraction=0.25,
    progress=False,
    device="cpu",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 classes x 8 images of 64 px, with masks."""
    return generate_dataset(tmp_path_factory.mktemp("synth"), classes=4, per_class=8, size=64, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def _batch(seed: int = 0, size: int = 128):
    """A collated batch of two random scenes with points and boxes."""
    rng = np.random.default_rng(seed)
    items = []
    for name in ("circle", "star", "fish", "house"):
        image, mask = render_object(name, rng, 64)
        items.append(InstanceImage(image, mask[None], (64, 64)))
    from slip.train.sam_data import InstanceBank

    bank = InstanceBank(items, name="test")
    scenes = [build_scene(bank, rng, SceneConfig(size=size, composite_prob=1.0)) for _ in range(2)]
    prompts = [sample_prompts(s, 6, rng, PromptConfig(point_fraction=0.5, background_fraction=0.3)) for s in scenes]
    return collate(scenes, prompts)


# --- the batched forward ---------------------------------------------------------------------------------


def test_batched_decoder_matches_the_official_one_image_decoder():
    sam = build_tiny_sam()
    batch = _batch()
    with torch.no_grad():
        embeddings = sam.image_encoder(torch.stack([sam.preprocess(x) for x in batch.images]))
        labels = torch.ones(batch.points.shape[:2])
        sparse, dense = sam.prompt_encoder(points=(batch.points, labels), boxes=None, masks=None)
        mine, mine_iou = decode(sam.mask_decoder, sam.prompt_encoder.get_dense_pe(),
                                embeddings[batch.image_index[: batch.num_points]], sparse, dense[:1])
        for i in range(batch.num_points):  # the official decoder, one prompt at a time
            ref, ref_iou = sam.mask_decoder(embeddings[batch.image_index[i]][None], sam.prompt_encoder.get_dense_pe(),
                                            sparse[i : i + 1], dense[i : i + 1], multimask_output=True)
            torch.testing.assert_close(mine[i : i + 1, 1:], ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine_iou[i : i + 1, 1:], ref_iou, rtol=1e-4, atol=1e-4)


def test_predict_shapes_points_then_boxes():
    batch = _batch()
    out = predict(build_tiny_sam(), batch, train_image_encoder=False)
    n_points, n_boxes = batch.num_points, batch.boxes.shape[0]
    assert n_points and n_boxes and batch.background.any()
    assert out.point_logits.shape == (n_points, 3, 32, 32) and out.point_iou.shape == (n_points, 3)
    assert out.box_logits.shape == (n_boxes, 1, 32, 32) and out.box_iou.shape == (n_boxes, 1)
    assert not batch.targets[batch.background].any()  # background prompts target an empty mask


def test_prompts_come_from_the_ground_truth():
    rng = np.random.default_rng(1)
    image, mask = render_object("heart", rng, 64)
    scene = InstanceImage(image, mask[None], (64, 64))
    for p in sample_prompts(scene, 40, rng, PromptConfig(point_fraction=0.5, box_jitter=0.0)):
        if p.kind == "point":
            assert mask[int(p.coords[1]), int(p.coords[0])]
        else:  # unjittered box = the tight box, inclusive pixel indices
            ys, xs = np.nonzero(mask)
            assert p.coords == (xs.min(), ys.min(), xs.max(), ys.max())


# --- training --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """tiny-random from scratch on single big objects, 80 steps."""
    out = tmp_path_factory.mktemp("trained")
    config = SamTrainConfig(epochs=8, scenes_per_epoch=80, lr=3e-3, scenes=PLAIN_SCENES, **TINY)
    return train_sam(dataset, out, arch="tiny-random", config=config), config


def test_training_lowers_loss_and_raises_validation_miou(trained):
    result, _ = trained
    start, first, last = result.history[0], result.history[1], result.history[-1]
    assert start["epoch"] == 0 and "train_loss" not in start  # the untrained starting point
    assert last["train_loss"] < 0.6 * first["train_loss"]
    assert last["val_loss"] < start["val_loss"]
    assert last["val_miou"] > start["val_miou"] + 0.05
    assert result.best_val_miou == max(h["val_miou"] for h in result.history[1:])
    curve = json.loads((result.out / "curve.json").read_text())
    assert [h["epoch"] for h in curve["epochs"]] == list(range(9)) and curve["best_epoch"] == result.best_epoch
    assert (result.out / "curve.png").stat().st_size > 1000


def test_checkpoint_round_trip_gives_identical_outputs(trained, tmp_path):
    result, config = trained
    assert json.loads((result.out / "config.json").read_text())["name"] == "tiny-random"
    sam = load_sam(str(result.out), device="cpu")  # the directory: sam.pth + config.json
    same = load_sam(str(result.out / "sam.pth"), device="cpu")  # the file: config.json beside it
    batch = _batch(seed=3)
    with torch.no_grad():
        a, b = predict(sam, batch, train_image_encoder=False), predict(same, batch, train_image_encoder=False)
    torch.testing.assert_close(a.point_logits, b.point_logits, rtol=0, atol=0)
    # the saved weights are the best epoch's: re-validating them reproduces its recorded mIoU
    from slip.train.sam import _banks

    _, val_bank, scenes = _banks(Path(json.loads((result.out / "training.json").read_text())["dataset"]), None, config)
    batches = validation_batches(val_bank, replace(scenes, size=128), count=config.val_scenes,
                                 batch_images=config.batch_images, seed=config.seed)
    again = evaluate(sam, batches, torch.device("cpu"), size=32, weights=config.loss)
    assert again["val_miou"] == pytest.approx(result.best_val_miou, abs=1e-6)
    # and it saves / loads again through the official-format writer
    save_sam(sam, tmp_path / "again" / "sam.pth", arch_of(sam))
    reloaded, arch = load_sam_checkpoint(tmp_path / "again")
    assert arch == SAM_ARCHS["tiny-random"]
    for key, value in sam.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_half_checkpoint_is_smaller_and_loads_as_fp32(dataset, tmp_path):
    config = SamTrainConfig(epochs=1, scenes_per_epoch=8, lr=1e-3, half=True, scenes=PLAIN_SCENES, **TINY)
    result = train_sam(dataset, tmp_path / "half", start="tiny-random", config=config)
    state = torch.load(result.out / "sam.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    sam = load_sam(str(result.out), device="cpu")
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    for key, value in state.items():
        torch.testing.assert_close(sam.state_dict()[key], value.float(), rtol=0, atol=0)


def test_freeze_options_really_freeze(dataset, tmp_path):
    before = build_tiny_sam().state_dict()
    config = SamTrainConfig(epochs=1, scenes_per_epoch=16, lr=1e-3, freeze_image_encoder=True,
                            freeze_prompt_encoder=True, **TINY)
    result = train_sam(dataset, tmp_path / "frozen", start="tiny-random", config=config)
    after = load_sam(str(result.out), device="cpu").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) for k in changed)


def test_start_and_arch_are_exclusive(dataset, tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        train_sam(dataset, tmp_path / "x", start="tiny-random", arch="tiny-random", config=SamTrainConfig(**TINY))
    with pytest.raises(ConfigError, match="unknown SAM architecture"):
        train_sam(dataset, tmp_path / "x", arch="vit_z", config=SamTrainConfig(**TINY))


def test_arch_of_recognises_registry_sizes():
    assert arch_of(build_sam(SYNTH_SAM_ARCH)).name == "synth-sam"
    assert arch_of(build_tiny_sam()) == SAM_ARCHS["tiny-random"] and arch_of(build_tiny_sam()).name == "tiny-random"


# --- COCO ------------------------------------------------------------------------------------------------


def _coco_dataset(root: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """4 images of 96x80 px with two objects each: one annotated as RLE, one as a polygon."""
    rng = np.random.default_rng(5)
    images, annotations, truth = [], [], []
    (root / "images").mkdir(parents=True)
    for i in range(4):
        canvas = np.full((80, 96, 3), 40 + 30 * i, np.uint8)
        blob, mask = render_object(["circle", "star", "cat", "house"][i], rng, 48)
        canvas[:48, :48][mask] = blob[mask]
        full = np.zeros((80, 96), bool)
        full[:48, :48] = mask
        canvas[50:74, 60:90] = (220, 30, 30)  # a rectangle, annotated as a polygon
        rect = np.zeros((80, 96), bool)
        rect[50:74, 60:90] = True
        Image.fromarray(canvas).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 80, "width": 96})
        rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 1, "segmentation": rle,
                            "area": float(full.sum()), "bbox": [0, 0, 48, 48], "iscrowd": 0})
        annotations.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 1,
                            "segmentation": [[60, 50, 90, 50, 90, 74, 60, 74]], "area": 720.0,
                            "bbox": [60, 50, 30, 24], "iscrowd": 0})
        truth += [full, rect]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return ann, root / "images", truth


def test_coco_annotations_decode_and_train(tmp_path):
    ann, image_dir, truth = _coco_dataset(tmp_path / "coco")
    bank = coco_bank(ann, image_dir)
    assert len(bank) == 4 and bank.instances == 8
    assert np.array_equal(bank[0].masks[0], truth[0])  # RLE: exact
    iou = (bank[0].masks[1] & truth[1]).sum() / (bank[0].masks[1] | truth[1]).sum()
    assert iou > 0.9  # polygon: rasterised by pycocotools
    config = SamTrainConfig(epochs=2, scenes_per_epoch=8, lr=1e-3, **{**TINY, "batch_images": 2})
    result = train_sam(image_dir, tmp_path / "out", start="tiny-random", coco=ann, config=config)
    assert len(result.history) == 3 and (result.out / "sam.pth").is_file()
    meta = json.loads((result.out / "training.json").read_text())
    assert meta["coco"] == str(ann) and meta["config"]["scenes"] is None


def test_bad_coco_file_is_a_dataset_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError):
        coco_bank(tmp_path / "bad.json", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        coco_bank(tmp_path / "missing.json", tmp_path)


def test_folder_without_masks_is_a_dataset_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "ds" / c / f"{i}.png")
    with pytest.raises(DatasetError, match="mask"):
        train_sam(tmp_path / "ds", tmp_path / "out", arch="tiny-random", config=SamTrainConfig(**TINY))


# --- CLI -------------------------------------------------------------------------------------------------


def _cli():
    import typer

    from slip.cli.train_sam import train_sam as command

    app = typer.Typer()
    app.command()(command)
    return app


def test_cli_trains_and_reports(dataset, tmp_path):
    result = CliRunner().invoke(_cli(), [str(dataset), "--out", str(tmp_path / "o"), "--arch", "tiny-random",
                                         "--epochs", "1", "--scenes-per-epoch", "8", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "best validation mIoU" in result.output and (tmp_path / "o" / "sam.pth").is_file()


@pytest.mark.parametrize("args, message", [
    (["--arch", "tiny-random"], "--out"),
    (["--out", "o", "--arch", "tiny-random", "--sam", "tiny-random"], "exactly one"),
    (["--out", "o", "--sam", "vit_q"], "vit_q"),
])
def test_cli_errors_are_one_line_exit_2(dataset, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(_cli(), [str(dataset), *args, "--device", "cpu", "-q"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_missing_dataset(tmp_path):
    result = CliRunner().invoke(_cli(), [str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--arch", "tiny-random"])
    assert result.exit_code == 2 and "does not exist" in result.output


# --- the bundled model -----------------------------------------------------------------------------------


def test_generator_params_are_read_beside_a_checkpoint(tmp_path):
    assert read_generator_params(tmp_path) == {}
    (tmp_path / "generator.json").write_text(json.dumps({"points_per_side": 16}))
    assert read_generator_params(tmp_path / "sam.pth") == {"points_per_side": 16}


@pytest.fixture(scope="module")
def bundled():
    from slip.train.sam import BUNDLE_DIR

    return BUNDLE_DIR


def test_bundled_synth_sam_is_small_and_loads(bundled):
    from slip.sam import SamArch

    assert {"sam.pth", "config.json", "generator.json"} <= {p.name for p in bundled.iterdir()}
    assert (bundled / "sam.pth").stat().st_size < 5_000_000  # a few MB: fp16 weights
    assert SamArch.from_json(json.loads((bundled / "config.json").read_text())) == SYNTH_SAM_ARCH
    sam = load_sam("synth", device="cpu")
    assert arch_of(sam) == SYNTH_SAM_ARCH and all(p.dtype == torch.float32 for p in sam.parameters())
    params = read_generator_params(bundled)
    from slip.generator import MaskGenerator

    MaskGenerator(sam, **params)  # the recorded generator options are valid MaskGenerator options


def test_bundled_synth_sam_segments_held_out_objects_from_one_point():
    """Held-out ``render_scene`` images (the model never trains on them), one point deep inside each
    object, through the official SamPredictor: the highest-scoring mask must match the object."""
    from scipy.ndimage import distance_transform_edt
    from segment_anything import SamPredictor

    from slip.data.synth import CLASS_NAMES, render_scene

    predictor = SamPredictor(load_sam("synth", device="cpu"))
    rng = np.random.default_rng([4242, 1])
    ious = []
    for _ in range(10):
        names = [str(n) for n in rng.choice(CLASS_NAMES, size=3, replace=False)]
        image, masks = render_scene(names, rng, 256)
        predictor.set_image(image)
        for mask in masks:
            if mask.sum() < 200:  # mostly hidden behind later objects
                continue
            y, x = np.unravel_index(np.argmax(distance_transform_edt(mask)), mask.shape)
            pred, scores, _ = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
            best = pred[int(np.argmax(scores))]
            ious.append((best & mask).sum() / (best | mask).sum())
    assert len(ious) >= 20
    assert float(np.mean(ious)) > 0.65, ious  # measured 0.78; random weights 0.04
