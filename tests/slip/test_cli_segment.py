"""``slip segment``: the files it writes, and a one-line error with an exit code for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from producer.cli import build_app
from slip.outputs import decode_rle

TINY = ["--sam", "tiny-random", "--clip", "tiny-random", "--device", "cpu", "--points-per-side", "4",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--filters", "min_area:4"]


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (90, 50)]):
        array = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        array[h // 4 : h // 2, w // 4 : w // 2] = (255, 0, 0)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def run(*args: str):
    return CliRunner().invoke(build_app(), ["segment", *args])


def test_writes_masks_overlays_and_rle(images, tmp_path):
    out = tmp_path / "out"
    result = run(*map(str, images), "--prompt", "red box", "--prompt", "noise", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    for path in images:
        size = Image.open(path).size
        folder = out / path.stem
        doc = json.loads((folder / "segments.json").read_text())
        assert doc["prompts"] == ["red box", "noise"]
        masks = decode_rle([s["segmentation"] for s in doc["segments"]], size[1], size[0])
        assert len(masks) == len(doc["segments"]) > 0
        for i, match in enumerate(doc["matches"]):
            png = Image.open(folder / f"mask_{i}.png")
            assert png.size == size
            assert np.array_equal(np.asarray(png) > 0, masks[match["instances"][0]["segment"]])
            assert Image.open(folder / f"overlay_{i}.png").size == size
            chosen = match["instances"][0]["segment"]
            segment = doc["segments"][chosen]
            assert segment["area"] == int(masks[chosen].sum())
            x, y, w, h = segment["bbox"]
            ys, xs = np.nonzero(masks[chosen])
            # COCO's convention (pycocotools.mask.toBbox): XYWH with w = x_max - x_min + 1
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_missing_file_is_one_line_exit_2(tmp_path):
    result = run(str(tmp_path / "nope.png"), "--prompt", "x", "--out", str(tmp_path / "o"), *TINY)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: no such file or directory: {tmp_path / 'nope.png'}"]


def test_unreadable_image_fails_alone(images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp_path / "out"
    result = run(str(bad), str(images[0]), "--prompt", "x", "--out", str(out), *TINY)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.png" in errors[0]
    assert (out / images[0].stem / "segments.json").is_file()
    assert not (out / "bad").exists()


def test_empty_prompt_exit_2(images, tmp_path):
    result = run(str(images[0]), "--prompt", "  ", "--out", str(tmp_path / "o"), *TINY)
    assert result.exit_code == 2
    assert "empty or blank" in result.output


def test_missing_weights_say_how_to_fetch(images, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIP_CACHE", str(tmp_path / "cache"))
    args = [str(images[0]), "--prompt", "x", "--out", str(tmp_path / "o"), "--sam", "vit_b", "--clip", "tiny-random"]
    result = run(*args, "--device", "cpu")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "slip weights fetch vit_b" in lines[0] and "SLIP_CACHE" in lines[0]


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "producer.cli", "segment", str(tmp_path / "missing.jpg"), "--prompt", "x",
         "--out", str(tmp_path / "o"), "--sam", "tiny-random", "--clip", "tiny-random"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: no such file or directory: {tmp_path / 'missing.jpg'}"]


def test_directories_and_globs_like_submit(images, tmp_path):
    """A folder (recursive) and a glob name the same images as `slip submit`; outputs keep the sub-folders."""
    sub = images[0].parent / "more"
    sub.mkdir()
    (sub / "img9.png").write_bytes(images[1].read_bytes())
    out = tmp_path / "out"
    result = run(str(images[0].parent), "--prompt", "x", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("segments.json")) == [
        "img0/segments.json", "img1/segments.json", "more/img9/segments.json"]
    out2 = tmp_path / "out2"
    result = run(str(images[0].parent / "img*.png"), "--prompt", "x", "--out", str(out2), *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.parent.name for p in out2.rglob("segments.json")) == ["img0", "img1"]


@pytest.mark.parametrize("name", ["...png", "..png", ".hidden.png", "a b?.png"])
def test_output_names_never_escape_out(images, tmp_path, name):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / name).write_bytes(images[0].read_bytes())
    out = tmp_path / "deep" / "out"
    result = run(str(odd / name), "--prompt", "x", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    written = list(tmp_path.rglob("segments.json"))
    assert len(written) == 1 and written[0].resolve().is_relative_to(out.resolve()), written


def test_synth_models_warn_in_one_line(images, tmp_path):
    result = run(str(images[0]), "--prompt", "circle", "--out", str(tmp_path / "o"), "--sam", "synth",
                 "--clip", "synth", "--device", "cpu")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "synthetic world" in warnings[0]


def test_instances_all_and_per_prompt_thresholds(images, tmp_path):
    """Per-prompt thresholds: an impossible one gives an explicit empty answer, never an error."""
    out = tmp_path / "out"
    result = run(str(images[0]), "--prompt", "a", "--prompt", "b", "--threshold", "-1", "--threshold", "1",
                 "--instances", "all", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / images[0].stem / "segments.json").read_text())
    everything, nothing = doc["matches"]
    assert len(everything["instances"]) >= 1 and nothing["instances"] == [] and nothing["threshold"] == 1.0
    assert "'b' -> not found" in result.output
    assert not np.asarray(Image.open(out / images[0].stem / "mask_1.png")).any()


# --- one configuration: the SLIP_* settings apply to slip segment as to the workers -------------------------


def test_the_model_settings_come_from_the_environment(images, tmp_path):
    """SLIP_SAM / SLIP_CLIP / SLIP_DEVICE are this command's defaults too (they were ignored: vit_b was loaded)."""
    out = tmp_path / "out"
    env = {"SLIP_SAM": "synth", "SLIP_CLIP": "synth", "SLIP_DEVICE": "cpu"}
    result = CliRunner().invoke(build_app(), ["segment", str(images[0]), "--prompt", "circle", "--out", str(out)],
                                env=env)
    assert result.exit_code == 0, result.output
    request = json.loads((out / images[0].stem / "segments.json").read_text())["request"]
    assert (request["sam"]["spec"], request["ranker"]["spec"]) == ("synth", "synth")
    flagged = CliRunner().invoke(build_app(), ["segment", str(images[0]), "--prompt", "circle", "--out", str(out),
                                               "--clip", "tiny-random"], env=env)
    assert flagged.exit_code == 0, flagged.output  # a flag wins over its variable
    assert json.loads((out / images[0].stem / "segments.json").read_text())["request"]["ranker"]["spec"] == "tiny-random"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_asked_for_by_the_environment_is_one_line_naming_the_variable(images, tmp_path):
    """SLIP_DEVICE=cuda:0 on a machine without a GPU ran on the CPU silently; now one line, exit 2."""
    result = CliRunner().invoke(build_app(), ["segment", str(images[0]), "--prompt", "x", "--out", str(tmp_path)],
                                env={"SLIP_SAM": "tiny-random", "SLIP_CLIP": "tiny-random", "SLIP_DEVICE": "cuda:0"})
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no CUDA GPU" in errors[0] and "SLIP_DEVICE=cpu" in errors[0]


def test_a_bad_variable_names_itself_and_an_unused_one_is_ignored(images, tmp_path):
    args = ["segment", str(images[0]), "--prompt", "x", "--out", str(tmp_path / "o"), *TINY]
    bad = CliRunner().invoke(build_app(), args[:-len(TINY)] + ["--sam", "tiny-random", "--clip", "tiny-random"],
                             env={"SLIP_DEVICE": "gpu"})
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1] == (
        "error: --device / SLIP_DEVICE='gpu' is invalid: expected auto | cpu | cuda | cuda:N | mps")
    unused = CliRunner().invoke(build_app(), args, env={"SLIP_DEVICE": "gpu", "SLIP_BROKER_URL": "http://nope",
                                                        "SLIP_VISIBILITY_TIMEOUT": "1"})
    assert unused.exit_code == 0, unused.output  # --device given; broker settings are not this command's


@pytest.mark.parametrize("level, shown", [("INFO", True), ("WARNING", False)])
def test_slip_log_level_applies(images, tmp_path, level, shown):
    proc = subprocess.run(
        [sys.executable, "-m", "producer", "segment", str(images[0]), "--prompt", "x", "--out", str(tmp_path / "o"),
         *TINY], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "SLIP_LOG_LEVEL": level})
    assert proc.returncode == 0, proc.stderr
    startup = [line for line in proc.stderr.splitlines() if line.startswith("INFO slip.segment: engine slip: sam tiny-random")]
    assert bool(startup) is shown, proc.stderr
