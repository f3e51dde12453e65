"""The paper's dual encoder: the Ranker protocol, checkpoint round trips, honest initialisation."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from slip.errors import ConfigError, WeightsError, WeightsNotFoundError
from slip.rankers.base import Ranker
from slip.rankers.dual_encoder import (
    ARCHITECTURE,
    DualEncoderConfig,
    DualEncoderRanker,
    ProjectionHead,
    load_dual_encoder,
    save_dual_encoder,
)
from slip.rankers.loading import load_ranker
from slip.train.towers import build_dual_encoder

TEXTS = ["circle", "letter A", "a small red fish"]


def test_ranker_protocol_shapes_and_unit_norm(tiny_config):
    model, tokenizer, init = build_dual_encoder(tiny_config)
    ranker = DualEncoderRanker(model, tokenizer, spec="test")
    assert isinstance(ranker, Ranker) and ranker.image_size == 32 and ranker.device.type == "cpu"
    images = ranker.encode_images(torch.rand(5, 3, 40, 40))  # other sizes are resized
    texts = ranker.encode_texts(TEXTS)
    assert images.shape == (5, 16) and texts.shape == (3, 16)
    assert torch.allclose(images.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(texts.norm(dim=1), torch.ones(3), atol=1e-5)
    assert init == {"image": "random", "text": "random (tiny-random)"}


def test_projection_head_is_the_papers():
    head = ProjectionHead(8, 4, dropout=0.0).eval()
    x = torch.randn(3, 8)
    p = head.projection(x)
    expected = head.layer_norm(head.fc(torch.nn.functional.gelu(p)) + p)
    assert torch.allclose(head(x), expected)


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path, tiny_config):
    model, tokenizer, init = build_dual_encoder(tiny_config, seed=3)
    with torch.no_grad():  # move the heads away from their init so a silent re-init would be caught
        for p in model.head_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    original = DualEncoderRanker(model, tokenizer, spec="orig")
    pixels = torch.rand(4, 3, 32, 32)
    save_dual_encoder(model, tokenizer, tmp_path / "ckpt", init=init, training={"note": "test"})
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["architecture"] == ARCHITECTURE and meta["config"]["proj_dim"] == 16
    for loaded in (load_dual_encoder(tmp_path / "ckpt", device="cpu"), load_ranker(str(tmp_path / "ckpt"), device="cpu")):
        assert isinstance(loaded, DualEncoderRanker)
        assert torch.allclose(loaded.encode_images(pixels), original.encode_images(pixels), atol=1e-6)
        assert torch.allclose(loaded.encode_texts(TEXTS), original.encode_texts(TEXTS), atol=1e-6)


def test_missing_weights_file_is_a_clear_error(tmp_path, tiny_config):
    model, tokenizer, _ = build_dual_encoder(tiny_config)
    save_dual_encoder(model, tokenizer, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        load_dual_encoder(tmp_path / "ckpt", device="cpu")


def test_pretrained_backbone_is_used_when_its_weights_are_on_disk(tmp_path, tiny_config):
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    (tmp_path / "timm").mkdir()
    save_file(state, str(tmp_path / "timm" / "test_resnet.safetensors"))
    config = DualEncoderConfig(**{**tiny_config.__dict__, "pretrained_image": True})
    model, _, init = build_dual_encoder(config, cache_dir=tmp_path, seed=123)
    assert init["image"] == f"pretrained: {tmp_path / 'timm' / 'test_resnet.safetensors'}"
    for k, v in model.image_encoder.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k


def test_backbone_file_missing_tensors_is_refused_not_left_random(tmp_path, tiny_config):
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    state = {k: v.clone() for k, v in reference.state_dict().items() if k != "layer1.0.conv1.weight"}
    (tmp_path / "timm").mkdir()
    save_file(state, str(tmp_path / "timm" / "test_resnet.safetensors"))
    config = DualEncoderConfig(**{**tiny_config.__dict__, "pretrained_image": True})
    with pytest.raises(WeightsError, match="lacks 1 tensors of image backbone 'test_resnet'.*layer1.0.conv1.weight"):
        build_dual_encoder(config, cache_dir=tmp_path)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty weights cache and an empty default Hugging Face cache, offline: nothing pretrained is on disk."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default-hf-cache"))
    return tmp_path / "slip-cache"


def _one_line(caught) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_pretrained_backbone_is_an_error_naming_file_cache_and_fetch_command(empty_caches, tiny_config):
    config = DualEncoderConfig(**{**tiny_config.__dict__, "pretrained_image": True})
    with pytest.raises(WeightsNotFoundError) as caught:
        build_dual_encoder(config, cache_dir=empty_caches)
    message = _one_line(caught)
    assert str(empty_caches / "timm" / "test_resnet.safetensors") in message and "SLIP_CACHE" in message
    assert "slip weights fetch timm/test_resnet.r160_in1k" in message and "--random-image" in message


def test_missing_pretrained_text_encoder_is_an_error_unless_random_is_asked_for(empty_caches, tiny_config):
    config = DualEncoderConfig(**{**tiny_config.__dict__, "text_encoder": "distilbert-base-uncased",
                                  "text_pooling": "cls", "pretrained_text": True})
    with pytest.raises(WeightsNotFoundError) as caught:
        build_dual_encoder(config, cache_dir=empty_caches)
    message = _one_line(caught)
    assert "slip weights fetch distilbert-base-uncased" in message and str(empty_caches / "hf") in message
    assert "--random-text" in message and "SLIP_CACHE" in message
    random = DualEncoderConfig(**{**config.__dict__, "pretrained_text": False})
    model, _, init = build_dual_encoder(random, cache_dir=empty_caches)
    assert init == {"image": "random", "text": "random"} and model.text_dim == 768


def test_tiny_random_text_encoder_must_be_asked_for_as_random(tiny_config):
    config = DualEncoderConfig(**{**tiny_config.__dict__, "pretrained_text": True})
    with pytest.raises(ConfigError, match="--random-text"):
        build_dual_encoder(config)


def test_text_encoder_directory_missing_weights_is_refused_not_left_random(tmp_path, tiny_config):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from slip.rankers.dual_encoder import minilm_path

    directory = tmp_path / "text"
    text = DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    text.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(directory)
    config = DualEncoderConfig(**{**tiny_config.__dict__, "text_encoder": str(directory), "pretrained_text": True})
    _, _, init = build_dual_encoder(config)
    assert init["text"] == f"pretrained: {directory}"
    state = load_file(str(directory / "model.safetensors"))
    lost = next(k for k in state if "transformer.layer.0.ffn" in k)
    save_file({k: v for k, v in state.items() if k != lost}, str(directory / "model.safetensors"))
    with pytest.raises(WeightsError, match="lacks pretrained weights for 1 tensors") as caught:
        build_dual_encoder(config)
    assert "--random-text" in _one_line(caught)


def test_minilm_loads_pretrained_offline(tiny_config):
    config = DualEncoderConfig(**{**tiny_config.__dict__, "text_encoder": "minilm", "pretrained_text": True})
    model, tokenizer, init = build_dual_encoder(config)
    assert init["text"].startswith("pretrained: ") and model.text_dim == 384
    ranker = DualEncoderRanker(model, tokenizer, spec="m")
    sims = ranker.model.text_encoder  # the pretrained encoder separates unrelated words
    tokens = tokenizer(["cat", "kitten", "lightning"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = sims(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1)
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]


def _frozen_minilm(tiny_config) -> DualEncoderConfig:
    return DualEncoderConfig(**{**tiny_config.__dict__, "text_encoder": "minilm", "pretrained_text": True,
                                "freeze_text": True})


def test_frozen_text_encoder_gets_no_gradient_and_stays_in_eval_mode(tiny_config):
    from slip.train.trainees import dual_encoder_trainee

    model, tokenizer, init = build_dual_encoder(_frozen_minilm(tiny_config))
    trainee = dual_encoder_trainee(model, tokenizer, init=init)
    groups = trainee.param_groups(lr=1e-3, image_lr=1e-3, text_lr=1e-3, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["image", "heads"]  # no text group: nothing of it is optimised
    model.train()
    assert model.image_encoder.training and not model.text_encoder.training
    ids = tokenizer(["circle", "square"], padding=True, return_tensors="pt")
    loss = trainee.loss(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), ids["input_ids"], ids["attention_mask"])
    loss.backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_projection.parameters())


def test_frozen_minilm_is_referenced_not_stored_and_loads_back_identically(tmp_path, tiny_config):
    from safetensors.torch import load_file

    model, tokenizer, init = build_dual_encoder(_frozen_minilm(tiny_config), seed=5)
    with torch.no_grad():
        for p in model.head_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    original = DualEncoderRanker(model, tokenizer, spec="orig")
    save_dual_encoder(model, tokenizer, tmp_path / "ckpt", init=init, half=True)
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert stored and not any(k.startswith("text_encoder.") for k in stored)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["text_weights"]["source"] == "minilm" and len(meta["text_weights"]["sha256"]) == 64
    loaded = load_ranker(str(tmp_path / "ckpt"), device="cpu")
    pixels = torch.rand(3, 3, 32, 32)
    # float16 storage: image embeddings agree to fp16 precision, text embeddings (MiniLM itself + heads) too
    assert torch.allclose(loaded.encode_images(pixels), original.encode_images(pixels), atol=5e-3)
    assert torch.allclose(loaded.encode_texts(TEXTS), original.encode_texts(TEXTS), atol=5e-3)


def test_referenced_text_encoder_with_another_digest_is_refused(tmp_path, tiny_config):
    from slip.errors import WeightsError

    model, tokenizer, init = build_dual_encoder(_frozen_minilm(tiny_config))
    save_dual_encoder(model, tokenizer, tmp_path / "ckpt", init=init)
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    meta["text_weights"]["sha256"] = "0" * 64
    path.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="SHA-256 0000.*retrain"):
        load_ranker(str(tmp_path / "ckpt"), device="cpu")


def test_a_trained_text_encoder_is_stored(tmp_path, tiny_config):
    from safetensors.torch import load_file

    config = DualEncoderConfig(**{**tiny_config.__dict__, "text_encoder": "minilm", "pretrained_text": True})
    model, tokenizer, _ = build_dual_encoder(config)
    save_dual_encoder(model, tokenizer, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["text_weights"] is None
    assert any(k.startswith("text_encoder.") for k in load_file(str(tmp_path / "ckpt" / "model.safetensors")))
