"""Fixtures of the exports tests: a tiny synthetic dataset with COCO ground truth (``slip data synth
--coco``) segmented by the real pipeline with the bundled models, as the ledger would hand it over."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer.exports import ExportItem

CLASSES = 3  # the first classes of the catalogue: circle, square, triangle
PER_CLASS = 2
SIZE = 96  # px, small enough for a few seconds per image on CPU
POINTS_PER_SIDE = 5  # 25 point prompts: enough for one object per image


@dataclass(frozen=True)
class SynthRun:
    root: Path  # the dataset (images relative to it)
    truth: Path  # its instances.coco.json
    prompts: tuple[str, ...]  # the class names
    items: tuple[ExportItem, ...]  # one done item per image, with the real segments.json v2 document


def _reader(path: Path):
    return lambda: path.read_bytes()


@pytest.fixture(scope="session")
def synth_run(tmp_path_factory) -> SynthRun:
    from slip.cli.data import data_app
    from slip.config import SlipConfig, build_slip
    from slip.data.synth import COCO_FILE
    from slip.images import load_image
    from slip.outputs import result_record

    root = tmp_path_factory.mktemp("synth")
    run = CliRunner().invoke(data_app, ["synth", "--out", str(root), "--classes", str(CLASSES), "--per-class",
                                        str(PER_CLASS), "--size", str(SIZE), "--coco"])
    assert run.exit_code == 0, run.output
    truth = root / COCO_FILE
    gt = json.loads(truth.read_text())
    prompts = tuple(c["name"] for c in gt["categories"])
    pipeline = build_slip(SlipConfig.of(sam="synth", clip="synth", device="cpu", points_per_side=POINTS_PER_SIDE))
    items = []
    for k, image in enumerate(gt["images"]):
        path = root / image["file_name"]
        result = pipeline(load_image(path), prompts)
        doc = json.loads(json.dumps(result_record(result, prompts, pipeline.request, {})))  # as stored
        items.append(ExportItem(index=k, name=image["file_name"], state="done", doc=doc, reason=None,
                                image=_reader(path), image_file=str(path)))
    return SynthRun(root, truth, prompts, tuple(items))
