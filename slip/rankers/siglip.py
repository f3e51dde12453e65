"""A :class:`~slip.rankers.base.Ranker` over Hugging Face SigLIP and SigLIP 2 models.

SigLIP is trained with a pairwise sigmoid loss: ``p = sigmoid(exp(logit_scale) * cos + logit_bias)`` is a
calibrated "this crop shows this text" probability on its own, no softmax over the other prompts. The ranker
says so through :meth:`SiglipRanker.score`: the pipeline ranks, thresholds and reports on that probability
(``--threshold 0.5`` means "SigLIP is at least 50 % sure"), so its own score is the threshold scale.

Formats (``config.json`` ``model_type``):

* ``siglip`` — ``SiglipModel`` (SigLIP, and the fixed-resolution SigLIP 2 checkpoints such as
  ``google/siglip2-base-patch16-224``): square crops of ``vision_config.image_size``;
* ``siglip2`` — ``Siglip2Model`` (NaFlex): crops of ``patch_size * sqrt(max_num_patches)`` pixels, cut into
  patches by the checkpoint's own ``Siglip2ImageProcessor``.

Texts are padded to the model's full text length (``max_position_embeddings``), as SigLIP was trained.
``tiny-random-siglip``: seeded random ``SiglipModel`` (width 32, 32-pixel crops) with an offline tokenizer, for
tests, used only when named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from slip import names
from slip.errors import WeightsError
from slip.rankers.base import resize_square, sigmoid_scores

TINY_SIGLIP = names.TINY_SIGLIP
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP pixel normalisation, RGB in [0, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)
MODEL_TYPES = ("siglip", "siglip2")


class SiglipRanker:
    """Embeds square crops and prompts with a SigLIP / SigLIP 2 model; outputs are ``float32``, unit norm."""

    def __init__(self, model, tokenizer, *, spec: str, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, mean: Sequence[float] = SIGLIP_MEAN,
                 std: Sequence[float] = SIGLIP_STD, image_processor=None, batch_size: int = 64) -> None:
        self.spec = spec  # the spec string it was loaded from
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.naflex = model.config.model_type == "siglip2"  # patches + masks instead of a fixed square
        self.image_processor = image_processor  # Siglip2ImageProcessor (NaFlex only)
        vision = model.config.vision_config
        if self.naflex:
            self.image_size = int(vision.patch_size * math.isqrt(int(image_processor.max_num_patches)))
        else:
            self.image_size = int(vision.image_size)  # crop side in pixels
        self.batch_size = batch_size
        self.calibrated = True  # score() maps cosines to SigLIP's pairwise probability
        self.text_length = int(model.config.text_config.max_position_embeddings)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return int(self.model.config.text_config.projection_size
                   if hasattr(self.model.config.text_config, "projection_size")
                   else self.model.config.text_config.hidden_size)

    def score(self, similarity: torch.Tensor) -> torch.Tensor:
        """Cosine similarities -> SigLIP's pairwise probabilities ``sigmoid(exp(scale) * cos + bias)``
        (float32, same shape): monotonic, so the ranking is unchanged; thresholds are on this scale."""
        return sigmoid_scores(similarity, self.model.logit_scale, self.model.logit_bias)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` float in ``[0, 1]`` -> ``(B, D)`` float32, unit norm, on ``device``."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images wants (B, 3, S, S) pixels, got shape {tuple(pixels.shape)}")
        if len(pixels) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat([self._image_batch(chunk) for chunk in pixels.split(self.batch_size)])

    def _image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        x = resize_square(pixels.to(device=self.device, dtype=torch.float32), self.image_size)
        if self.naflex:
            inputs = self.image_processor(images=list(x.cpu()), do_rescale=False, do_resize=False, return_tensors="pt")
            features = self.model.get_image_features(
                pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                pixel_attention_mask=inputs["pixel_attention_mask"].to(self.device),
                spatial_shapes=inputs["spatial_shapes"].to(self.device))
        else:
            features = self.model.get_image_features(pixel_values=((x - self._mean) / self._std).to(self.dtype))
        return _unit(_pooled(features))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``P`` strings -> ``(P, D)`` float32, unit norm, on ``device``."""
        texts = list(texts)
        out = [self._text_batch(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=self.device)

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_length,
                                return_tensors="pt").to(self.device)
        return _unit(_pooled(self.model.get_text_features(input_ids=tokens["input_ids"])))


def _pooled(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# --- building, saving, loading --------------------------------------------------------------------------


def build_tiny_siglip(seed: int = 0, *, image_size: int = 32):
    """``(SiglipModel, tokenizer)`` of ``tiny-random-siglip``: seeded random weights (width 32, 2 layers,
    patch 8, 16 text tokens) and an offline tokenizer. Its scores mean nothing; used only when named."""
    from transformers import SiglipConfig, SiglipModel

    from slip.rankers.hf_clip import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(config)
    return model.eval(), tokenizer


def save_siglip(model, tokenizer, directory: Path, *, image_processor=None) -> Path:
    """Write a Hugging Face SigLIP directory (model, tokenizer, ``preprocessor_config.json``); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if image_processor is not None:
        image_processor.save_pretrained(directory)
    else:
        size = int(model.config.vision_config.image_size)
        config = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                  "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(SIGLIP_MEAN),
                  "image_std": list(SIGLIP_STD)}
        (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_siglip(directory: Path, *, spec: str, device: torch.device, dtype: torch.dtype) -> SiglipRanker:
    """A :class:`SiglipRanker` from a Hugging Face SigLIP / SigLIP 2 directory (never touches the network)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from slip.rankers.hf_clip import read_normalisation

    directory = Path(directory)
    try:
        model = AutoModel.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        processor = (AutoImageProcessor.from_pretrained(directory, local_files_only=True)
                     if model.config.model_type == "siglip2" else None)
    except Exception as e:  # transformers, tokenizers and safetensors raise many types for corrupt or partial files
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise WeightsError(f"cannot load a SigLIP model from {directory}: {type(e).__name__}: {first}; "
                           f"fetch or save it again") from e
    mean, std = read_normalisation(directory)
    if not (directory / "preprocessor_config.json").is_file():
        mean, std = SIGLIP_MEAN, SIGLIP_STD
    return SiglipRanker(model, tokenizer, spec=spec, device=device, dtype=dtype, mean=mean, std=std,
                        image_processor=processor)
