"""What an error means for one unit of a job, in one place, read from its class (never its name):

* permanent (``transient = False``: bad image, prompt, options, dataset, weights): failed for good at once;
* out of memory: tried again at once with half the ``points_per_batch``, down to 1, then failed for now;
* transient (the store or Redis past their own retries, a worker holding other models): failed for now;
  the chunk runs again while it has attempts (``SLIP_MAX_ATTEMPTS``), and ``slip retry`` can;
* anything else is a bug: failed for now with "internal error: ...", its traceback logged.

The task names the soft time limit (``TimeLimit``) and a chunk out of attempts (``Poison``).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from celery.exceptions import SoftTimeLimitExceeded

from jobs.errors import REDIS_ERRORS
from jobs.model import Item, ItemOutcome
from slip.errors import DeviceOutOfMemoryError, SlipError, is_transient

log = logging.getLogger("slip.worker")

OOM_ERRORS = (DeviceOutOfMemoryError, torch.OutOfMemoryError)
Attempt = Callable[[int], ItemOutcome]  # points_per_batch -> the unit's outcome


def run_unit(attempt: Attempt, item: Item, *, points_per_batch: int) -> ItemOutcome:
    """One unit under the policy (see the module docstring); SoftTimeLimitExceeded passes through."""
    ppb = points_per_batch
    while True:
        try:
            return attempt(ppb)
        except SoftTimeLimitExceeded:
            raise
        except OOM_ERRORS as e:
            if ppb == 1:
                return failed(item, e, permanent=False, prefix=f"out of memory even with points_per_batch={ppb}")
            ppb = max(1, ppb // 2)
            log.warning("%s: out of memory; retrying with points_per_batch=%d", item.name or item.index, ppb)
        except Exception as e:  # classified here; nothing is swallowed
            if is_transient(e) or isinstance(e, REDIS_ERRORS):
                return failed(item, e, permanent=False)
            ours = isinstance(e, SlipError)
            return failed(item, e, permanent=ours, prefix=None if ours else "internal error", log_traceback=not ours)


def failed(item: Item, error: BaseException | str, *, permanent: bool, prefix: str | None = None,
           name: str | None = None, log_traceback: bool = False) -> ItemOutcome:
    """A failed unit's outcome with a one-line reason; ``name`` labels a reason given as text."""
    text = error if isinstance(error, str) else (str(error).strip() or type(error).__name__)
    reason = text.splitlines()[0][:500]
    if prefix:
        reason = f"{prefix}: {'' if isinstance(error, str) else type(error).__name__ + ': '}{reason}"
    if log_traceback:
        log.error("%s: %s", item.name or item.index, reason, exc_info=error if isinstance(error, BaseException) else None)
    else:
        log.info("%s failed (%s): %s", item.name or item.index, "for good" if permanent else "for now", reason)
    error_name = name or (type(error).__name__ if isinstance(error, BaseException) else "Failed")
    return ItemOutcome(index=item.index, state="failed", permanent=permanent, reason=reason, error=error_name)
