"""The fast paths of slip.sam_fast and slip.MaskGenerator against segment_anything's own modules.

Each piece is compared with the official computation it replaces, on the real SAM architecture:
bit for bit where the fast path claims it (exact encoder attention, point decoder, window
upscaling, the whole generator in fp32), within float tolerance where it does not (SDPA attention,
bf16). Models: ``tiny-random`` (img_size 128) and the bundled synth SAM (img_size 256), CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling.image_encoder import Attention

from producer.demo import demo_scene
from slip.device import resolve_dtype
from slip.errors import ConfigError
from slip.generator import MaskGenerator
from slip.sam import build_tiny_sam, load_sam
from slip.sam_fast import (
    PointDecoder,
    WindowUpscaler,
    encode_image,
    exact_attention,
    fuse_attention,
    fused_attention,
    in_threes,
)

NO_FILTERS = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: bit-identity is per thread count (BLAS splits work by threads), and on a
    loaded 2-core machine one thread is also the faster choice for these small models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth_sam():
    return load_sam("synth", device="cpu")


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """``(192, 512, 3) uint8``: two demo scenes side by side, cropped (not square: SAM pads it)."""
    return np.ascontiguousarray(np.concatenate([demo_scene(0)[0], demo_scene(1)[0]], 1)[:192])


def random_attention(size: int, dim: int = 64, heads: int = 4, seed: int = 0) -> Attention:
    """An encoder attention layer with non-zero relative-position tables (they start at zero)."""
    torch.manual_seed(seed)
    attn = Attention(dim, heads, use_rel_pos=True, input_size=(size, size))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    return attn.eval()


# --- image encoder ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, size, max_rows", [(1, 16, 1024), (1, 16, 48), (1, 12, 20), (6, 7, 1024)])
def test_exact_attention_is_bit_identical(batch, size, max_rows):
    attn = random_attention(size)
    x = torch.randn(batch, size, size, 64)
    with torch.inference_mode():
        assert torch.equal(exact_attention(attn, x, max_rows=max_rows), attn(x))


def test_fused_attention_is_close():
    attn = random_attention(16)
    x = torch.randn(1, 16, 16, 64)
    with torch.inference_mode():
        ours, official = fused_attention(attn, x, max_bias_bytes=1), attn(x)  # one head per group
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "synth"])
def test_encoder_exact_and_fused(model, tiny_sam, synth_sam):
    sam = tiny_sam if model == "tiny" else synth_sam
    size = sam.image_encoder.img_size
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        official = sam.image_encoder(x)
        assert torch.equal(encode_image(sam.image_encoder, x), official)
        torch.testing.assert_close(encode_image(sam.image_encoder, x, exact=False), official, rtol=1e-4, atol=1e-4)


def test_fuse_attention_keeps_weights_and_state_dict():
    sam = build_tiny_sam()
    state = {k: v.clone() for k, v in sam.state_dict().items()}
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        before = sam.image_encoder(x)
        fuse_attention(sam, exact=False)
        fused = sam.image_encoder(x)
        fuse_attention(sam)  # exact: back to bit-identical outputs
        exact = sam.image_encoder(x)
    assert sam.state_dict().keys() == state.keys()
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(fused, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(exact, before)


# --- mask decoder -------------------------------------------------------------------------------------------


def official_decode(sam, features: torch.Tensor, coords: torch.Tensor):
    labels = torch.ones(len(coords), dtype=torch.int)
    sparse, dense = sam.prompt_encoder(points=(coords[:, None], labels[:, None]), boxes=None, masks=None)
    return sam.mask_decoder(image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)


@pytest.mark.parametrize("model", ["tiny", "synth"])
@pytest.mark.parametrize("points, chunk", [(1, 8), (2, 8), (5, 4), (9, 4), (13, 8), (64, 8), (70, 16)])
def test_point_decoder_is_bit_identical(model, points, chunk, tiny_sam, synth_sam):
    sam = tiny_sam if model == "tiny" else synth_sam
    side = sam.image_encoder.img_size
    gen = torch.Generator().manual_seed(points)
    features = torch.randn((1, sam.prompt_encoder.embed_dim, side // 16, side // 16), generator=gen)
    coords = torch.rand((points, 2), generator=gen, dtype=torch.float64) * side
    with torch.inference_mode():
        logits, iou = PointDecoder(sam, features, chunk=chunk)(coords)
        official_logits, official_iou = official_decode(sam, features, coords)
    assert logits.shape == (points, 3, side // 4, side // 4) and iou.shape == (points, 3)
    assert torch.equal(logits, official_logits) and torch.equal(iou, official_iou)


# --- upscaling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_size, crop_size",
    [((192, 256), (768, 1024)), ((256, 171), (1000, 667)), ((256, 256), (256, 256)), ((98, 256), (131, 342))],
)
def test_window_upscaler_matches_postprocess_masks(synth_sam, input_size, crop_size):
    upscaler = WindowUpscaler(synth_sam, (64, 64), input_size, crop_size)
    gen = torch.Generator().manual_seed(1)
    # blobs of varied size, some touching the borders, plus values that sit on the threshold
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centres = torch.rand((12, 2), generator=gen) * 70 - 3
    radii = torch.rand((12, 1, 1), generator=gen) * 20 + 1
    dist = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).sqrt()
    logits = 3 * (radii - dist) + torch.randn((12, 64, 64), generator=gen)
    logits[0, 20:30, 20:30] = -1.0  # exactly at threshold - offset
    logits[1] = -5.0  # nothing above
    # the official generators upscale three masks per point as one 3-channel image
    reference = in_threes(lambda x: synth_sam.postprocess_masks(x, input_size, crop_size), logits)
    windows = upscaler.windows(logits, -1.0)
    for mask, ref, (r0, r1, c0, c1) in zip(logits, reference, windows.tolist()):
        above = (ref > -1.0).nonzero()
        if r0 < 0:
            assert len(above) == 0
            continue
        if len(above):  # nothing above the threshold outside the window
            assert above[:, 0].min() >= r0 and above[:, 0].max() <= r1
            assert above[:, 1].min() >= c0 and above[:, 1].max() <= c1
        assert torch.equal(upscaler.values(mask, (r0, r1), (c0, c1)), ref[r0 : r1 + 1, c0 : c1 + 1])
    assert (windows[1] == -1).all() and (windows[2:, 0] >= 0).any()


# --- the generator ----------------------------------------------------------------------------------------------


def assert_identical(ours: list[dict], official: list[dict]) -> None:
    """Same records in the same order, bit for bit (the upscaling reproduces the kernel PyTorch picks for the
    official generator's (B, 3)-channel batches at this thread count)."""
    assert len(ours) == len(official)
    for i, (a, b) in enumerate(zip(ours, official)):
        assert np.array_equal(a["segmentation"], b["segmentation"]), i
        for key in ("area", "bbox", "crop_box", "point_coords", "predicted_iou"):
            assert a[key] == b[key], (i, key, a[key], b[key])
        assert np.array_equal(a["stability_score"], b["stability_score"], equal_nan=True), i


def test_synth_sam_matches_official_with_hundreds_of_masks(synth_sam, scene):
    options = dict(points_per_side=16, **NO_FILTERS)
    ours = MaskGenerator(synth_sam, **options).generate(scene)
    official = SamAutomaticMaskGenerator(synth_sam, **options).generate(scene)
    assert len(official) >= 400 and sum(r["area"] > 0 for r in official) >= 30
    assert_identical(ours, official)


class FullUpscaling(MaskGenerator):
    """The generator's GPU path (no window upscaler: every candidate upscaled whole), run on CPU."""

    def _upscaler(self, *geometry):
        return None


def test_full_upscaling_path_gives_the_same_masks(synth_sam, scene):
    options = dict(points_per_side=8, crop_n_layers=1, pred_iou_thresh=0.2, stability_score_thresh=0.3)
    windows = MaskGenerator(synth_sam, **options).generate_masks(scene)
    full = FullUpscaling(synth_sam, **options).generate_masks(scene)
    assert len(windows) >= 5 and windows.masks.any((1, 2)).sum() >= 5
    assert torch.equal(windows.masks, full.masks) and torch.equal(windows.boxes, full.boxes)
    assert torch.equal(windows.predicted_iou, full.predicted_iou)
    assert torch.allclose(windows.stability_score, full.stability_score, equal_nan=True)


def test_generate_reports_stage_timings(tiny_sam, scene):
    timings: dict[str, float] = {}
    records = MaskGenerator(tiny_sam, points_per_side=4, **NO_FILTERS).generate(scene, timings=timings)
    assert len(records) >= 1 and {"encode", "decode", "postprocess", "records"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values())


# --- reduced precision ------------------------------------------------------------------------------------


def best_iou(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """For each ``(N, H, W)`` reference mask, the best IoU among ``(M, H, W)`` other masks."""
    a, b = reference.flatten(1).float(), other.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - inter
    return (inter / union.clamp(min=1)).amax(1)


def test_bf16_on_cpu_is_close_to_fp32(synth_sam, scene):
    options = dict(points_per_side=12, pred_iou_thresh=0.3, stability_score_thresh=0.5)
    fp32 = MaskGenerator(synth_sam, **options).generate_masks(scene)
    bf16_generator = MaskGenerator(synth_sam, dtype="bf16", **options)
    bf16 = bf16_generator.generate_masks(scene)
    assert bf16_generator.params()["dtype"] == "bf16"
    assert bf16_generator.replace(dtype="fp32").params()["dtype"] == "fp32"
    assert len(fp32) >= 5 and abs(len(bf16) - len(fp32)) <= max(2, len(fp32) // 5)
    assert bf16.predicted_iou.dtype == torch.float32 and bf16.masks.dtype == torch.bool
    assert best_iou(fp32.masks, bf16.masks).mean() >= 0.9
    assert synth_sam.pixel_mean.dtype == torch.float32  # autocast: the weights stay fp32


def test_dtype_option_is_checked(tiny_sam):
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        MaskGenerator(tiny_sam, dtype="fp16")
    with pytest.raises(ConfigError, match="unknown dtype"):
        MaskGenerator(tiny_sam, dtype="int8")
    assert MaskGenerator(tiny_sam).params()["dtype"] == "fp32"
