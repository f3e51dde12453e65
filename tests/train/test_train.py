"""The training recipe: the loss, one optimisation step, a whole (tiny) run, CLIP fine-tuning."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from slip.data.dataset import CaptionDataset, caption_tokens
from slip.data.folder import scan_folder
from slip.errors import ConfigError, DatasetError
from slip.rankers.dual_encoder import DualEncoderRanker
from slip.rankers.hf_clip import HFClipRanker
from slip.rankers.loading import load_ranker
from slip.train import TrainConfig, train_ranker
from slip.train.ranker import balanced_sampler
from slip.train.contrastive import paper_clip_loss, symmetric_clip_loss
from slip.train.towers import build_dual_encoder
from slip.train.trainees import dual_encoder_trainee


def test_paper_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    image = torch.nn.functional.layer_norm(torch.randn(8, 16), (16,))
    aligned = paper_clip_loss(image, image.clone())
    shuffled = paper_clip_loss(image, image[torch.randperm(8)])
    assert aligned < shuffled
    labels = torch.arange(8)
    assert symmetric_clip_loss(image, image, torch.tensor(2.0), labels) < symmetric_clip_loss(
        image, image.flip(0), torch.tensor(2.0), labels)


@pytest.mark.parametrize("loss", ["paper", "clip"])
def test_training_steps_lower_the_loss_on_a_tiny_dataset(synth_dir, tiny_config, loss):
    folder = scan_folder(synth_dir)
    model, tokenizer, _ = build_dual_encoder(tiny_config, seed=0)
    trainee = dual_encoder_trainee(model, tokenizer, loss=loss)
    data = CaptionDataset(folder.records[::3], image_size=32, segment_view_prob=0.5, random=False)
    pixels = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    ids, mask = caption_tokens(tokenizer, folder.captions, 16)
    optimizer = torch.optim.AdamW(trainee.param_groups(lr=1e-2, image_lr=1e-3, text_lr=1e-3, weight_decay=1e-3))
    torch.manual_seed(0)  # dropout masks of the training steps
    trainee.module.train()  # batch statistics in BatchNorm; the same dropout masks for both measurements

    def measure() -> float:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return trainee.loss(pixels, labels, ids, mask).item()

    before = measure()
    for _ in range(15):
        loss = trainee.loss(pixels, labels, ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = measure()
    assert after < 0.6 * before, (before, after)


def test_param_groups_follow_the_recipe(tiny_config):
    model, tokenizer, _ = build_dual_encoder(tiny_config)
    groups = dual_encoder_trainee(model, tokenizer).param_groups(lr=1e-3, image_lr=1e-4, text_lr=1e-5, weight_decay=1e-3)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("image", 1e-4, 0.0), ("text", 1e-5, 0.0), ("heads", 1e-3, 1e-3)]
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())


def test_clip_loss_learns_its_temperature_but_saves_the_plain_checkpoint(tmp_path, tiny_config):
    model, tokenizer, _ = build_dual_encoder(tiny_config)
    trainee = dual_encoder_trainee(model, tokenizer, loss="clip")
    groups = trainee.param_groups(lr=1e-3, image_lr=1e-4, text_lr=1e-5, weight_decay=1e-3)
    assert [g["name"] for g in groups] == ["logit_scale", "image", "text", "heads"]
    trainee.save(tmp_path / "ckpt", training={})
    assert isinstance(load_ranker(str(tmp_path / "ckpt"), device="cpu"), DualEncoderRanker)
    with pytest.raises(ConfigError, match="loss"):
        dual_encoder_trainee(model, tokenizer, loss="hinge")
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="hinge")


def test_train_ranker_writes_best_checkpoint_and_curves(tmp_path, synth_dir, tiny_config):
    seen = []
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, image_lr=1e-3, text_lr=1e-4, device="cpu",
                         progress=False, save_initial=True)
    result = train_ranker(synth_dir, tmp_path / "out", model=tiny_config, config=config, on_epoch=seen.append)
    out = tmp_path / "out"
    curve = json.loads((out / "curve.json").read_text())
    assert [e["epoch"] for e in curve["epochs"]] == [1, 2] and len(seen) == 2
    best = min(curve["epochs"], key=lambda e: e["val_loss"])
    assert curve["best_epoch"] == result.best_epoch == best["epoch"]
    assert result.best_val_loss == pytest.approx(best["val_loss"])
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "config.json").read_text())
    assert meta["training"]["best_epoch"] == result.best_epoch and meta["training"]["classes"][0] == "circle"
    trained = load_ranker(str(out), device="cpu")
    initial = load_ranker(str(out / "initial"), device="cpu")
    assert isinstance(trained, DualEncoderRanker)
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(trained.encode_images(x), initial.encode_images(x))


def test_train_ranker_fine_tunes_a_hugging_face_clip(tmp_path, synth_dir):
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", progress=False)
    result = train_ranker(synth_dir, tmp_path / "clip", init="tiny-random", config=config)
    ranker = load_ranker(str(result.out), device="cpu")
    assert isinstance(ranker, HFClipRanker)
    assert (result.out / "curve.json").is_file() and (result.out / "slip_training.json").is_file()
    assert ranker.encode_texts(["circle"]).shape == (1, 32)


def test_balanced_draws_give_each_class_the_same_share():
    labels = [0] * 90 + [1] * 8 + [2] * 2  # a skewed review: 90 / 8 / 2 crops
    sampler = balanced_sampler(labels, torch.Generator().manual_seed(0))
    drawn = [labels[i] for _ in range(30) for i in sampler]  # 30 epochs of 100 draws
    assert len(drawn) == 30 * len(labels)
    shares = torch.bincount(torch.tensor(drawn)).double() / len(drawn)
    assert torch.allclose(shares, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03), shares
    again = [labels[i] for i in balanced_sampler(labels, torch.Generator().manual_seed(0))]
    assert again == drawn[: len(labels)]  # seeded


def test_balanced_training_draws_another_data_order(tmp_path, synth_dir, tiny_config):
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-2, image_lr=1e-3, text_lr=1e-4, device="cpu", progress=False)
    plain = train_ranker(synth_dir, tmp_path / "plain", model=tiny_config, config=config)
    balanced = train_ranker(synth_dir, tmp_path / "balanced", model=tiny_config,
                            config=replace(config, balance_classes=True))
    assert json.loads((balanced.out / "config.json").read_text())["training"]["config"]["balance_classes"] is True
    assert balanced.history[0]["train_loss"] != plain.history[0]["train_loss"]


def test_bad_training_requests_are_clear_errors(tmp_path, synth_dir, tiny_config):
    with pytest.raises(DatasetError):
        train_ranker(tmp_path / "nothing", tmp_path / "o", model=tiny_config, config=TrainConfig(progress=False))
    with pytest.raises(ConfigError, match="learning rate"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ConfigError, match="not both"):
        train_ranker(synth_dir, tmp_path / "o", model=tiny_config, init="tiny-random", config=TrainConfig(progress=False))
