"""SAM checkpoints no command may load, written in the real formats: a truncated download, a ``.pth`` that
pickles a shell command (never unpickled), a good ``.pth`` beside a corrupt ``config.json``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

WORDS = {"corrupt": "corrupt or truncated", "unsafe": "not a plain tensor checkpoint", "config": "is not valid JSON"}


class Payload:
    """Pickled into a checkpoint: loading it with ``weights_only=False`` would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_bad_checkpoints(folder: Path) -> dict[str, Path]:
    """``corrupt``, ``unsafe`` and ``config`` -> the ``sam.pth`` written under ``folder/<name>/`` (the payload,
    if ever run, would create ``folder/pwned``)."""
    from slip.sam import SAM_ARCHS, TINY_SPEC, build_tiny_sam, save_sam

    good = save_sam(build_tiny_sam(), folder / "good" / "sam.pth", SAM_ARCHS[TINY_SPEC])
    paths = {name: folder / name / "sam.pth" for name in WORDS}
    for path in paths.values():
        path.parent.mkdir(parents=True)
    paths["corrupt"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a truncated download
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1), "x": Payload(folder / "pwned")},
               paths["unsafe"])
    paths["config"].write_bytes(good.read_bytes())
    (folder / "config" / "config.json").write_text('{"encoder_embed_dim": 32,')  # cut short
    return paths
