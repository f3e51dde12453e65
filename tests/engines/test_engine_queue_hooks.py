"""What the queue needs of the engines: models loaded once and engines assembled over them per request (the
same requests and digests as ``build_engine``), and SAM 3's vision features packed for the store (fp16, the
levels the text path reads) and unpacked into answers that do not depend on where the features came from."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import scene
from slip.engines.build import assemble_engine, build_engine, load_engine_models
from slip.options import SegmentOptions
from slip.settings import ModelSettings

SAM3 = ModelSettings(engine="sam3", sam="tiny-random-sam3", device="cpu")


@pytest.fixture(scope="module")
def sam3():
    return load_engine_models(SAM3, image_cache=0)


def test_engines_assembled_over_loaded_models_share_them_and_resolve_like_build_engine(sam3):
    a = assemble_engine(sam3, SegmentOptions(threshold=0.3))
    b = assemble_engine(sam3, SegmentOptions(instances="all"))
    assert a.concepts is b.concepts and a.concepts.model is sam3.sam.model  # nothing loaded again
    built = build_engine(SAM3, SegmentOptions(threshold=0.3))
    assert a.request == built.request and a.request.result_digest(["x"]) == built.request.result_digest(["x"])
    assert a.request.result_digest(["x"]) != b.request.result_digest(["x"])
    assert a.request.proposal_digest() == b.request.proposal_digest()  # the features serve both requests
    slip = load_engine_models(ModelSettings(sam="tiny-random-sam2", clip="tiny-random", device="cpu"), ranker=False)
    assert slip.ranker is None and slip.sam.family == "sam2"
    with pytest.raises(Exception, match="needs a ranker"):
        assemble_engine(slip, SegmentOptions())


def test_packed_features_hold_the_levels_the_text_path_reads_in_fp16_and_answer_alike(sam3):
    from safetensors.torch import load

    concepts = sam3.concepts
    image = scene()
    vision = concepts.vision(image)
    data = concepts.pack(vision)
    tensors = load(data)
    assert [tensors[f"fpn.{i}"].shape for i in range(3)] == [t.shape for t in vision.fpn[:-1]]
    assert all(tensors[f"fpn.{i}"].dtype == torch.float16 for i in range(3)) and "pos.0" not in tensors
    stored = 2 * sum(t.numel() for t in vision.fpn[:-1])  # fp16, no positions, no last level
    assert stored < len(data) < stored + 4096
    back = concepts.unpack(data)
    assert back.image_size == vision.image_size
    for ours, theirs in zip(back.positions[:-1], vision.positions[:-1]):
        assert torch.equal(ours, theirs)  # recomputed, not stored
    assert concepts.pack(back) == data, "packing is stable: the queue's answers come from packed features"
    (fresh,), (packed,) = concepts.concepts(vision, ["a red disc"]), concepts.concepts(back, ["a red disc"])
    assert torch.allclose(fresh.scores, packed.scores, atol=1e-3) and abs(fresh.presence - packed.presence) < 1e-3


def test_an_answer_needs_the_features_not_the_image(sam3):
    engine = assemble_engine(sam3, SegmentOptions(threshold=0.0, instances="all"))
    image = scene()
    state = engine.prepare(image)
    with_image, without = engine.answer(image, state, ["a box"]), engine.answer(None, state, ["a box"])
    assert without.image_size == with_image.image_size == image.shape[:2]
    assert torch.equal(without.similarity, with_image.similarity)
    assert torch.equal(without.proposals.segments.masks, with_image.proposals.segments.masks)
