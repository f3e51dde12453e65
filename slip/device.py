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


def default_threads(device: str, cores: int, concurrency: int) -> int:
    """torch intra-op threads for one worker process when SLIP_THREADS is not set.

    On CPU: one. A pool of ``concurrency`` processes already keeps the cores busy, and intra-op threads only pay
    off on an idle machine: with every core contended (other processes, other workers), each parallel operation
    waits at a barrier for a descheduled thread: on the loaded 2-core development machine with a CPU hog per
    core, SAM's automatic mask generation took 5x longer at 2 threads than at 1, the official generator as much
    as ours (bench/README.md, "A busy machine"; bench/results/segment-cpu-*-hog2-*.json). On a GPU, where
    the CPU only prepares and post-processes, the machine's cores shared among the pool: ``cores // concurrency``.
    """
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return 1
    return max(1, cores // max(1, concurrency))
