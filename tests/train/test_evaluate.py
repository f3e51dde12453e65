"""The judge-free scorer: every query counted, right and wrong choices recognised, chunks aggregate."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from slip.data.composites import CompositeSource
from slip.data.dataset import maskset_from_masks
from slip.data.folder import scan_folder, split_records
from slip.evaluate import evaluate, evaluate_composite, summarize
from slip.rankers.base import Ranker
from slip.types import MaskSet

from scorer_rankers import ColourRanker, ConstantRanker, colour_dataset


@pytest.fixture
def colour_source(tmp_path):
    folder = scan_folder(colour_dataset(tmp_path / "colours"))
    _, val = split_records(folder.records, seed=0)
    return CompositeSource(folder, val, seed=0, tile_size=24)


@pytest.fixture
def synth_source(synth_dir):
    folder = scan_folder(synth_dir)
    _, val = split_records(folder.records, seed=0)
    return CompositeSource(folder, val, seed=1, tile_size=32)


def test_every_query_of_every_composite_is_scored(synth_source):
    """The paper's notebook scored only the last query of each composite; this would catch that."""
    composites = synth_source.take(10)
    results = evaluate(ConstantRanker(), composites)
    for mode in ("plain", "one_to_one"):
        rows = [r for r in results if r.mode == mode]
        assert len(rows) == 4 * len(composites)
        for c in composites:
            asked = [r.class_name for r in rows if r.composite == c.index]
            assert sorted(asked) == sorted(c.class_names)  # each of the 4 classes exactly once
        expected = Counter(name for c in composites for name in c.class_names)
        summary = summarize(results)[mode]
        assert {k: v["queries"] for k, v in summary["per_class"].items()} == dict(expected)
        assert summary["queries"] == 4 * len(composites) and summary["composites"] == len(composites)


def test_a_ranker_blind_to_the_prompt_scores_exactly_chance(synth_source):
    composites = synth_source.take(12)
    results = evaluate(ConstantRanker(), composites)
    plain = [r for r in results if r.mode == "plain"]
    for c in composites:  # the same segment for all 4 prompts: right for exactly one of them
        assert sum(r.correct for r in plain if r.composite == c.index) == 1
    assert summarize(results)["plain"]["accuracy"] == pytest.approx(0.25)


def test_a_perfect_ranker_scores_100_and_a_confused_one_0(colour_source):
    assert isinstance(ColourRanker(), Ranker)
    composites = colour_source.take(8)
    good = summarize(evaluate(ColourRanker(), composites))
    assert good["plain"]["accuracy"] == 1.0 and good["one_to_one"]["accuracy"] == 1.0
    assert good["plain"]["mean_iou"] is None  # no ground-truth masks in a plain folder
    bad = summarize(evaluate(ColourRanker(shift=1), composites))
    assert bad["plain"]["accuracy"] == 0.0 and bad["plain"]["correct"] == 0


def test_iou_against_the_true_object(synth_source):
    c = synth_source[2]
    done = evaluate_composite(c, ConstantRanker())
    first = done.masks[0]  # every prompt chose segment 0
    for r in (r for r in done.results if r.mode == "plain"):
        target = c.object_masks[r.tile]
        assert r.chosen == 0 and r.iou == pytest.approx((first & target).sum() / (first | target).sum())
    winner = next(r for r in done.results if r.mode == "plain" and r.correct)
    if done.kinds[0] == "object":
        assert winner.iou == 1.0


def test_proposer_path_and_missing_segments(colour_source):
    c = colour_source[0]

    def two_tiles(image: np.ndarray) -> MaskSet:
        return maskset_from_masks(torch.from_numpy(np.stack([c.tile_mask(0), c.tile_mask(3)])))

    done = evaluate_composite(c, ColourRanker(), proposer=two_tiles)
    plain = {r.tile: r for r in done.results if r.mode == "plain"}
    assert plain[0].correct and plain[3].correct and not plain[1].correct and not plain[2].correct
    one = {r.tile: r for r in done.results if r.mode == "one_to_one"}
    assert one[1].chosen is None and one[2].chosen is None and one[1].in_tile == 0.0
    empty = evaluate_composite(c, ColourRanker(), proposer=lambda image: MaskSet.empty(*image.shape[:2]))
    assert len(empty.results) == 8 and not any(r.correct for r in empty.results)


def test_summaries_of_chunks_add_up(synth_source):
    a = evaluate(ConstantRanker(), synth_source.take(4))
    b = evaluate(ConstantRanker(), synth_source.take(4, start=4))
    whole = summarize(evaluate(ConstantRanker(), synth_source.take(8)))
    assert summarize(a + b) == whole
    assert summarize(b + a) == whole


def test_sam_proposals_go_through_the_mask_generator_and_filters(synth_dir):
    from slip.evaluate import evaluate_rankers

    tiny = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    run = evaluate_rankers(synth_dir, ["tiny-random"], composites=2, tile_size=32, proposals="sam", sam="tiny-random",
                           device="cpu", generator=tiny, filters="none", gallery=0)[0]
    plain = run.summary["plain"]
    assert plain["queries"] == 8 and set(plain["chosen_kinds"]) == {"proposal"}
