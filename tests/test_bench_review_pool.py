"""``python -m bench.review --pool``: results of one review job from several starting rankers, pooled; wins are
counted between runs of the same starting ranker only (the starting ranker is what both arms share)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = {"images": 1000, "classes": ["circle", "fish"], "unseen_by_start_ranker": ["fish"], "class_weights": None}


def _result(path: Path, start: str, doubt: list[float], random: list[float], job=JOB) -> Path:
    def runs(values):
        return {"25": {str(seed): {"accuracy_rest": v, "start_accuracy_rest": 0.6} for seed, v in enumerate(values)}}

    path.write_text(json.dumps({
        "job": job, "accuracy": "object-level", "machine": {"cpus": 2}, "args": {"start_seed": start},
        "start_ranker": {"path": f"ranker-{start}"}, "curves_rest": {"random": {"0": {"median": 0.6}}},
        "runs": {"doubt": runs(doubt), "random-0": runs(random)},
    }))
    return path


def _pool(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.review", "--pool", *map(str, files), "--out",
                           str(tmp_path / "pooled.json")], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_pooled_medians_and_wins_within_each_starting_ranker(tmp_path):
    a = _result(tmp_path / "a.json", "0", doubt=[0.90, 0.92], random=[0.85, 0.86])
    b = _result(tmp_path / "b.json", "1", doubt=[0.80], random=[0.95])
    proc = _pool(tmp_path, a, b)
    assert proc.returncode == 0, proc.stderr  # every target the sizes allow is met (only 25 here)
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["curves_rest"]["doubt"]["25"] == {"median": 0.90, "min": 0.80, "max": 0.92, "runs": 3}
    assert pooled["curves_rest"]["random"]["25"]["median"] == 0.86
    # a: 2 x 2 pairs, all won; b: 1 pair, lost -> 4 / 5 (across starting rankers it would be 5 / 9)
    assert pooled["win_share_vs_random_rest"]["doubt"]["25"] == pytest.approx(0.8)
    assert pooled["gain_over_start_on_same_rest"]["doubt"]["25"]["median"] == pytest.approx(0.30)
    assert pooled["start_errors_in_reviewed"]["doubt"]["25"]["runs"] == 0  # the results here do not count them
    assert [s["medians"]["doubt"]["25"] for s in pooled["per_start_ranker"]] == [0.91, 0.80]
    assert pooled["targets"] == {"doubt_beats_random_at_25_rest_median": True}


def test_results_of_different_jobs_are_refused_in_one_line(tmp_path):
    a = _result(tmp_path / "a.json", "0", doubt=[0.9], random=[0.8])
    b = _result(tmp_path / "b.json", "1", doubt=[0.9], random=[0.8], job={**JOB, "images": 300})
    proc = _pool(tmp_path, a, b)
    assert proc.returncode != 0 and not (tmp_path / "pooled.json").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("--pool: the results are of different jobs")


def test_a_size_only_some_results_have_is_pooled_over_those(tmp_path):
    a = _result(tmp_path / "a.json", "0", doubt=[0.90], random=[0.85])
    record = json.loads(a.read_text())
    record["runs"]["doubt"]["100"] = {"0": {"accuracy_rest": 0.95, "start_accuracy_rest": 0.6,
                                            "start_errors_in_reviewed": 150}}
    record["runs"]["random-0"]["100"] = {"0": {"accuracy_rest": 0.93, "start_accuracy_rest": 0.6}}
    a.write_text(json.dumps(record))
    b = _result(tmp_path / "b.json", "1", doubt=[0.88], random=[0.89])
    proc = _pool(tmp_path, a, b)
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert pooled["curves_rest"]["doubt"]["100"] == {"median": 0.95, "min": 0.95, "max": 0.95, "runs": 1}
    assert [s["medians"]["doubt"]["100"] for s in pooled["per_start_ranker"]] == [0.95, None]
    assert pooled["win_share_vs_random_rest"]["doubt"]["100"] == 1.0
    assert pooled["start_errors_in_reviewed"]["doubt"]["100"] == {"median": 150, "min": 150, "max": 150, "runs": 1}
    assert proc.returncode == 0, proc.stderr  # pooled at 25: doubt 0.89 vs random 0.87


def test_the_mean_difference_per_starting_ranker_and_its_interval(tmp_path):
    doubt = [0.90, 0.88, 0.93, 0.91]
    random = [0.89, 0.90, 0.90, 0.91]
    files = [_result(tmp_path / f"{k}.json", str(k), doubt=[d], random=[r]) for k, (d, r) in enumerate(zip(doubt, random))]
    _pool(tmp_path, *files)
    got = json.loads((tmp_path / "pooled.json").read_text())["difference_vs_random"]["doubt"]["25"]
    diffs = [d - r for d, r in zip(doubt, random)]
    assert got["per_ranker"] == pytest.approx(diffs) and got["mean"] == pytest.approx(sum(diffs) / 4)
    assert got["rankers_above"] == 2  # one tie (0.91 vs 0.91) is not above
    low, high = got["ci95"]
    assert min(diffs) <= low < got["mean"] < high <= max(diffs)
    _pool(tmp_path, *files[:2])  # two starting rankers: a mean, no interval
    two = json.loads((tmp_path / "pooled.json").read_text())["difference_vs_random"]["doubt"]["25"]
    assert two["ci95"] is None and two["mean"] == pytest.approx((diffs[0] + diffs[1]) / 2)


def test_results_of_one_starting_ranker_are_merged_arm_by_arm(tmp_path):
    first = _result(tmp_path / "first.json", "0", doubt=[0.90, 0.92], random=[0.88, 0.86])
    later = json.loads(first.read_text())  # a later run from the same ranker: a new rule, random-0 run again
    later["runs"] = {"oracle": {"25": {"0": {"accuracy_rest": 0.95, "start_accuracy_rest": 0.6}}},
                     "random-0": {"25": {"0": {"accuracy_rest": 0.88, "start_accuracy_rest": 0.6}}}}
    (tmp_path / "later.json").write_text(json.dumps(later))
    other = _result(tmp_path / "other.json", "1", doubt=[0.80], random=[0.85])
    proc = _pool(tmp_path, first, tmp_path / "later.json", other)
    assert proc.returncode == 0, proc.stderr
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert [s["file"] for s in pooled["per_start_ranker"]] == [f"{first} + {tmp_path / 'later.json'}", str(other)]
    assert pooled["curves_rest"]["random"]["25"]["runs"] == 3  # the run both hold counted once
    assert pooled["win_share_vs_random_rest"]["oracle"]["25"] == 1.0  # against the first file's random runs
    assert pooled["difference_vs_random"]["oracle"]["25"]["per_ranker"] == pytest.approx([0.95 - 0.87])


def test_results_that_disagree_on_a_shared_run_are_not_the_same_starting_ranker(tmp_path):
    first = _result(tmp_path / "first.json", "0", doubt=[0.90], random=[0.88])
    again = _result(tmp_path / "again.json", "0", doubt=[0.91], random=[0.88])  # another machine's BLAS
    proc = _pool(tmp_path, first, again)
    assert proc.returncode != 0 and not (tmp_path / "pooled.json").exists()
    assert proc.stderr.strip().splitlines()[-1] == (f"--pool: {first} and {again} disagree on doubt N=25 seed 0 "
                                                   "(0.9 vs 0.91): not the same starting ranker")
