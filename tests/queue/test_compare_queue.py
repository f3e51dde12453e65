"""``slip compare --queue``: each configuration runs as a job on the session's real worker (tiny-random models),
scored as in process — the same AP, F1 and counts as ``slip compare`` without ``--queue`` on the same images —,
a ranker the worker has not loaded is loaded on demand, and a configuration no live worker serves is one line
naming the worker to start, before any job is submitted."""

from __future__ import annotations

import json

import pytest

from queue_helpers import invoke_cli

pytestmark = pytest.mark.integration
TINY = "tiny=sam=tiny-random,clip=tiny-random,points_per_side=4,filters=none"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from slip.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, classes=3, per_class=2, size=96, seed=5, coco=True)
    return root


def compare(env: dict, dataset, out, *configs: str, queue: bool = True):
    args = ["compare", str(dataset), "--truth", str(dataset / "instances.coco.json"), "--out", str(out),
            "--examples", "2", *[a for c in configs for a in ("--config", c)]]
    return invoke_cli([*args, "--queue", "--timeout", "120"] if queue else [*args, "--device", "cpu"],
                      {**env, "SLIP_THREADS": "1"})


def test_configurations_run_as_jobs_and_score_as_in_process(worker, client, dataset, tmp_path):
    from slip.rankers.hf_clip import build_tiny_clip, save_hf_clip

    ranker = save_hf_clip(*build_tiny_clip(seed=7), tmp_path / "clip-7")
    other = f"other=sam=tiny-random,clip={ranker},points_per_side=4,filters=none"
    queued = compare(worker["env"], dataset, tmp_path / "queue", TINY, other)
    assert queued.exit_code == 0, queued.stdout + queued.stderr
    jobs = [line.split("job ")[1] for line in queued.stdout.splitlines() if ": job " in line]
    assert len(jobs) == 2 and all(client.status(j).finished for j in jobs)
    local = compare(worker["env"], dataset, tmp_path / "local", TINY, queue=False)
    assert local.exit_code == 0, local.stdout + local.stderr
    on_queue = json.loads((tmp_path / "queue" / "compare.json").read_text())["configs"]
    in_process = json.loads((tmp_path / "local" / "compare.json").read_text())["configs"]
    assert [c["name"] for c in on_queue] == ["tiny", "other"]
    for key in ("ap", "ap50", "f1", "precision", "recall", "presence_accuracy"):
        assert on_queue[0][key] == pytest.approx(in_process[0][key]), key
    assert {k: v for k, v in on_queue[0]["counts"].items() if k in ("tp", "fp", "fn", "pairs")} == \
        {k: v for k, v in in_process[0]["counts"].items() if k in ("tp", "fp", "fn", "pairs")}
    assert on_queue[0]["request"]["sam"] == in_process[0]["request"]["sam"]
    assert on_queue[0]["seconds_p50"] > 0 and on_queue[0]["images"] == 6
    assert on_queue[1]["request"]["ranker"]["spec"].startswith("store:rankers/")  # uploaded, loaded on demand
    assert (tmp_path / "queue" / "index.html").is_file()


@pytest.mark.parametrize("config, words", [
    ("sam3=engine=sam3,sam=tiny-random-sam3", "--config sam3: no live worker serves engine=sam3 sam=tiny-random-sam3 "
     "(live workers serve: engine=slip sam=tiny-random"),
    ("sam3=engine=sam3,sam=tiny-random-sam3", "start one with SLIP_ENGINE=sam3 SLIP_SAM=tiny-random-sam3 celery -A "
     "worker worker -Q gpu,cpu"),
    ("big=sam=vit_h,clip=tiny-random", "no live worker serves engine=slip sam=vit_h"),
    ("half=sam=tiny-random,clip=tiny-random,dtype=bf16", "dtype is the workers' own setting (SLIP_DTYPE)"),
])
def test_a_configuration_no_worker_serves_is_one_line_before_any_job(worker, client, dataset, tmp_path, config, words):
    before = len(client.jobs(limit=1000))
    proc = compare(worker["env"], dataset, tmp_path / "out", TINY, config)
    assert proc.exit_code == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert len(client.jobs(limit=1000)) == before and not (tmp_path / "out").exists()
