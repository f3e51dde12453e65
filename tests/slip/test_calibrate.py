"""Threshold calibration: the F1 cut on known probes, threshold.json, absent classes, and `slip calibrate`
end to end with the bundled synth ranker (oracle proposals, a small synthetic dataset)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from slip.calibrate import (
    Calibration,
    Probe,
    absent_per_composite,
    absent_prompts,
    best_threshold,
    calibrate_rankers,
    operating_point,
    read_threshold,
    save_calibration,
    write_threshold,
)
from slip.cli.calibrate import calibrate as calibrate_command
from slip.data.synth import CLASS_NAMES, generate_dataset
from slip.errors import ConfigError, DatasetError
from slip.evaluate import composite_source
from slip.weights import BUNDLED_DIR


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: OpenMP spin-waits slow everyone down
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every synthetic class, 2 images each at 64 px (seed 5: none of them seen by the bundled ranker)."""
    return generate_dataset(tmp_path_factory.mktemp("cal") / "ds", classes=len(CLASS_NAMES), per_class=2, size=64, seed=5)


def P(score, hit=True):  # a present-class probe
    return Probe(True, score, hit)


def A(score):  # an absent-class probe
    return Probe(False, score, False)


def test_operating_point_counts():
    probes = [P(0.9), P(0.8), P(0.7, hit=False), P(0.2), P(None, hit=False), A(0.75), A(0.1)]
    at = operating_point(probes, 0.5)  # answered: .9 .8 (hits), .7 (wrong segment), .75 (absent)
    assert at.precision == 2 / 4 and at.recall == 2 / 5 and at.f1 == pytest.approx(2 * 2 / (4 + 5))
    assert at.absent_false_match_rate == 1 / 2 and (at.present_queries, at.absent_queries) == (5, 2)
    nothing = operating_point(probes, 0.95)
    assert nothing.precision == 1.0 and nothing.recall == 0.0 and nothing.f1 == 0.0


def test_best_threshold_separates_hits_from_false_matches_halfway():
    probes = [P(0.9), P(0.85), P(0.8), A(0.6), A(0.4), P(0.3, hit=False)]
    best = best_threshold(probes)
    assert best.threshold == pytest.approx(0.7) and best.f1 == pytest.approx(2 * 3 / (3 + 4))
    assert best.precision == 1.0 and best.absent_false_match_rate == 0.0
    # a strong false match above every hit: the cut still keeps the hits (F1 6/8 > 0)
    assert best_threshold(probes + [A(0.95)]).threshold == pytest.approx(0.7)
    with pytest.raises(DatasetError, match="never find the prompted object"):
        best_threshold([P(0.9, hit=False), A(0.5)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-10, 10), st.booleans()), min_size=1, max_size=14))
def test_best_threshold_is_the_best_cut(rows):
    probes = [Probe(present, score / 10, present and hit) for present, score, hit in rows]
    if not any(p.hit for p in probes):
        return
    best = best_threshold(probes)
    assert -1.0 <= best.threshold <= 1.0
    for t in {p.score for p in probes}:  # every distinct cut
        assert operating_point(probes, t).f1 <= best.f1 + 1e-12
    assert best == operating_point(probes, best.threshold)
    scores = {p.score for p in probes}
    top = max(t for t in scores if operating_point(probes, t).f1 == pytest.approx(best.f1))  # highest good cut
    below = [t for t in scores if t < top]
    assert (max(below) < best.threshold if below else best.threshold == top) and best.threshold <= top


def test_absent_prompts_are_never_present_and_seeded(world):
    source = composite_source(world, split="all", tile_size=32)
    captions = source.folder.captions
    for c in source.take(5):
        absent = absent_prompts(c, captions, 4, seed=3)
        assert len(absent) == len(set(absent)) == 4 and not set(absent) & set(c.prompts)
        assert absent == absent_prompts(c, captions, 4, seed=3)
    assert absent_prompts(source[0], captions, 4, seed=3) != absent_prompts(source[0], captions, 4, seed=4)
    with pytest.raises(DatasetError, match="absent"):
        absent_prompts(source[0], source[0].prompts, 2)
    assert [absent_per_composite(f) for f in (0.2, 1 / 3, 0.5, 0.8)] == [1, 2, 4, 16]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="absent fraction"):
            absent_per_composite(bad)


def test_read_and_write_threshold(tmp_path):
    assert read_threshold(tmp_path) is None
    path = write_threshold(tmp_path, {"threshold": 0.42, "precision": 0.9, "ranker_sha256": "ab" * 32})
    data = json.loads(path.read_text())
    assert data["threshold"] == 0.42 and data["metric"] == "f1" and data["precision"] == 0.9
    assert read_threshold(tmp_path) == 0.42 and read_threshold(tmp_path, ranker_sha256="ab" * 32) == 0.42
    with pytest.raises(ConfigError, match="other weights"):
        read_threshold(tmp_path, ranker_sha256="cd" * 32)
    for text in ("{not json", '{"threshold": 2}', '{"threshold": "0.3"}', "[0.3]", '{"metric": "f1"}'):
        path.write_text(text)
        with pytest.raises(ConfigError, match="threshold.json") as e:
            read_threshold(tmp_path)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        write_threshold(tmp_path, {"threshold": float("nan")})


def test_the_bundled_directory_needs_bundle(tmp_path):
    record = {"threshold": 0.5}
    point = best_threshold([P(0.9)])
    inside = Calibration("synth", BUNDLED_DIR / "synth-clip", point, point, record)
    with pytest.raises(ConfigError, match="--bundle"):
        save_calibration(inside)
    with pytest.raises(ConfigError, match="no directory"):
        save_calibration(Calibration("tiny-random", None, point, point, record))
    outside = Calibration("mine", tmp_path, point, point, record)
    assert read_threshold(save_calibration(outside).parent) == 0.5


def test_calibrate_the_synth_ranker_on_oracle_composites(world):
    """Real ranker, real composites: present classes score above absent ones, held out too."""
    (run,) = calibrate_rankers(world, ["synth"], composites=12, split="all", proposals="oracle", tile_size=64,
                               absent_fraction=0.5, device="cpu")
    point, held = run.point, run.heldout
    assert point.present_queries == 48 and point.absent_queries == 48
    assert point.f1 >= 0.75 and held.f1 >= 0.7 and held.absent_false_match_rate <= 0.25
    assert held.threshold == point.threshold and run.directory == BUNDLED_DIR / "synth-clip"
    rec = run.record
    assert rec["threshold"] == pytest.approx(point.threshold) and rec["metric"] == "f1"
    assert rec["heldout"]["seed"] == 1 and rec["split"] == "all" and len(rec["ranker_sha256"]) == 64
    assert rec["proposals"] == "oracle" and rec["sam"] is None


def test_cli_calibrate_writes_threshold_json_beside_a_ranker(world, tmp_path):
    app = typer.Typer()
    app.command()(calibrate_command)
    mine = shutil.copytree(BUNDLED_DIR / "synth-clip", tmp_path / "ranker",
                           ignore=shutil.ignore_patterns("threshold.json", "*.sha256.json"))
    args = [str(world), "--ranker", str(mine), "--proposals", "oracle", "--composites", "4", "--split", "all",
            "--tile-size", "64", "--device", "cpu", "--quiet", "--out-json", str(tmp_path / "cal.json")]
    dry = CliRunner().invoke(app, args)
    assert dry.exit_code == 0, dry.output
    assert "threshold" in dry.output and not (mine / "threshold.json").exists()
    written = CliRunner().invoke(app, args + ["--write"])
    assert written.exit_code == 0, written.output
    (record,) = json.loads((tmp_path / "cal.json").read_text())
    assert read_threshold(mine) == pytest.approx(record["threshold"])
    from slip.rankers.loading import load_ranker_bundle

    bundle = load_ranker_bundle(str(mine), device="cpu")
    assert bundle.threshold == pytest.approx(record["threshold"]) and bundle.ref.sha256 == record["ranker_sha256"]
    refused = CliRunner().invoke(app, [str(world), "--ranker", "synth", "--write", "--composites", "1"])
    assert refused.exit_code == 2 and "--bundle" in refused.output
    bad = CliRunner().invoke(app, [str(world), "--ranker", str(mine), "--absent-fraction", "1.5"])
    assert bad.exit_code == 2 and "absent fraction" in bad.output
