"""The bundled ranker (``--clip synth``): its bundle format, and the bundled pair on held-out composites."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from slip.rankers.dual_encoder import DualEncoderConfig, DualEncoderRanker, save_dual_encoder
from slip.rankers.loading import load_ranker
from slip.train.synth_clip import BUNDLE_DIR, REBUILD_COMMAND, SYNTH_CLIP_MODEL, install_bundle
from slip.train.towers import build_dual_encoder


def test_install_bundle_stores_half_precision_without_the_frozen_text_encoder(tmp_path, tiny_config):
    config = DualEncoderConfig(**{**tiny_config.__dict__, "text_encoder": "minilm", "pretrained_text": True,
                                  "freeze_text": True})
    model, tokenizer, init = build_dual_encoder(config, seed=1)
    work = save_dual_encoder(model, tokenizer, tmp_path / "work", init=init, training={"best_epoch": 3})
    (work / "curve.json").write_text(json.dumps({"epochs": [], "best_epoch": 3}))
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "stale.txt").write_text("an older bundle")  # replaced whole, not merged
    assert install_bundle(work, target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in work.iterdir())
    stored = load_file(str(target / "model.safetensors"))
    assert not any(k.startswith("text_encoder.") for k in stored)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    meta = json.loads((target / "config.json").read_text())
    assert meta["training"] == {"rebuild": REBUILD_COMMAND, "best_epoch": 3}
    pixels = torch.rand(2, 3, 32, 32)
    original = DualEncoderRanker(model, tokenizer, spec="o").encode_images(pixels)
    assert torch.allclose(load_ranker(str(target), device="cpu").encode_images(pixels), original, atol=5e-3)


def test_train_ranker_needs_out_or_bundle(tmp_path):
    import typer

    from slip.cli.train import train_ranker

    app = typer.Typer()
    app.command("train-ranker")(train_ranker)
    app.command("other")(lambda: None)
    done = CliRunner().invoke(app, ["train-ranker", str(tmp_path), "--quiet"])
    assert done.exit_code == 2 and "--out" in done.output and "--bundle" in done.output


# --- the bundled models -----------------------------------------------------------------------------------


def test_bundled_synth_clip_is_small_and_loads_as_synth():
    meta = json.loads((BUNDLE_DIR / "config.json").read_text())
    assert DualEncoderConfig.from_json(meta["config"]) == SYNTH_CLIP_MODEL
    assert meta["text_weights"]["source"] == "minilm" and meta["training"]["rebuild"] == REBUILD_COMMAND
    assert sum(p.stat().st_size for p in BUNDLE_DIR.iterdir()) < 8_000_000  # a few MB
    ranker = load_ranker("synth", device="cpu")
    assert isinstance(ranker, DualEncoderRanker) and ranker.dim == SYNTH_CLIP_MODEL.proj_dim
    assert all(p.dtype == torch.float32 for p in ranker.model.parameters())


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Synthetic images generated with seed 7: the bundled models trained on the seed-0 dataset only."""
    from slip.data.synth import CLASS_NAMES, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("heldout") / "ds", classes=len(CLASS_NAMES), per_class=5,
                            size=128, seed=7)


def test_bundled_pair_finds_the_prompted_object_on_held_out_composites(heldout):
    """The whole SLIP pipeline offline: the bundled SAM's proposals (its recommended generator options and
    filters), the bundled ranker, every class of 6 composites queried. Chance is about 1 in 4; the
    benchmark (bench/slip_synth.py, 200 composites) measures ~90 %."""
    from slip.evaluate import evaluate_rankers

    (run,) = evaluate_rankers(heldout, ["synth"], composites=6, seed=7, proposals="sam", sam="synth", device="cpu")
    plain = run.summary["plain"]
    assert plain["queries"] == 24
    assert plain["accuracy"] >= 0.75, plain
    assert plain["mean_iou"] >= 0.6, plain
