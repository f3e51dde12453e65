"""SAM 2 / 2.1 architectures: the official ``sam2`` package's model, built from its own config files.

One modeling implementation: ``sam2.modeling.sam2_base.SAM2Base`` as ``sam2.build_sam.build_sam2`` builds it
from the package's Hydra configs (``configs/sam2.1/sam2.1_hiera_t.yaml`` ...), so the official
``SAM2AutomaticMaskGenerator`` and our generator run the very same modules. Checkpoints in the official
format (``{"model": state_dict}`` in a ``.pt`` file, as facebookresearch/sam2 releases them) load as they
are; Hugging Face ``Sam2Model`` directories are converted at load (:mod:`slip.proposers.sam2_hf`).

Registry (:data:`SAM2_ARCHS`): ``sam2-hiera-{tiny,small,base-plus,large}`` and
``sam2.1-hiera-{tiny,small,base-plus,large}`` (the released sizes; the 2.1 configs differ from 2.0 only in
video-tracking parts), and ``tiny-random-sam2``: the 2.1 config shrunk by Hydra overrides (Hiera width 8,
neck and decoder width 32, image size 1024 as the official predictor requires), seeded random weights,
for tests; used only when named.

A state dict's architecture is recognised from its shapes (:func:`detect_sam2_arch`): Hiera width and
blocks per stage (stage ends are the blocks with a ``proj``: the width changes there), 2.1 vs 2.0 from
``no_obj_embed_spatial``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from slip import names
from slip.errors import ConfigError, WeightsError, WeightsNotFoundError

TINY_SAM2 = names.TINY_SAM2
CONFIG_DIR = "configs"  # inside the sam2 package


@dataclass(frozen=True)
class Sam2Arch:
    """One SAM 2 architecture: the official config it is built from, and what identifies its weights."""

    name: str  # registry name, e.g. sam2.1-hiera-large (the Hugging Face id without "facebook/")
    config: str  # Hydra config of the sam2 package, e.g. configs/sam2.1/sam2.1_hiera_l.yaml
    width: int  # Hiera embedding width of the first stage (image_encoder.trunk.patch_embed)
    stages: tuple[int, ...]  # Hiera blocks per stage
    version: str  # "2" or "2.1"
    overrides: tuple[str, ...] = ()  # Hydra overrides on the config (tiny-random-sam2 only)
    checkpoint: str | None = None  # file name of the official release (sam2.1_hiera_large.pt)

    @property
    def hub_id(self) -> str | None:
        return None if self.checkpoint is None else f"facebook/{self.name}"


_SIZES = {  # size -> (config letter, width, blocks per stage, release file stem)
    "tiny": ("t", 96, (1, 2, 7, 2), "hiera_tiny"),
    "small": ("s", 96, (1, 2, 11, 2), "hiera_small"),
    "base-plus": ("b+", 112, (2, 3, 16, 3), "hiera_base_plus"),
    "large": ("l", 144, (2, 6, 36, 4), "hiera_large"),
}
_TINY_OVERRIDES = (  # the 2.1 tiny config, shrunk; memory (video) parts shrunk too so the file stays small
    "++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.d_model=32", "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32", "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32", "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16", "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.mask_downsampler.embed_dim=32", "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1", "++model.memory_encoder.position_encoding.num_pos_feats=16",
)


def _registry() -> dict[str, Sam2Arch]:
    archs = {}
    for version, folder, prefix in (("2", "sam2", "sam2_"), ("2.1", "sam2.1", "sam2.1_")):
        for size, (letter, width, stages, stem) in _SIZES.items():
            name = f"sam{version}-hiera-{size}"
            archs[name] = Sam2Arch(name, f"{CONFIG_DIR}/{folder}/{prefix}hiera_{letter}.yaml", width, stages, version,
                                   checkpoint=f"{prefix}{stem}.pt")
    archs[TINY_SAM2] = Sam2Arch(TINY_SAM2, f"{CONFIG_DIR}/sam2.1/sam2.1_hiera_t.yaml", 8, (1, 1, 2, 1), "2.1",
                                overrides=_TINY_OVERRIDES)
    return archs


SAM2_ARCHS: dict[str, Sam2Arch] = _registry()


def build_sam2(arch: Sam2Arch):
    """A randomly initialised official ``SAM2Base`` of ``arch`` (eval mode, CPU), built as
    ``sam2.build_sam.build_sam2`` builds it (with its image-predictor post-processing settings)."""
    from sam2.build_sam import build_sam2 as official_build

    return official_build(arch.config, None, device="cpu", mode="eval",
                          hydra_overrides_extra=list(arch.overrides)).eval()


def build_tiny_sam2(seed: int = 0):
    """The ``tiny-random-sam2`` model: deterministic for ``seed``, meaningless masks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam2(SAM2_ARCHS[TINY_SAM2])


def is_sam2_state(state: dict) -> bool:
    """Whether a state dict is an official SAM 2 one (a Hiera trunk)."""
    return "image_encoder.trunk.patch_embed.proj.weight" in state


def detect_sam2_arch(state: dict[str, torch.Tensor], *, source: Path | str = "state dict") -> Sam2Arch:
    """The registered architecture whose shapes match an official SAM 2 state dict."""
    try:
        width = int(state["image_encoder.trunk.patch_embed.proj.weight"].shape[0])
    except KeyError as e:
        raise ConfigError(f"{source} is not a SAM 2 checkpoint: image_encoder.trunk.patch_embed is missing") from e
    blocks = sorted({int(k.split(".")[3]) for k in state if k.startswith("image_encoder.trunk.blocks.")})
    starts = [b for b in blocks if f"image_encoder.trunk.blocks.{b}.proj.weight" in state]
    bounds = [0, *starts, len(blocks)]
    stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    version = "2.1" if "no_obj_embed_spatial" in state else "2"
    for arch in SAM2_ARCHS.values():
        if (arch.width, arch.stages) == (width, stages) and (arch.version == version or arch.name == TINY_SAM2):
            return arch
    raise ConfigError(
        f"{source}: a SAM 2 with Hiera width {width} and blocks per stage {list(stages)} matches no released size "
        f"({', '.join(f'{s} {w}/{list(b)}' for s, (_, w, b, _) in _SIZES.items())})"
    )


def read_sam2_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an official SAM 2 checkpoint (``{"model": state_dict}``, or a bare state dict);
    tensors only, never arbitrary pickled objects; WeightsError in one line for a corrupt or unsafe file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsNotFoundError(f"SAM 2 checkpoint {path} not found") from e
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path} is not a plain tensor checkpoint (it pickles other objects, which are never "
                           f"loaded) or is corrupt; fetch it again") from e
    except Exception as e:  # torch.load raises many types for a truncated or corrupt file
        raise WeightsError(f"cannot read SAM 2 checkpoint {path}: it is corrupt or truncated "
                           f"({type(e).__name__}); fetch it again") from e
    state = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a SAM 2 state dict of tensors")
    return state


def load_sam2_checkpoint(path: Path):
    """``(SAM2Base, Sam2Arch)`` from an official-format checkpoint file; every tensor from the file."""
    state = read_sam2_checkpoint(path)
    arch = detect_sam2_arch(state, source=path)
    model = build_sam2(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise WeightsError(f"{path} does not fit the official {arch.name}: {first}") from e
    return model.eval(), arch


def save_sam2(model, path: Path) -> Path:
    """Write ``model``'s weights as facebookresearch/sam2 releases them: ``{"model": state_dict}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path
