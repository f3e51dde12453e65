"""Time, in one place: wall-clock seconds per named stage, and UTC timestamps.

>>> timer = StageTimer()
>>> with timer.stage("sam", device):       # seconds added under "sam" (CUDA work waited for)
...     masks = generator.generate_masks(image)
>>> timer.seconds                           # {"sam": 0.412}
>>> utc_now()                               # "2026-12-07T01:02:03.456+00:00" (ISO 8601, milliseconds)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator


class StageTimer:
    """Wall-clock seconds per named stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, device: Any = None) -> Iterator[None]:
        """Time the block under ``name``; with a CUDA ``device`` (a ``torch.device``) wait for its queued work
        first, so the seconds are the GPU's too."""
        start = time.perf_counter()
        yield
        if device is not None and getattr(device, "type", None) == "cuda":
            import torch

            torch.cuda.synchronize(device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def utc_now(timespec: str = "milliseconds") -> str:
    """The current time as ISO 8601 UTC text (``timespec`` as :meth:`datetime.isoformat` takes it)."""
    return datetime.now(timezone.utc).isoformat(timespec=timespec)
