"""SAM architectures, builders and checkpoint loading.

A SAM spec string is one of:

* ``vit_h`` / ``vit_l`` / ``vit_b`` — the official checkpoint in the weights cache (``$SLIP_CACHE``);
* ``synth`` — the small SAM bundled with this package, trained on the synthetic world;
* a path to an official ``.pth`` state dict (architecture detected from its shapes, or read from a
  ``config.json`` beside it), or to a directory holding ``config.json`` + ``model.safetensors``;
* ``tiny-random`` — a seeded, randomly initialised toy SAM for tests and offline plumbing. Its masks
  mean nothing; it is used only when asked for by name.

A checkpoint may come with recommended :class:`slip.generator.MaskGenerator` options in a
``generator.json`` beside it (:func:`recommended_generator_params`), and a recommended annotation filter
chain in a ``filters.json`` beside it (:func:`recommended_filters`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from slip.device import resolve_device, resolve_dtype
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError

OFFICIAL_TYPES = ("vit_h", "vit_l", "vit_b")
TINY_SPEC = "tiny-random"
SYNTH_SPEC = "synth"
BUNDLED_DIR = Path(__file__).parent / "weights"
GENERATOR_FILE = "generator.json"  # recommended MaskGenerator options (a JSON object), beside a checkpoint
FILTERS_FILE = "filters.json"  # recommended filter chain, {"filters": "<chain>", "why": "<sentence>"}, beside it
PAPER_FILTERS = "containment"  # the SLIP paper's filter chain: used when neither the user nor the checkpoint says


@dataclass(frozen=True)
class SamArch:
    """Hyper-parameters of a SAM; the official sizes differ only in the encoder fields."""

    encoder_embed_dim: int  # ViT width
    encoder_depth: int  # ViT blocks
    encoder_num_heads: int  # ViT attention heads
    encoder_global_attn_indexes: tuple[int, ...]  # blocks with global (not windowed) attention
    img_size: int = 1024  # input side in pixels after ResizeLongestSide + padding
    patch_size: int = 16  # ViT patch side; embedding grid is img_size // patch_size
    window_size: int = 14  # windowed-attention side, in patches
    prompt_embed_dim: int = 256  # width of prompt encoder, mask decoder and encoder neck
    decoder_depth: int = 2  # two-way transformer blocks
    decoder_mlp_dim: int = 2048  # two-way transformer MLP width
    decoder_num_heads: int = 8  # two-way transformer heads
    iou_head_hidden_dim: int = 256  # IoU prediction MLP width
    mask_in_chans: int = 16  # channels of the dense mask-prompt embedding
    name: str = field(default="custom", compare=False)  # registry name, for messages only

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_json(data: dict) -> "SamArch":
        try:
            data = dict(data)
            data["encoder_global_attn_indexes"] = tuple(data["encoder_global_attn_indexes"])
            return SamArch(**data)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid SAM config: {e}") from e


SAM_ARCHS: dict[str, SamArch] = {
    "vit_h": SamArch(1280, 32, 16, (7, 15, 23, 31), name="vit_h"),
    "vit_l": SamArch(1024, 24, 16, (5, 11, 17, 23), name="vit_l"),
    "vit_b": SamArch(768, 12, 12, (2, 5, 8, 11), name="vit_b"),
    TINY_SPEC: SamArch(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(1,),
        img_size=128,
        window_size=4,
        prompt_embed_dim=32,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
        iou_head_hidden_dim=32,
        name=TINY_SPEC,
    ),
}


def build_sam(arch: SamArch) -> Sam:
    """A randomly initialised ``Sam`` of ``arch``, in eval mode, on CPU."""
    grid = arch.img_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_tiny_sam(seed: int = 0) -> Sam:
    """The ``tiny-random`` SAM: deterministic for ``seed``, meaningless masks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(SAM_ARCHS[TINY_SPEC])


def detect_arch(state_dict: dict[str, torch.Tensor]) -> SamArch:
    """The official architecture whose shapes match ``state_dict``."""
    try:
        width = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
    except KeyError as e:
        raise ConfigError("not a SAM state dict: image_encoder.patch_embed.proj.weight is missing") from e
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for arch in (SAM_ARCHS[t] for t in OFFICIAL_TYPES):
        if (arch.encoder_embed_dim, arch.encoder_depth) == (width, depth):
            return arch
    raise ConfigError(
        f"SAM state dict has encoder width {width} and depth {depth}, which match no official model "
        "(vit_h 1280/32, vit_l 1024/24, vit_b 768/12); put a config.json with its SamArch beside it"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` (official format) or ``.safetensors`` file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"cannot read SAM checkpoint {path}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the state dict
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def save_sam(sam: Sam, path: Path, arch: SamArch) -> Path:
    """Save ``sam`` as an official-format ``.pth`` state dict, with ``config.json`` beside it
    unless ``arch`` is an official size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    if arch.name not in OFFICIAL_TYPES:
        (path.parent / "config.json").write_text(json.dumps(arch.to_json(), indent=2))
    return path


def _checkpoint_file(path: Path) -> Path:
    """The weights file of a checkpoint path (a file, or a directory holding one)."""
    if path.is_file():
        return path
    for name in ("model.safetensors", "sam.pth", "model.pth"):
        if (path / name).is_file():
            return path / name
    raise WeightsNotFoundError(
        f"no SAM weights in {path}: expected model.safetensors, sam.pth or model.pth there"
    )


def load_sam_checkpoint(path: Path) -> tuple[Sam, SamArch]:
    """Build and load a SAM from a checkpoint file or directory (official or our format)."""
    weights = _checkpoint_file(path)
    state = read_state_dict(weights)
    config = weights.parent / "config.json"
    if config.is_file() and "encoder_embed_dim" in (cfg := json.loads(config.read_text())):
        arch = SamArch.from_json(cfg)
    else:
        arch = detect_arch(state)
    sam = build_sam(arch)
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{weights} does not fit SAM architecture {arch.name}: {e}") from e
    return sam, arch


def _resolve_spec(spec: str, cache_dir: Path | None) -> Path:
    """The checkpoint path behind a non-tiny spec string."""
    from slip.weights import bundled_path, sam_checkpoint

    if spec in OFFICIAL_TYPES:
        return sam_checkpoint(spec, cache_dir)
    if spec == SYNTH_SPEC:
        return bundled_path("synth-sam")
    path = Path(spec).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(
            f"SAM spec {spec!r} is neither vit_h/vit_l/vit_b/synth/tiny-random nor an existing path"
        )
    return path


def load_sam(
    spec: str,
    *,
    device: str | torch.device = "auto",
    dtype: str = "fp32",
    cache_dir: Path | None = None,
) -> Sam:
    """A ready SAM (eval mode, on ``device``) for a spec string; see the module docstring."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec == TINY_SPEC:
        sam = build_tiny_sam()
    else:
        sam, _ = load_sam_checkpoint(_resolve_spec(spec, cache_dir))
    return sam.to(device=dev, dtype=torch_dtype).eval()


def _beside(checkpoint: Path, name: str) -> Path:
    """The file ``name`` beside a checkpoint: inside it when it is a directory, else in its folder."""
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / name


def _read_json(path: Path):
    """The parsed JSON of a recommendation file; ConfigError naming it when it does not parse."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def read_generator_params(checkpoint: Path) -> dict:
    """The recommended generator options stored beside a checkpoint (file or directory); ``{}`` if none.

    The options are returned as written (see :func:`recommended_generator_params` for the checked form)."""
    path = _beside(checkpoint, GENERATOR_FILE)
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object of MaskGenerator options, not {type(data).__name__}")
    return data


def recommended_generator_params(spec: str, *, cache_dir: Path | None = None) -> dict:
    """The :class:`~slip.generator.MaskGenerator` options recommended for the SAM ``spec``: the
    ``generator.json`` beside its checkpoint, ``{}`` for ``tiny-random`` and checkpoints without one.

    Precedence wherever a generator is built: SAM's defaults < the checkpoint's generator.json < options
    the user gives explicitly, i.e. ``MaskGenerator(sam, **{**recommended, **explicit})``.
    Raises ConfigError naming the file when a key is not a MaskGenerator option.
    """
    if spec == TINY_SPEC:
        return {}
    checkpoint = _resolve_spec(spec, cache_dir)
    params = read_generator_params(checkpoint)
    known = mask_generator_defaults()
    for key in params:
        if key not in known:
            raise ConfigError(
                f"{_beside(checkpoint, GENERATOR_FILE)}: {key!r} is not a MaskGenerator option (expected some of {', '.join(sorted(known))})"
            )
    return params


def mask_generator_defaults() -> dict:
    """``MaskGenerator``'s own keyword defaults (SAM's), option name -> value."""
    import inspect

    from slip.generator import MaskGenerator  # imported here: the generator builds on this module's models

    params = inspect.signature(MaskGenerator).parameters
    return {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def recommended_filters(spec: str, *, cache_dir: Path | None = None) -> str | None:
    """The annotation filter chain recommended for the SAM ``spec`` (a :func:`slip.filters.parse_filters`
    string): the ``filters`` entry of the ``filters.json`` beside its checkpoint, written as
    ``{"filters": "<chain>", "why": "<one sentence>"}``; None for ``tiny-random`` and checkpoints without one.

    Precedence wherever a filter chain is chosen (:func:`resolve_filters`): the paper's default
    ``containment`` < the checkpoint's filters.json < the chain the user gives explicitly.
    Raises ConfigError naming the file when it is malformed or its chain does not parse.
    """
    from slip.filters import parse_filters  # imported here: the filters build on the masks, not on this module

    if spec == TINY_SPEC:
        return None
    checkpoint = _resolve_spec(spec, cache_dir)
    path = _beside(checkpoint, FILTERS_FILE)
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("filters"), str) or set(data) - {"filters", "why"}:
        raise ConfigError(f'{path} must hold {{"filters": "<filter chain>", "why": "<reason>"}}, got {data!r}')
    try:
        parse_filters(data["filters"])
    except ConfigError as e:
        raise ConfigError(f"{path}: bad filter chain {data['filters']!r}: {e}") from e
    return data["filters"]


def resolve_filters(explicit: str | None, recommended: str | None) -> str:
    """The filter chain to use: ``explicit`` (the user's) if given, else ``recommended`` (the checkpoint's
    filters.json, :func:`recommended_filters`), else the paper's :data:`PAPER_FILTERS`."""
    if explicit is not None:
        return explicit
    return PAPER_FILTERS if recommended is None else recommended
