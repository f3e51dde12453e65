"""The failure policy of segment tasks, in one place.

What an error means is read from its class (:func:`slip.errors.is_transient`), never from a name:

* permanent (``transient = False``: bad image, bad prompt, bad options, missing input): the image fails
  for good at once, with its reason; the other images of the chunk go on;
* out of memory (``DeviceOutOfMemoryError``, or torch's own ``OutOfMemoryError`` from the device or the
  host): retried at once with half the ``points_per_batch`` (the generator's memory is proportional to it);
* transient (a store or Redis blip after their own retries, a worker holding other models): retried with
  exponential back-off (``SLIP_RETRY_BACKOFF`` doubling, ``SLIP_MAX_RETRIES`` times), then the image
  fails *for now*: the feeder sends its chunk again later (``SLIP_MAX_RESENDS``), ``slip retry`` can too;
* anything else is a bug: the image fails for now with "internal error: ...", and the traceback is logged;
* poison: a chunk started more than ``SLIP_MAX_DELIVERIES`` times without finishing (it killed its worker
  each time) fails for good without running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import redis
import torch
from celery.exceptions import SoftTimeLimitExceeded

from slip.errors import DeviceOutOfMemoryError, SlipError, is_transient
from worker.jobs import Item, ItemOutcome
from worker.settings import Settings

log = logging.getLogger("slip.worker")

OOM_ERRORS = (DeviceOutOfMemoryError, torch.OutOfMemoryError)
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
Attempt = Callable[[int], ItemOutcome]  # points_per_batch -> the item's outcome


@dataclass(frozen=True)
class FailurePolicy:
    """Retries and back-off for the images of a chunk."""

    max_retries: int  # retries of one image's transient failure before it fails for now
    backoff_s: float  # first back-off; doubles on each retry
    max_deliveries: int  # a chunk started more often than this without finishing is poison
    max_resends: int  # times the feeder sends a chunk with failures-for-now again

    @staticmethod
    def of(settings: Settings) -> "FailurePolicy":
        return FailurePolicy(max_retries=settings.max_retries, backoff_s=settings.retry_backoff_s,
                             max_deliveries=settings.max_deliveries, max_resends=settings.max_resends)

    def run_item(self, attempt: Attempt, item: Item, *, points_per_batch: int, sleep=time.sleep) -> ItemOutcome:
        """One image under the policy (see the module docstring); SoftTimeLimitExceeded passes through."""
        ppb, retries = points_per_batch, 0
        while True:
            try:
                return attempt(ppb)
            except SoftTimeLimitExceeded:
                raise
            except OOM_ERRORS as e:
                if ppb == 1 or retries >= self.max_retries:
                    return failed(item, e, permanent=False, prefix=f"out of memory even with points_per_batch={ppb}")
                ppb = max(1, ppb // 2)
                log.warning("%s: out of memory; retrying with points_per_batch=%d", _name(item), ppb)
            except Exception as e:  # classified below; nothing is swallowed
                if not self._transient(e):
                    return failed(item, e, permanent=isinstance(e, SlipError), prefix=None if isinstance(e, SlipError)
                                  else "internal error", log_traceback=not isinstance(e, SlipError))
                if retries >= self.max_retries:
                    return failed(item, e, permanent=False, prefix=f"gave up after {retries} retries")
                delay = self.backoff_s * 2**retries
                log.warning("%s: %s; retry %d/%d in %.1f s", _name(item), e, retries + 1, self.max_retries, delay)
                sleep(delay)
            retries += 1

    def poisoned(self, deliveries: int) -> str | None:
        """The reason a chunk started ``deliveries`` times is poison, or None."""
        if deliveries <= self.max_deliveries:
            return None
        return (f"poison: started {deliveries - 1} times without finishing (it killed its worker each time; "
                f"SLIP_MAX_DELIVERIES={self.max_deliveries})")

    def retry_delay(self, resends: int) -> float | None:
        """Seconds until a chunk with failures-for-now is sent again, or None when it has had its re-sends."""
        return None if resends >= self.max_resends else 10.0 * 2**resends

    @staticmethod
    def _transient(e: Exception) -> bool:
        return is_transient(e) or isinstance(e, REDIS_ERRORS)


def failed(item: Item, error: BaseException | str, *, permanent: bool, prefix: str | None = None,
           log_traceback: bool = False, result_key: str = "") -> ItemOutcome:
    """A failed item's outcome with a one-line reason."""
    text = error if isinstance(error, str) else (str(error).strip() or type(error).__name__)
    reason = text.splitlines()[0][:500]
    if prefix:
        kind = "" if isinstance(error, str) else f"{type(error).__name__}: "
        reason = f"{prefix}: {kind}{reason}"
    if log_traceback:
        log.error("%s: %s", _name(item), reason, exc_info=error if isinstance(error, BaseException) else None)
    else:
        log.info("%s failed (%s): %s", _name(item), "for good" if permanent else "for now", reason)
    error_name = "Poison" if isinstance(error, str) else type(error).__name__
    return ItemOutcome(index=item.index, state="failed", permanent=permanent, reason=reason, error=error_name,
                       result_key=result_key)


def _name(item: Item) -> str:
    return item.name or item.image_key
