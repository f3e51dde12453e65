"""Golden tests of the resolver (slip.request): precedence, canonical digests, and keys that follow the weights.

* precedence, the only place it is written: SAM's defaults < generator.json < explicit generator options;
  the paper's ``containment`` < filters.json < an explicit chain; no threshold < threshold.json < explicit;
* digests are stable (pinned) and canonical: two spellings of one request give one digest;
* a key names what really produced a result: changing one weight of a SAM checkpoint or of a ranker
  directory, or editing a recommendation file beside them, changes the keys it feeds;
* a weights digest is computed once per version of the file and kept beside it (``<file>.sha256.json``).

Models are real: the tiny-random SAM and CLIP saved in their real formats and loaded back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from slip.errors import ConfigError
from slip.rankers.hf_clip import build_tiny_clip, save_hf_clip
from slip.rankers.loading import load_ranker_bundle
from slip.request import (
    PAPER_FILTERS,
    GeneratorOptions,
    ModelRef,
    ResolvedRequest,
    SegmentOptions,
    canonical_filters,
    canonical_json,
    digest,
    resolve,
)
from slip.sam import FILTERS_FILE, GENERATOR_FILE, SAM_ARCHS, TINY_SPEC, build_tiny_sam, load_sam_bundle, save_sam
from slip.weights import DIGEST_SUFFIX, cached_sha256, sha256_file

SAM = ModelRef(spec="vit_b", arch="vit_b", sha256="a" * 64)
RANKER = ModelRef(spec="openai/clip-vit-base-patch32", arch="hf-clip", sha256="b" * 64)
PROMPTS = ("a red box", "a blue disc")
KEEP_LARGEST = "containment:drop_largest=false"


def plain(options: SegmentOptions = SegmentOptions(), *, generator=None, filters=None, threshold=None,
          sam: ModelRef = SAM, ranker: ModelRef = RANKER, dtype: str = "fp32") -> ResolvedRequest:
    """``options`` resolved against model refs with the given recommendations (no model loaded)."""
    return resolve(options, sam=sam, sam_generator=generator or {}, sam_filters=filters, ranker=ranker,
                   ranker_threshold=threshold, dtype=dtype)


def keys(request: ResolvedRequest, prompts=PROMPTS) -> dict[str, str]:
    return {"proposals": request.proposal_digest(), "embeddings": request.embedding_digest(),
            "result": request.result_digest(prompts)}


# --- precedence --------------------------------------------------------------------------------------------


def test_generator_options_defaults_then_the_file_then_explicit():
    assert plain().generator == GeneratorOptions()
    assert GeneratorOptions().points_per_side == 32 and GeneratorOptions().pred_iou_thresh == 0.88
    recommended = {"points_per_side": 16, "pred_iou_thresh": 0.3, "stability_score_offset": 0.25}
    from_file = plain(generator=recommended).generator
    assert (from_file.points_per_side, from_file.pred_iou_thresh, from_file.stability_score_offset) == (16, 0.3, 0.25)
    assert from_file.stability_score_thresh == 0.95  # not in the file: SAM's default
    explicit = plain(SegmentOptions(**{"pred_iou_thresh": 0.5, "crop_n_layers": 1}), generator=recommended).generator
    assert (explicit.points_per_side, explicit.pred_iou_thresh, explicit.crop_n_layers) == (16, 0.5, 1)
    assert isinstance(plain(SegmentOptions(**{"points_per_side": 8.0})).generator.points_per_side, int)


@pytest.mark.parametrize("bad, words", [({"points_per_batch": 8}, "not a mask generator option"),
                                        ({"points_per_side": "8"}, "must be a number"),
                                        ({"points_per_side": 8.5}, "must be an integer"),
                                        ({"box_nms_thresh": True}, "must be a number")])
def test_a_bad_generator_option_in_generator_json_is_a_config_error_naming_the_file(bad, words):
    with pytest.raises(ConfigError, match=words) as info:
        plain(generator=bad)
    assert "generator.json of SAM vit_b" in str(info.value)


@pytest.mark.parametrize("bad, words", [({"points_per_batch": 8}, "points_per_batch: Extra inputs"),
                                        ({"points_per_side": "eight"}, "points_per_side"),
                                        ({"points_per_side": 8.5}, "points_per_side"),
                                        ({"box_nms_thresh": 1.5}, "box_nms_thresh")])
def test_a_bad_explicit_generator_option_is_refused_by_the_declaration(bad, words):
    with pytest.raises(ConfigError, match=words) as info:
        SegmentOptions.parse(bad)
    assert str(info.value).startswith("invalid SegmentOptions: ") and "\n" not in str(info.value)


def test_filters_the_papers_then_the_file_then_explicit():
    assert PAPER_FILTERS == "containment"
    assert plain().filters == canonical_filters("containment")
    assert plain().filters[0]["drop_largest"] is True
    assert plain(filters=KEEP_LARGEST).filters[0]["drop_largest"] is False
    assert plain(SegmentOptions(filters="containment"), filters=KEEP_LARGEST).filters[0]["drop_largest"] is True
    assert plain(SegmentOptions(filters="none"), filters=KEEP_LARGEST).filters == ()
    assert plain(SegmentOptions(filters="none")).filter_chain() == "none"
    with pytest.raises(ConfigError, match="unknown filter"):
        plain(SegmentOptions(filters="containment,sideways"))


def test_thresholds_none_then_the_calibrated_file_then_explicit():
    assert plain().threshold is None and plain().thresholds(2) == (None, None)
    assert plain(threshold=0.2).threshold == 0.2 and plain(threshold=0.2).thresholds(3) == (0.2, 0.2, 0.2)
    assert plain(SegmentOptions(calibrated=False), threshold=0.2).threshold is None
    assert plain(SegmentOptions(threshold=0.4), threshold=0.2).threshold == 0.4
    per_prompt = plain(SegmentOptions(threshold=(0.4, None)), threshold=0.2)
    assert per_prompt.thresholds(2) == (0.4, None)
    with pytest.raises(ConfigError, match="3 thresholds for 2 prompts"):
        plain(SegmentOptions(threshold=(0.1, 0.2, 0.3))).thresholds(2)
    with pytest.raises(ConfigError, match="3 thresholds for 2 prompts"):
        plain(SegmentOptions(threshold=(0.1, 0.2, 0.3))).result_digest(PROMPTS)
    for bad in (1.5, -1.01, float("nan"), (0.1, 2.0)):
        with pytest.raises(ConfigError, match="cosine similarity"):
            plain(SegmentOptions.parse({"threshold": bad}))


def test_the_proposals_part_is_resolved_by_the_same_rules():
    """resolve_proposals (evaluation's SAM proposals) is resolve's own first half: one precedence."""
    from slip.request import resolve_proposals

    recommended = {"points_per_side": 16, "pred_iou_thresh": 0.3}
    for options in (SegmentOptions(), SegmentOptions(**{"points_per_side": 8}, filters="none"),
                    SegmentOptions(filters="containment")):
        generator, filters = resolve_proposals(options, sam_spec="vit_b", sam_generator=recommended,
                                               sam_filters=KEEP_LARGEST)
        full = plain(options, generator=recommended, filters=KEEP_LARGEST)
        assert (generator, filters) == (full.generator, full.filters)
    with pytest.raises(ConfigError, match="generator.json of SAM synth"):
        resolve_proposals(SegmentOptions(), sam_spec="synth", sam_generator={"points": 2}, sam_filters=None)


@pytest.mark.parametrize("options, words", [({"instances": "some"}, "instances"), ({"top_k": -1}, "top_k"),
                                            ({}, "dtype")])
def test_other_bad_options_are_config_errors(options, words):
    with pytest.raises(ConfigError, match=words):
        plain(SegmentOptions.parse(options), dtype="fp8" if words == "dtype" else "fp32")


# --- digests: pinned and canonical ---------------------------------------------------------------------------


def test_digests_are_sha256_of_the_documented_identities_and_pinned():
    request = plain(SegmentOptions(threshold=0.25, instances="all"), filters=KEEP_LARGEST)
    proposal_identity = {
        "sam": {"arch": "vit_b", "sha256": "a" * 64}, "dtype": "fp32",
        "generator": {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                      "stability_score_offset": 1.0, "box_nms_thresh": 0.7, "crop_n_layers": 0,
                      "crop_nms_thresh": 0.7, "crop_overlap_ratio": 512 / 1500,
                      "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0},
        "filters": [{"name": "containment", "threshold": 0.8, "drop_largest": False, "keep": "parent"}],
    }
    def sha(value) -> str:  # written out here, independently of slip.request
        return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    assert request.proposal_identity() == proposal_identity
    assert request.proposal_digest() == sha(proposal_identity)
    embedding_identity = {"proposals": sha(proposal_identity), "ranker": {"arch": "hf-clip", "sha256": "b" * 64},
                          "dtype": "fp32", "crop": {"background": "black", "padding": 0.0, "square": True}}
    assert request.embedding_digest() == sha(embedding_identity)
    result_identity = {"embeddings": sha(embedding_identity), "prompts": list(PROMPTS), "top_k": 5,
                       "thresholds": [0.25, 0.25], "instances": "all", "one_to_one": False}
    assert request.result_digest(PROMPTS) == sha(result_identity) == digest(result_identity)
    # pinned: every stored result and cache is found by these; a change here orphans all of them
    assert request.proposal_digest() == "519212eaef23838aa56e1f8e6e7b8405d8b006a32797ac53d807e424afc9bc24"
    assert request.result_digest(PROMPTS) == "16a95bec60006143904b3c75b486c640439b16bf6e09ecd1d5028082f51aef3d"


def test_canonical_json_is_deterministic():
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})


@pytest.mark.parametrize("a, b", [
    ("containment", "containment:0.8"),
    ("containment", "containment:threshold=0.8:drop_largest=true:keep=parent"),
    (KEEP_LARGEST, "containment:0.80:drop_largest=false"),
    ("none", "None"),
])
def test_two_spellings_of_one_filter_chain_give_one_digest(a, b):
    left, right = plain(SegmentOptions(filters=a)), plain(SegmentOptions(filters=b))
    assert left.filters == right.filters
    assert keys(left) == keys(right)


def test_one_request_reached_two_ways_gives_one_digest():
    recommended = {"points_per_side": 16, "pred_iou_thresh": 0.3}
    by_file = plain(generator=recommended, filters=KEEP_LARGEST, threshold=0.2)
    explicit = plain(SegmentOptions(**recommended, filters=KEEP_LARGEST, threshold=0.2))
    assert keys(by_file) == keys(explicit)
    assert keys(plain()) == keys(plain(SegmentOptions(**{"points_per_side": 32}, filters="containment")))
    # one threshold for every prompt, or the same value per prompt: one result
    assert plain(SegmentOptions(threshold=0.3)).result_digest(PROMPTS) == \
        plain(SegmentOptions(threshold=(0.3, 0.3))).result_digest(PROMPTS)
    # the spec string is for people: the same weights named two ways share every key
    renamed = ModelRef(spec="/models/sam_vit_b_01ec64.pth", arch="vit_b", sha256=SAM.sha256)
    assert keys(plain(sam=renamed)) == keys(plain())


def test_a_per_prompt_threshold_is_canonical_whatever_its_number_type():
    """(1, 0.5) and (1.0, 0.5) are one request: a Python caller's int must not give another key."""
    ints = plain(SegmentOptions(threshold=(1, 0.5)))
    floats = plain(SegmentOptions(threshold=(1.0, 0.5)))
    assert ints.result_digest(PROMPTS) == floats.result_digest(PROMPTS)


def test_what_changes_which_key():
    base = keys(plain())
    changed = {
        "sam weights": plain(sam=ModelRef(spec="vit_b", arch="vit_b", sha256="c" * 64)),
        "generator": plain(SegmentOptions(**{"points_per_side": 16})),
        "filters": plain(SegmentOptions(filters="none")),
        "dtype": plain(dtype="bf16"),
        "ranker weights": plain(ranker=ModelRef(spec="x", arch="hf-clip", sha256="d" * 64)),
        "crop": plain(SegmentOptions(crop_background="gray")),
        "threshold": plain(threshold=0.2),
        "top_k": plain(SegmentOptions(top_k=3)),
        "instances": plain(SegmentOptions(instances="all")),
        "one_to_one": plain(SegmentOptions(one_to_one=True)),
    }
    proposal_level = {"sam weights", "generator", "filters", "dtype"}
    embedding_level = proposal_level | {"ranker weights", "crop"}
    for what, request in changed.items():
        now = keys(request)
        assert (now["proposals"] != base["proposals"]) == (what in proposal_level), what
        assert (now["embeddings"] != base["embeddings"]) == (what in embedding_level), what
        assert now["result"] != base["result"], what
    assert plain().result_digest(PROMPTS) != plain().result_digest(PROMPTS[::-1]), "prompt order is part of a result"
    assert plain().result_digest(PROMPTS) != plain().result_digest(PROMPTS[:1])


def test_the_record_written_into_results_round_trips_through_json():
    request = plain(SegmentOptions(threshold=(0.4, None)), filters=KEEP_LARGEST)
    record = json.loads(json.dumps(request.to_json()))
    assert record["sam"] == SAM.to_json() and record["ranker"]["sha256"] == "b" * 64
    assert record["threshold"] == [0.4, None] and record["filters"] == list(request.filters)
    assert record["generator"] == GeneratorOptions().to_json()


# --- keys follow the weights and the recommendation files ----------------------------------------------------


@pytest.fixture()
def sam_dir(tmp_path) -> Path:
    folder = tmp_path / "tiny-sam"
    save_sam(build_tiny_sam(), folder / "sam.pth", SAM_ARCHS[TINY_SPEC])
    return folder


@pytest.fixture()
def clip_dir(tmp_path) -> Path:
    return save_hf_clip(*build_tiny_clip(seed=0), tmp_path / "tiny-clip")


def resolved(sam_spec: str, ranker_spec: str, options: SegmentOptions = SegmentOptions(), *, cache: Path) -> ResolvedRequest:
    """The request resolved against models really loaded from disk (as a worker or `slip segment` does)."""
    sam = load_sam_bundle(sam_spec, device="cpu", cache_dir=cache)
    ranker = load_ranker_bundle(ranker_spec, device="cpu", cache_dir=cache)
    return resolve(options, sam=sam.ref, sam_generator=sam.generator, sam_filters=sam.filters, ranker=ranker.ref,
                   ranker_threshold=ranker.threshold)


def test_sam_weights_are_named_by_their_file_not_the_spelling_of_the_spec(sam_dir, clip_dir, tmp_path):
    by_dir = load_sam_bundle(str(sam_dir), device="cpu", cache_dir=tmp_path / "cache").ref
    by_file = load_sam_bundle(str(sam_dir / "sam.pth"), device="cpu", cache_dir=tmp_path / "cache").ref
    assert by_dir.spec != by_file.spec and by_dir.identity() == by_file.identity()
    assert by_dir.arch == TINY_SPEC and len(by_dir.sha256) == 64
    assert keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path)) == \
        keys(resolved(str(sam_dir / "sam.pth"), str(clip_dir), cache=tmp_path))


def test_changing_one_sam_weight_changes_every_key(sam_dir, clip_dir, tmp_path):
    before = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    sam = build_tiny_sam()
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[0].bias[0] += 1.0  # one number
    size = (sam_dir / "sam.pth").stat().st_size
    save_sam(sam, sam_dir / "sam.pth", SAM_ARCHS[TINY_SPEC])
    assert (sam_dir / "sam.pth").stat().st_size == size, "same size: only the digest can tell the files apart"
    after = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    assert all(after[k] != before[k] for k in before), (before, after)


def test_changing_the_sam_config_beside_the_weights_changes_every_key(sam_dir, clip_dir, tmp_path):
    before = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    config = json.loads((sam_dir / "config.json").read_text())
    (sam_dir / "config.json").write_text(json.dumps({**config, "decoder_num_heads": 1}))  # same tensors, other model
    after = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    assert all(after[k] != before[k] for k in before)


def test_changing_one_ranker_weight_changes_the_embedding_and_result_keys(sam_dir, clip_dir, tmp_path):
    before = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    model, tokenizer = build_tiny_clip(seed=0)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] += 1.0
    save_hf_clip(model, tokenizer, clip_dir)
    after = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    assert after["proposals"] == before["proposals"], "the ranker does not shape SAM's proposals"
    assert after["embeddings"] != before["embeddings"] and after["result"] != before["result"]


def test_editing_generator_json_changes_the_keys(sam_dir, clip_dir, tmp_path):
    (sam_dir / GENERATOR_FILE).write_text(json.dumps({"points_per_side": 4}))
    before = resolved(str(sam_dir), str(clip_dir), cache=tmp_path)
    assert before.generator.points_per_side == 4
    (sam_dir / GENERATOR_FILE).write_text(json.dumps({"points_per_side": 4, "pred_iou_thresh": 0.5}))
    after = resolved(str(sam_dir), str(clip_dir), cache=tmp_path)
    assert after.generator.pred_iou_thresh == 0.5
    assert all(keys(after)[k] != keys(before)[k] for k in keys(before))
    # the file's options asked for explicitly, without the file: the same request
    (sam_dir / GENERATOR_FILE).unlink()
    given = SegmentOptions(**{"points_per_side": 4, "pred_iou_thresh": 0.5})
    explicit = resolved(str(sam_dir), str(clip_dir), given, cache=tmp_path)
    assert keys(explicit) == keys(after)


def test_editing_filters_json_changes_the_keys_but_not_its_comment(sam_dir, clip_dir, tmp_path):
    paper = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    (sam_dir / FILTERS_FILE).write_text(json.dumps({"filters": KEEP_LARGEST, "why": "keep the background"}))
    recommended = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    assert all(recommended[k] != paper[k] for k in paper)
    (sam_dir / FILTERS_FILE).write_text(json.dumps({"filters": KEEP_LARGEST, "why": "reworded, same chain"}))
    assert keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path)) == recommended
    # an explicit chain wins over the file: the paper's chain asked for by name is the paper's request
    assert keys(resolved(str(sam_dir), str(clip_dir), SegmentOptions(filters="containment"), cache=tmp_path)) == paper


def test_editing_threshold_json_changes_the_result_key_only(sam_dir, clip_dir, tmp_path):
    before = resolved(str(sam_dir), str(clip_dir), cache=tmp_path)
    (clip_dir / "threshold.json").write_text(json.dumps({"threshold": 0.2, "metric": "f1"}))
    calibrated = resolved(str(sam_dir), str(clip_dir), cache=tmp_path)
    assert calibrated.threshold == 0.2
    (clip_dir / "threshold.json").write_text(json.dumps({"threshold": 0.3, "metric": "f1"}))
    recalibrated = resolved(str(sam_dir), str(clip_dir), cache=tmp_path)
    assert recalibrated.threshold == 0.3
    for a, b in ((before, calibrated), (calibrated, recalibrated)):
        assert a.proposal_digest() == b.proposal_digest() and a.embedding_digest() == b.embedding_digest()
        assert a.result_digest(PROMPTS) != b.result_digest(PROMPTS)
    # an explicit threshold wins over the file; --no-threshold ignores it
    explicit = resolved(str(sam_dir), str(clip_dir), SegmentOptions(threshold=0.2), cache=tmp_path)
    assert explicit.result_digest(PROMPTS) == calibrated.result_digest(PROMPTS)
    ignored = resolved(str(sam_dir), str(clip_dir), SegmentOptions(calibrated=False), cache=tmp_path)
    assert ignored.result_digest(PROMPTS) == before.result_digest(PROMPTS)


# --- the weights digest, cached beside the file -------------------------------------------------------------


def test_the_weights_digest_is_cached_beside_the_file_and_recomputed_when_it_changes(sam_dir, tmp_path):
    weights = sam_dir / "sam.pth"
    record = weights.with_name(weights.name + DIGEST_SUFFIX)
    assert DIGEST_SUFFIX == ".sha256.json" and not record.exists()
    first = cached_sha256(weights, cache_dir=tmp_path / "cache")
    assert first == sha256_file(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    stored = json.loads(record.read_text())
    assert stored["sha256"] == first and stored["size"] == weights.stat().st_size
    assert stored["mtime_ns"] == weights.stat().st_mtime_ns

    # the record is what is read while the file is unchanged (a 2.5 GB vit_h is hashed once)
    record.write_text(json.dumps({**stored, "sha256": "f" * 64}))
    assert cached_sha256(weights, cache_dir=tmp_path / "cache") == "f" * 64
    # a new version of the file (new mtime; here the same bytes) is hashed again and the record rewritten
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cached_sha256(weights, cache_dir=tmp_path / "cache") == first
    assert json.loads(record.read_text())["mtime_ns"] == stat.st_mtime_ns + 1_000_000_000
    # other bytes of another size: hashed again
    with open(weights, "ab") as f:
        f.write(b"\0")
    assert cached_sha256(weights, cache_dir=tmp_path / "cache") == sha256_file(weights) != first
    # loading a bundle uses (and writes) the same record
    record.unlink()
    save_sam(build_tiny_sam(), weights, SAM_ARCHS[TINY_SPEC])
    load_sam_bundle(str(sam_dir), device="cpu", cache_dir=tmp_path / "cache")
    assert json.loads(record.read_text())["sha256"] == sha256_file(weights)


def test_digest_records_are_left_out_of_a_ranker_directory_digest(clip_dir, tmp_path):
    first = load_ranker_bundle(str(clip_dir), device="cpu", cache_dir=tmp_path).ref
    records = sorted(p.name for p in clip_dir.glob(f"*{DIGEST_SUFFIX}"))
    assert "model.safetensors" + DIGEST_SUFFIX in records
    again = load_ranker_bundle(str(clip_dir), device="cpu", cache_dir=tmp_path).ref
    assert again == first, "the records written by the first load do not change the directory's digest"


def test_a_same_size_file_with_the_old_mtime_is_still_hashed_again(sam_dir, clip_dir, tmp_path):
    """tar/zip extraction, images with normalised mtimes and `cp -p` keep the old mtime: the digest record is
    keyed by inode and ctime too, so the new weights are hashed again."""
    weights = sam_dir / "sam.pth"
    before = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    stat = weights.stat()
    sam = build_tiny_sam()
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[0].bias[0] += 1.0
    replacement = tmp_path / "elsewhere" / "sam.pth"  # torch.save records the file's stem: same name, same size
    replacement.parent.mkdir()
    torch.save(sam.state_dict(), replacement)
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or an archive would
    os.replace(replacement, weights)
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    after = keys(resolved(str(sam_dir), str(clip_dir), cache=tmp_path))
    assert after["proposals"] != before["proposals"], "other weights were served under the old keys"
