"""Device and dtype selection, resolved once from user-facing strings."""

from __future__ import annotations

import torch

from slip.errors import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; ``"cuda:N"`` is checked to exist."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but no CUDA GPU is visible: use --device cpu "
                              f"(SLIP_DEVICE=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``fp32`` / ``bf16`` / ``fp16`` -> the torch dtype; ``fp16`` only on a GPU (CPUs compute bf16, not fp16)."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"dtype fp16 needs a GPU; on {device.type} use bf16 or fp32")
    return DTYPES[name]
