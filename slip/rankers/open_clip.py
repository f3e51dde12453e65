"""A :class:`~slip.rankers.base.Ranker` over ``open_clip`` models: the largest zoo of CLIP checkpoints (LAION,
DFN, MetaCLIP, SigLIP ports ...).

An open_clip checkpoint directory holds ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg":
{...}}``) and its weights (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), as the hub
repos of the ``hf-hub:`` ids do. Specs:

* ``hf-hub:org/name`` — the snapshot in the weights cache (``slip weights fetch hf-hub:org/name``); loaded from
  disk through open_clip's ``local-dir:`` schema, so nothing is downloaded at load time;
* a directory holding ``open_clip_config.json`` (local files), or ``local-dir:/path``.

Pixels are normalised with the checkpoint's ``preprocess_cfg`` mean / std at its ``size``; texts use the
checkpoint's tokenizer (``open_clip.get_tokenizer``). A model with a ``logit_bias`` (sigmoid-loss training,
SigLIP ports) exposes :meth:`OpenClipRanker.score` like :class:`slip.rankers.siglip.SiglipRanker`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from slip.errors import WeightsError, WeightsNotFoundError
from slip.rankers.base import resize_square, sigmoid_scores
from slip.weights import OPEN_CLIP_CONFIG

CONFIG_FILE = OPEN_CLIP_CONFIG
HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
WEIGHTS_FILE = "open_clip_model.safetensors"


class OpenClipRanker:
    """Embeds square crops and prompts with an open_clip ``CLIP``; outputs are ``float32``, unit norm."""

    def __init__(self, model, tokenizer, *, spec: str, image_size: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                 batch_size: int = 64) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer  # open_clip tokenizer: list[str] -> (P, context_length) int64
        self.image_size = int(image_size)
        self.batch_size = batch_size
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # a model trained with a sigmoid loss (a logit_bias) scores pairs on its own calibrated scale
        self.calibrated = getattr(model, "logit_bias", None) is not None

    def score(self, similarity: torch.Tensor) -> torch.Tensor:
        """Cosines -> ``sigmoid(exp(logit_scale) * cos + logit_bias)`` (models trained with a sigmoid loss)."""
        return sigmoid_scores(similarity, self.model.logit_scale, self.model.logit_bias)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float in ``[0, 1]`` -> ``(B, D)`` float32, unit norm, on ``device``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images wants (B, 3, S, S) pixels, got shape {tuple(pixels.shape)}")
        out = []
        for chunk in pixels.split(self.batch_size):
            x = resize_square(chunk.to(device=self.device, dtype=torch.float32), self.image_size)
            out.append(F.normalize(self.model.encode_image(((x - self._mean) / self._std).to(self.dtype)).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self._dim(), device=self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``P`` strings -> ``(P, D)`` float32, unit norm, on ``device``."""
        texts = list(texts)
        out = [F.normalize(self.model.encode_text(self.tokenizer(texts[i : i + self.batch_size]).to(self.device)).float(),
                           dim=-1) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self._dim(), device=self.device)

    def _dim(self) -> int:
        return int(self.encode_texts(["object"]).shape[1])


def is_open_clip_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def open_clip_directory(spec: str, cache_dir: Path | None) -> Path | None:
    """The local directory behind an open_clip spec (``hf-hub:`` id in the cache, ``local-dir:`` path or a
    directory with ``open_clip_config.json``); None when ``spec`` is not an open_clip one."""
    from slip.weights import clip_path

    if spec.startswith(HUB_PREFIX):
        return clip_path(spec[len(HUB_PREFIX):], cache_dir, what="open_clip model")
    path = Path(spec[len(LOCAL_PREFIX):] if spec.startswith(LOCAL_PREFIX) else spec).expanduser()
    if spec.startswith(LOCAL_PREFIX) and not path.is_dir():
        raise WeightsNotFoundError(f"no open_clip directory at {path}")
    return path if path.is_dir() and is_open_clip_dir(path) else None


def save_open_clip(model, model_cfg: dict, directory: Path, *, preprocess_cfg: dict | None = None) -> Path:
    """Write ``model`` as an open_clip checkpoint directory (config + safetensors weights); returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    return directory


def load_open_clip(directory: Path, *, spec: str, device: torch.device, dtype: torch.dtype) -> OpenClipRanker:
    """An :class:`OpenClipRanker` from an open_clip checkpoint directory (never touches the network)."""
    import open_clip

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        model = open_clip.create_model(f"{LOCAL_PREFIX}{directory}", device="cpu", require_pretrained=True)
        tokenizer = open_clip.get_tokenizer(f"{LOCAL_PREFIX}{directory}")
    except Exception as e:  # open_clip raises ValueError, RuntimeError, FileNotFoundError, safetensors errors
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise WeightsError(f"cannot load an open_clip model from {directory}: {type(e).__name__}: {first}; "
                           f"fetch or save it again") from e
    preprocess = getattr(model.visual, "preprocess_cfg", None) or config.get("preprocess_cfg", {})
    size = preprocess.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
    return OpenClipRanker(model, tokenizer, spec=spec, image_size=int(size), mean=mean, std=std, device=device,
                          dtype=dtype)
