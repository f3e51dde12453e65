"""`slip demo` end to end (its own worker on its own Redis db), and a worker that cannot load weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from queue_helpers import REPO, flush, queue_env, run_cli

pytestmark = pytest.mark.integration
DEMO_DB = 12  # no other worker listens here, so the demo's own worker takes every task


def celery_processes_named(name: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if name.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_demo_runs_the_whole_queue(redis_alive, tmp_path):
    flush(DEMO_DB)
    env = queue_env(tmp_path / "unused-store", db=DEMO_DB)
    del env["SLIP_SAM"], env["SLIP_CLIP"]  # the demo picks (and names) its models itself
    out = tmp_path / "demo"
    try:
        proc = run_cli(["demo", "--out", str(out), "--images", "3", "--sam", "tiny-random", "--clip", "tiny-random"], env)
    finally:
        flush(DEMO_DB)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models used: SAM tiny-random, ranker tiny-random" in proc.stdout
    assert "slip weights fetch vit_b" in proc.stdout, "says how to switch to official weights"
    assert "3 images: 3 done, 0 failed, 0 pending, 0 lost" in proc.stdout
    coco = COCO(str(out / "results.coco.json"))
    assert len(coco.getImgIds()) == 3 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "star"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    gallery = (out / "gallery.html").read_text()
    assert gallery.count('<img src="data:image/png;base64,') == 6  # 3 images x 2 prompts, embedded
    (name,) = re.findall(r"demo: worker (demo-\d+@\S+) ready", proc.stdout)
    assert celery_processes_named(name) == [], "the demo stopped its worker"
    assert "ready." in (out / "worker.log").read_text()


def test_demo_with_the_bundled_pair_segments_what_it_is_asked_for(redis_alive, tmp_path):
    """The README's main job on a machine without official weights: the bundled synth models, picked by
    default and named as such, find the circle and the star of each composite (checked against the
    ground truth the demo's images are drawn from)."""
    from pycocotools import mask as mask_utils

    from producer.demo import demo_scene

    flush(DEMO_DB)
    env = queue_env(tmp_path / "unused-store", db=DEMO_DB)
    del env["SLIP_SAM"], env["SLIP_CLIP"]
    out = tmp_path / "demo"
    try:
        proc = run_cli(["demo", "--out", str(out), "--images", "4"], env)
    finally:
        flush(DEMO_DB)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models used: SAM synth, ranker synth" in proc.stdout
    assert "trained only on the synthetic world" in proc.stdout and "slip weights fetch vit_b" in proc.stdout
    assert "trained only on the synthetic world" in (out / "gallery.html").read_text()
    coco = COCO(str(out / "results.coco.json"))
    categories = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    ious = []
    for image in coco.loadImgs(coco.getImgIds()):
        index = int(re.search(r"scene_(\d+)", image["file_name"]).group(1))
        _, masks, names = demo_scene(index)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            chosen = mask_utils.decode(ann["segmentation"]).astype(bool)
            truth = masks[names.index(categories[ann["category_id"]])]
            ious.append((chosen & truth).sum() / (chosen | truth).sum())
    assert len(ious) == 8, ious  # 4 images x 2 prompts, each answered
    assert sum(iou > 0.5 for iou in ious) >= 6, ious  # bench: ~81 % of the demo's composites


def test_worker_without_weights_exits_with_a_clear_message(redis_alive, tmp_path):
    env = queue_env(tmp_path / "store", db=13, SLIP_SAM="vit_h", SLIP_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "-P", "solo",
                           "-n", "noweights@%h", "--without-mingle", "--without-gossip"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    flush(13)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "this worker cannot start" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert str(tmp_path / "empty-cache") in lines[0] and "slip weights fetch vit_h" in lines[0] and "SLIP_CACHE" in lines[0]
