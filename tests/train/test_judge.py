"""The optional classifier judge (the paper's scoring): trains, round-trips, and scores choices."""

from __future__ import annotations

import pytest
import torch

from slip.data.composites import CompositeSource
from slip.data.folder import scan_folder, split_records
from slip.errors import WeightsNotFoundError
from slip.evaluate import evaluate, summarize
from slip.train.judge import JudgeConfig, load_judge, train_judge

from scorer_rankers import ColourJudge, ColourRanker, colour_dataset


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("judge") / "colours", per_class=10)


@pytest.fixture(scope="module")
def judge_dir(colours, tmp_path_factory):
    out = tmp_path_factory.mktemp("judge") / "judge"
    config = JudgeConfig(backbone="test_resnet", image_size=16, epochs=6, batch_size=8, lr=1e-2, device="cpu", progress=False)
    train_judge(colours, out, config=config)
    return out


def test_judge_learns_and_round_trips(judge_dir):
    judge = load_judge(judge_dir, device="cpu")
    assert judge.val_accuracy == 1.0 and judge.class_names == ("blue", "green", "red", "yellow")
    pixels = torch.rand(3, 3, 16, 16)
    again = load_judge(judge_dir, device="cpu")
    assert torch.equal(judge.logits(pixels), again.logits(pixels))


def test_judge_scores_choices_like_the_paper(colours, judge_dir):
    folder = scan_folder(colours)
    _, val = split_records(folder.records, seed=0)
    composites = CompositeSource(folder, val, seed=0, tile_size=24).take(5)
    judge = ColourJudge()  # exact, so the expected scores are exact
    good = summarize(evaluate(ColourRanker(), composites, judge=judge))
    bad = summarize(evaluate(ColourRanker(shift=1), composites, judge=judge))
    assert good["plain"]["judge_accuracy"] == 1.0 and good["one_to_one"]["judge_accuracy"] == 1.0
    assert bad["plain"]["judge_accuracy"] == 0.0
    assert summarize(evaluate(ColourRanker(), composites))["plain"]["judge_accuracy"] is None
    trained = summarize(evaluate(ColourRanker(), composites, judge=load_judge(judge_dir, device="cpu")))
    assert 0.0 <= trained["plain"]["judge_accuracy"] <= 1.0  # the trained judge plugs in the same way


def test_missing_judge_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="slip train-judge"):
        load_judge(tmp_path)
