"""The object-level scorer: every query counted, right and wrong choices recognised (a same-tile
distractor is wrong), chunks aggregate, composites come from the requested held-out images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from slip.data.composites import CompositeSource, heldout_records, oracle_segments
from slip.data.dataset import maskset_from_masks
from slip.data.folder import scan_folder, split_records
from slip.errors import ConfigError
from slip.evaluate import composite_source, evaluate, evaluate_composite, format_table, summarize
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


def test_a_ranker_blind_to_the_prompt_scores_chance_on_tiles_and_only_objects_count(synth_source):
    composites = synth_source.take(12)
    results = evaluate(ConstantRanker(), composites)
    plain = [r for r in results if r.mode == "plain"]
    objects = 0
    for c in composites:  # the same segment (0) for all 4 prompts: in the right tile for exactly one of them
        rows = [r for r in plain if r.composite == c.index]
        assert sum(r.tile_correct for r in rows) == 1
        picked_object = rows[0].chosen_kind == "object"
        assert sum(r.correct for r in rows) == int(picked_object)  # ... and the object only if it is one
        objects += picked_object
    summary = summarize(results)["plain"]
    assert summary["tile_accuracy"] == pytest.approx(0.25)
    assert summary["accuracy"] == pytest.approx(objects / 48) and 0 < objects < 12
    assert summary["truth"] == {"mask": 48}


def test_a_same_tile_distractor_is_wrong_though_it_lies_in_the_tile(synth_source):
    """The old criterion counted the background blob or the partial object of the prompted tile as a hit."""
    c = synth_source[3]
    oracle = oracle_segments(c, seed=0)
    for kind in ("background", "partial"):
        k = next(i for i, (kd, t) in enumerate(zip(oracle.kinds, oracle.tiles)) if kd == kind and t == 0)
        only = maskset_from_masks(torch.from_numpy(oracle.masks[k : k + 1]))
        done = evaluate_composite(c, ConstantRanker(), proposer=lambda image: only)
        first = next(r for r in done.results if r.mode == "plain" and r.tile == 0)
        assert first.chosen == 0 and first.in_tile == 1.0 and first.tile_correct
        assert not first.correct and first.iou < 0.5, (kind, first.iou)
    # the object itself is right
    k = next(i for i, (kd, t) in enumerate(zip(oracle.kinds, oracle.tiles)) if kd == "object" and t == 0)
    done = evaluate_composite(c, ConstantRanker(),
                              proposer=lambda image: maskset_from_masks(torch.from_numpy(oracle.masks[k : k + 1])))
    assert next(r for r in done.results if r.mode == "plain" and r.tile == 0).correct


def test_a_colour_ranker_finds_the_tile_but_not_always_the_object(colour_source):
    """Without masks (oracle truth) only the oracle's object counts: a same-coloured blob is wrong."""
    assert isinstance(ColourRanker(), Ranker)
    composites = colour_source.take(8)
    results = evaluate(ColourRanker(), composites)
    good = summarize(results)
    assert good["plain"]["tile_accuracy"] == 1.0 and good["plain"]["truth"] == {"oracle": 32}
    for r in results:
        assert r.correct == (r.chosen_kind == "object")
    assert 0 < good["plain"]["accuracy"] < 1
    assert good["plain"]["mean_iou"] is None  # no ground-truth masks in a plain folder
    bad = summarize(evaluate(ColourRanker(shift=1), composites))
    assert bad["plain"]["accuracy"] == 0.0 and bad["plain"]["correct"] == 0 and bad["plain"]["tile_accuracy"] == 0.0


def test_a_perfect_ranker_scores_100_when_only_objects_are_proposed(colour_source):
    composites = colour_source.take(4)

    def tiles(image: np.ndarray) -> MaskSet:  # whole tiles: the objects of a folder without masks
        return maskset_from_masks(torch.from_numpy(np.stack([composites[0].tile_mask(k) for k in range(4)])))

    results = evaluate(ColourRanker(), composites, proposer=tiles)
    summary = summarize(results)
    assert summary["plain"]["accuracy"] == 1.0 and summary["one_to_one"]["accuracy"] == 1.0
    assert summary["plain"]["truth"] == {"tile": 16}
    table = format_table([type("Run", (), {"spec": "colour", "summary": summary})()])
    assert table.splitlines()[0].split()[:5] == ["ranker", "queries", "object", "1-to-1", "tile"]
    assert "100.0%" in table.splitlines()[2]


def test_iou_against_the_true_object(synth_source):
    c = synth_source[2]
    done = evaluate_composite(c, ConstantRanker())
    first = done.masks[0]  # every prompt chose segment 0
    for r in (r for r in done.results if r.mode == "plain"):
        target = c.object_masks[r.tile]
        assert r.chosen == 0 and r.iou == pytest.approx((first & target).sum() / (first | target).sum())
    winner = next(r for r in done.results if r.mode == "plain" and r.tile_correct)
    assert winner.correct == (winner.iou > 0.5) == (done.kinds[0] == "object")
    if done.kinds[0] == "object":
        assert winner.iou == 1.0


def test_proposer_path_and_missing_segments(colour_source):
    c = colour_source[0]

    def two_tiles(image: np.ndarray) -> MaskSet:
        return maskset_from_masks(torch.from_numpy(np.stack([c.tile_mask(0), c.tile_mask(3)])))

    done = evaluate_composite(c, ColourRanker(), proposer=two_tiles)
    plain = {r.tile: r for r in done.results if r.mode == "plain"}
    assert plain[0].correct and plain[3].correct and not plain[1].correct and not plain[2].correct
    assert [plain[t].tile_correct for t in range(4)] == [True, False, False, True]
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


def test_held_out_images_val_or_all(synth_dir):
    folder = scan_folder(synth_dir)
    _, val = split_records(folder.records, seed=0)
    assert heldout_records(folder, "val") == val
    assert heldout_records(folder, "all") == folder.records
    assert heldout_records(folder, "val", split_seed=1) != val
    with pytest.raises(ConfigError, match="split must be one of val, all"):
        heldout_records(folder, "test")
    everything = composite_source(synth_dir, split="all", tile_size=32)
    assert sum(len(v) for v in everything.by_label.values()) == len(folder.records)
    validation = composite_source(synth_dir, tile_size=32)
    assert {r.path for v in validation.by_label.values() for r in v} == {r.path for r in val}
