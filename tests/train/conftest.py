"""Fixtures of the training tests: a small synthetic dataset and tiny dual-encoder configurations."""

from __future__ import annotations

import pytest

from slip.data.synth import generate_dataset
from slip.rankers.dual_encoder import DualEncoderConfig


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """6 classes x 10 images of 48 px, with masks (deterministic, seed 0)."""
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", classes=6, per_class=10, size=48, seed=0)


@pytest.fixture
def tiny_config() -> DualEncoderConfig:
    """timm's test_resnet + a 2-layer random DistilBERT, 32 px crops: seconds to train on a CPU."""
    return DualEncoderConfig(image_backbone="test_resnet", text_encoder="tiny-random", text_pooling="mean",
                             image_size=32, proj_dim=16, pretrained_image=False, pretrained_text=False)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The machine's 2 cores are shared with other test runs: one intra-op thread avoids OpenMP
    spin-waiting against them (several times faster under load, the same results)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
