"""Hugging Face ``SamModel`` directories loaded into the official SAM classes (slip.sam_hf).

Randomly initialised ``transformers.SamModel`` s (every tensor perturbed, so no weight sits at a
zero/one init where a wrong mapping could hide) are saved with ``save_pretrained`` and loaded back
with :func:`load_hf_sam`; both models then get the same inputs and must give the same outputs.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import SamConfig, SamModel

from slip.errors import WeightsError, WeightsNotFoundError
from slip.sam import SAM_ARCHS, TINY_SPEC, save_sam
from slip.sam_hf import is_hf_sam_dir, load_hf_sam, official_name

TOL = 1e-4  # float32 tolerance of equal computations


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores: no spin-waiting against other runs


def tiny_config(**decoder) -> SamConfig:
    """The sizes of slip's tiny-random SAM (128 px, 2 ViT blocks of width 32, one global)."""
    return SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=128, patch_size=16,
                           window_size=4, global_attn_indexes=[1], output_channels=32, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=128, patch_size=16),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32, **decoder),
    )


def random_hf_sam(config: SamConfig, seed: int = 0, noise: float = 0.2) -> SamModel:
    """A SamModel whose every parameter is its random init plus Gaussian noise (eval mode)."""
    torch.manual_seed(seed)
    model = SamModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def saved(model: SamModel, directory):
    model.save_pretrained(str(directory))
    return directory


def decode(sam, embedding, *, points=None, boxes=None, mask=None, multimask=True):
    """Official prompt encoder + mask decoder: ``(masks (P, M, h, w), iou (P, M))``."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask)
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask)


def assert_same(official, hf, tol=TOL):
    torch.testing.assert_close(official, hf, atol=tol, rtol=tol)


# the decoder's layer-norm eps: 1e-5 is the official one (the same function); 1e-6 is transformers'
# default, a conversion artefact worth ~1e-5 on these outputs (the official classes keep 1e-5)
@pytest.mark.parametrize("eps, tol", [(1e-5, TOL), (1e-6, 10 * TOL)])
def test_tiny_hf_sam_gives_the_official_models_outputs(tmp_path, eps, tol):
    hf = random_hf_sam(tiny_config(layer_norm_eps=eps))
    sam, arch = load_hf_sam(saved(hf, tmp_path / "hf"))
    assert arch == SAM_ARCHS[TINY_SPEC] and arch.name == "hf-sam"
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        embedding = sam.image_encoder(pixels)
        assert embedding.shape == (1, 32, 8, 8)
        assert_same(embedding, hf.get_image_embeddings(pixels))
        # points: positive, negative and padding labels (point_embeddings 0/1, not_a_point_embed)
        coords, labels = torch.rand(3, 2, 2) * 128, torch.tensor([[1, 0], [1, 1], [0, -1]])
        masks, iou = decode(sam, embedding, points=(coords, labels))
        out = hf(image_embeddings=embedding, input_points=coords[None], input_labels=labels[None])
        assert masks.shape == (3, 3, 32, 32) and masks.abs().max() > 0.1
        assert_same(masks, out.pred_masks[0], tol)
        assert_same(iou, out.iou_scores[0], tol)
        # boxes (point_embeddings 2/3), single-mask output (mask token 0)
        boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 127.0, 127.0]])
        masks, iou = decode(sam, embedding, boxes=boxes, multimask=False)
        out = hf(image_embeddings=embedding, input_boxes=boxes[None], multimask_output=False)
        assert_same(masks, out.pred_masks[0], tol)
        assert_same(iou, out.iou_scores[0], tol)
        # a dense mask prompt (mask_downscaling) instead of no_mask_embed
        mask_in = torch.randn(1, 1, 32, 32)
        masks, iou = decode(sam, embedding, points=(coords[:1], labels[:1]), mask=mask_in)
        out = hf(image_embeddings=embedding, input_points=coords[None, :1], input_labels=labels[None, :1],
                 input_masks=mask_in)
        assert_same(masks, out.pred_masks[0], tol)
        assert_same(iou, out.iou_scores[0], tol)


def test_every_official_tensor_comes_from_the_checkpoint(tmp_path):
    hf = random_hf_sam(tiny_config())
    sam, _ = load_hf_sam(saved(hf, tmp_path / "hf"))
    hf_state = hf.state_dict()
    mapped = {official_name(k): v for k, v in hf_state.items()}
    official = sam.state_dict()
    assert set(mapped) == set(official) and len(official) == len(hf_state) - 1  # the tied PE twins become one
    for name, tensor in official.items():
        assert torch.equal(tensor, mapped[name]), name
    assert official_name("mask_decoder.iou_prediction_head.proj_out.weight") == \
        "mask_decoder.iou_prediction_head.layers.2.weight"
    assert official_name("mask_decoder.output_hypernetworks_mlps.3.layers.0.bias") == \
        "mask_decoder.output_hypernetworks_mlps.3.layers.1.bias"


def test_vit_b_sized_hf_sam_loads_as_vit_b(tmp_path):
    """vit_b sizes (64x64 grid, windows of 14, global blocks 2/5/8/11); the full 1024 px ViT pass takes
    about a minute on one core, so blocks, neck and the decoder are compared on their own."""
    hf = random_hf_sam(SamConfig(), noise=0.02)
    sam, arch = load_hf_sam(saved(hf, tmp_path / "vit_b"))
    assert arch == SAM_ARCHS["vit_b"] and arch.name == "vit_b"
    torch.manual_seed(2)
    tokens = torch.randn(1, 28, 28, 768)  # 2x2 windows; the global block interpolates its 127-row tables
    with torch.no_grad():
        for i in (0, 2):  # a windowed block, a global block
            assert_same(sam.image_encoder.blocks[i](tokens), hf.vision_encoder.layers[i](tokens))
        assert_same(sam.image_encoder.neck(tokens.permute(0, 3, 1, 2)), hf.vision_encoder.neck(tokens))
        embedding = torch.randn(1, 256, 64, 64)
        coords, labels = torch.rand(4, 1, 2) * 1024, torch.ones(4, 1, dtype=torch.long)
        masks, iou = decode(sam, embedding, points=(coords, labels))
        out = hf(image_embeddings=embedding, input_points=coords[None], input_labels=labels[None])
        assert_same(masks, out.pred_masks[0])
        assert_same(iou, out.iou_scores[0])


def test_pytorch_bin_is_read_without_unpickling_objects_and_safetensors_is_preferred(tmp_path):
    hf = random_hf_sam(tiny_config())
    directory = saved(hf, tmp_path / "hf")
    reference, _ = load_hf_sam(directory)
    (directory / "pytorch_model.bin").write_bytes(b"not a checkpoint")  # ignored: model.safetensors wins
    assert load_hf_sam(directory)[0].state_dict().keys() == reference.state_dict().keys()
    (directory / "model.safetensors").unlink()
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    loaded, _ = load_hf_sam(directory)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.save({"weights": _Payload()}, directory / "pytorch_model.bin")  # an arbitrary pickled object
    with pytest.raises(WeightsError, match="pytorch_model.bin") as caught:
        load_hf_sam(directory)
    assert not _Payload.loaded and "\n" not in str(caught.value)


class _Payload:
    loaded = False  # set if unpickling ever ran this class's code

    def __reduce__(self):
        return (_Payload._mark, ())

    @staticmethod
    def _mark():
        _Payload.loaded = True
        return _Payload()


def test_half_precision_weights_load_as_float32(tmp_path):
    hf = random_hf_sam(tiny_config())
    sam32, _ = load_hf_sam(saved(hf, tmp_path / "fp32"))
    sam16, _ = load_hf_sam(saved(hf.half(), tmp_path / "fp16"))
    weight = sam16.image_encoder.patch_embed.proj.weight
    assert weight.dtype == torch.float32
    assert_same(weight, sam32.image_encoder.patch_embed.proj.weight, 1e-2)


def test_is_hf_sam_dir(tmp_path):
    hf_dir = saved(random_hf_sam(tiny_config()), tmp_path / "hf")
    assert is_hf_sam_dir(hf_dir)
    ours = tmp_path / "ours"
    save_sam(load_hf_sam(hf_dir)[0], ours / "sam.pth", SAM_ARCHS[TINY_SPEC])  # slip's own format: config.json = SamArch
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert not any(is_hf_sam_dir(p) for p in (ours, broken, tmp_path / "missing", hf_dir / "config.json"))


# --- errors: one line, naming the file and what does not fit ---------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return saved(random_hf_sam(tiny_config()), tmp_path_factory.mktemp("hf") / "sam")


def _copy(hf_dir, tmp_path):
    return shutil.copytree(hf_dir, tmp_path / "copy")


def _edit_config(directory, section: str, **values):
    config = json.loads((directory / "config.json").read_text())
    config[section].update(values)
    (directory / "config.json").write_text(json.dumps(config))


def _one_line_error(directory, error=WeightsError) -> str:
    with pytest.raises(error) as caught:
        load_hf_sam(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_truncated_weights_name_the_file(hf_dir, tmp_path):
    directory = _copy(hf_dir, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert str(weights) in _one_line_error(directory)


def test_config_that_does_not_fit_the_weights_names_the_tensor(hf_dir, tmp_path):
    directory = _copy(hf_dir, tmp_path)
    _edit_config(directory, "mask_decoder_config", mlp_dim=128)
    message = _one_line_error(directory)
    assert "model.safetensors" in message and "config.json needs" in message
    assert "transformer.layers.0.mlp.lin1" in message


def test_config_the_official_classes_cannot_express_is_refused(hf_dir, tmp_path):
    directory = _copy(hf_dir, tmp_path)
    _edit_config(directory, "vision_config", hidden_act="relu")
    message = _one_line_error(directory)
    assert "config.json" in message and "vision_config.hidden_act" in message and "'relu'" in message


def test_weights_of_another_model_are_refused(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _copy(hf_dir, tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    state["mask_decoder.extra_head.weight"] = torch.zeros(2)
    save_file(state, str(directory / "model.safetensors"))
    assert "mask_decoder.extra_head.weight" in _one_line_error(directory)
    del state["mask_decoder.extra_head.weight"], state["mask_decoder.iou_token.weight"]
    save_file(state, str(directory / "model.safetensors"))
    assert "mask_decoder.iou_token.weight" in _one_line_error(directory)


def test_untied_positional_encodings_are_refused(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _copy(hf_dir, tmp_path)
    state = load_file(str(directory / "model.safetensors"))
    twin = state["shared_image_embedding.positional_embedding"]
    state["prompt_encoder.shared_embedding.positional_embedding"] = twin + 1
    save_file(state, str(directory / "model.safetensors"))
    assert "tied positional encodings" in _one_line_error(directory)


def test_missing_weights_and_bad_config(hf_dir, tmp_path):
    directory = _copy(hf_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    assert "model.safetensors" in _one_line_error(directory, WeightsNotFoundError)
    (directory / "config.json").write_text(json.dumps({"model_type": "clip"}))
    assert "config.json" in _one_line_error(directory)
    assert str(tmp_path / "nowhere") in _one_line_error(tmp_path / "nowhere", WeightsNotFoundError)


def test_sam_spec_accepts_an_hf_directory_and_a_cached_hub_id(hf_dir, tmp_path):
    """`--sam DIR` and `--sam org/name` (found in $SLIP_CACHE/hf, no network) load through the one bundle path,
    named by the digest of the files really loaded; the same masks come out of the generator."""
    import numpy as np
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    from slip.generator import MaskGenerator
    from slip.sam import load_sam_bundle

    bundle = load_sam_bundle(str(hf_dir), device="cpu")
    assert bundle.ref.arch.startswith("hf-sam") and len(bundle.ref.sha256) == 64
    # a hub-cache layout: <cache>/hf/models--org--name/snapshots/<rev>/ + refs/main
    repo = tmp_path / "cache" / "hf" / f"models{REPO_ID_SEPARATOR}acme{REPO_ID_SEPARATOR}sam-tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(hf_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cached = load_sam_bundle("acme/sam-tiny", device="cpu", cache_dir=tmp_path / "cache")
    assert cached.ref.sha256 == bundle.ref.sha256 and cached.ref.spec == "acme/sam-tiny"
    image = np.random.default_rng(0).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    a = MaskGenerator(bundle.model, **options).generate_masks(image)
    b = MaskGenerator(cached.model, **options).generate_masks(image)
    assert len(a) > 0 and torch.equal(a.masks, b.masks)
    with pytest.raises(WeightsNotFoundError, match="slip weights fetch acme/sam-other"):
        load_sam_bundle("acme/sam-other", device="cpu", cache_dir=tmp_path / "cache")
