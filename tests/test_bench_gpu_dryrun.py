"""``bash bench/gpu.sh --dry-run``: the one-shot GPU benchmark's every code path (both SAM generators in each
precision, CLIP ranking, SAM 2.1 official vs ours, the SAM 3 engine, a real queue run with a real worker) on this
CPU with tiny models, in CI-sized time,
so the single run on a lent GPU machine does not fail on a bug a CPU could have found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration  # starts redis-server and a Celery worker


def test_gpu_benchmark_dry_run_writes_every_case(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=480, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("gpu-dryrun-*.json")}
    assert set(written) == {f"gpu-dryrun-{case}.json" for case in ("sam", "clip", "sam2", "sam3", "queue")}
    for doc in written.values():
        assert doc["command"].startswith("bash bench/gpu.sh --dry-run") and doc["figures"], doc
    sam = written["gpu-dryrun-sam.json"]["figures"]["tiny-random"]
    assert sam["agreement"]["ours_fp32_vs_official"]["mean_best_iou"] == pytest.approx(1.0), sam["agreement"]
    sam2 = written["gpu-dryrun-sam2.json"]["figures"]
    assert sam2["agreement"]["ours_fp32_vs_official"]["mean_best_iou"] == pytest.approx(1.0), sam2["agreement"]
    assert {"official_fp32", "official_bf16", "ours_fp32", "ours_bf16"} == set(sam2["timings_s"])
    sam3 = written["gpu-dryrun-sam3.json"]["figures"]["timings_s"]
    assert {f"{d}_{k}" for d in ("fp32", "bf16") for k in ("1_prompt", "8_prompts", "new_prompt_cached")} == set(sam3)
    assert "sam" in proc.stdout and "clip" in proc.stdout and "sam2:" in proc.stdout and "sam3:" in proc.stdout
