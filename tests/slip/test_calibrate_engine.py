"""`slip calibrate` for engines that score their own answers (sam3, sam3-rank): the same probes as the ranker
path, thresholds beside the model whose scale they are, and one line for what cannot be calibrated."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from slip.calibrate import collect_engine_probes, collect_probes, engine_directory
from slip.cli.calibrate import calibrate as calibrate_command
from slip.data.synth import CLASS_NAMES, generate_dataset
from slip.engines.build import build_engine
from slip.engines.sam3_model import build_tiny_sam3, save_sam3
from slip.evaluate import composite_source, sam_proposer
from slip.options import SegmentOptions
from slip.rankers.loading import load_ranker_bundle
from slip.settings import ModelSettings


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores: no spin-waiting against other runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("cal") / "ds", classes=len(CLASS_NAMES), per_class=2, size=64,
                            seed=5)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(calibrate_command)
    return app


def test_an_engine_gives_the_same_probes_as_its_ranker_and_proposals(world):
    """The engine path asks the engine (SAM + filters + ranker, built without a threshold); the ranker path
    takes the same proposals and ranks them itself: one query set, one verdict per query."""
    source = composite_source(world, seed=0, split="all", tile_size=64)
    composites = source.take(3)
    engine = build_engine(ModelSettings(sam="synth", clip="synth", device="cpu"), SegmentOptions(calibrated=False))
    ranker = load_ranker_bundle("synth", device="cpu").ranker
    by_engine = collect_engine_probes(engine, source, composites, seed=0)
    by_ranker = collect_probes(ranker, source, composites, proposer=sam_proposer("synth", device="cpu"), seed=0)
    assert len(by_engine) == len(by_ranker) == 3 * 8
    assert [(p.present, p.hit) for p in by_engine] == [(p.present, p.hit) for p in by_ranker]
    assert any(p.hit for p in by_engine) and not any(p.hit for p in by_engine if not p.present)
    for a, b in zip(by_engine, by_ranker):
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_sam3_queries_every_prompt_and_a_random_model_cannot_be_calibrated(world, tmp_path):
    directory = save_sam3(*build_tiny_sam3(), tmp_path / "sam3")
    models = ModelSettings(engine="sam3", sam=str(directory), device="cpu")
    assert engine_directory(models) == directory  # threshold.json goes beside the SAM 3 checkpoint
    source = composite_source(world, seed=0, split="all", tile_size=64)
    engine = build_engine(models, SegmentOptions(calibrated=False))
    probes = collect_engine_probes(engine, source, source.take(2), seed=0)
    assert len(probes) == 2 * 8 and sum(p.present for p in probes) == 2 * 4
    result = CliRunner().invoke(_app(), [str(world), "--engine", "sam3", "--sam", str(directory), "--device", "cpu",
                                         "--composites", "2", "--tile-size", "64", "--split", "all", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: no query was answered with the right object")


def test_write_is_refused_before_any_work_where_there_is_no_directory(world):
    result = CliRunner().invoke(_app(), [str(world), "--engine", "sam3", "--sam", "tiny-random-sam3", "--device",
                                         "cpu", "--write", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: ranker 'tiny-random-sam3' has no directory to write threshold.json into"]


def test_the_slip_engine_calibrates_its_ranker_from_the_environment(world, monkeypatch):
    monkeypatch.setenv("SLIP_CLIP", "synth")
    result = CliRunner().invoke(_app(), [str(world), "--sam", "synth", "--device", "cpu", "--composites", "2",
                                         "--tile-size", "64", "--split", "all", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("synth ")]
    assert len(rows) == 1  # the ranker row: $SLIP_CLIP was calibrated
