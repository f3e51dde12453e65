"""The one exception tree of SLIP.

Every failure a user can cause ends in a subclass of :class:`SlipError` whose message says what went
wrong and what to do about it. Each class has one meaning, carried by its ``transient`` flag:

* ``transient = False`` (permanent): the request, its input or its weights are wrong; retrying the same
  request cannot help, so queue code never retries it;
* ``transient = True``: the world was in the way (device memory, a service that did not answer); the same
  request may succeed later, so callers may try it again.

Callers read the flag from the class (:func:`is_transient`), never a class name. Errors of the queue (its
broker, store and workers) live with the queue, in ``jobs.errors``, as subclasses of these.
"""

from __future__ import annotations

from typing import ClassVar


class SlipError(Exception):
    """Base class for every error SLIP raises on purpose."""

    transient: ClassVar[bool] = False  # True: the same request may succeed on a retry


def is_transient(error: BaseException) -> bool:
    """Whether a retry may help: the class's flag for SLIP errors, False for anything else."""
    return isinstance(error, SlipError) and type(error).transient


# --- bad input: permanent, never retried ------------------------------------------------------------


class InputError(SlipError):
    """The request itself is wrong; retrying it cannot help."""


class ImageError(InputError):
    """An image could not be read, decoded or converted."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than the configured limit (decompression-bomb guard)."""


class PromptError(InputError):
    """A text prompt is empty, blank or otherwise unusable."""


class ConfigError(InputError):
    """A model spec, parameter or setting is invalid."""


class DatasetError(InputError):
    """A dataset directory or annotation file is missing or malformed."""


# --- weights: permanent -------------------------------------------------------------------------------


class WeightsError(SlipError):
    """Model weights could not be found, read or verified."""


class WeightsNotFoundError(WeightsError):
    """A checkpoint is not on disk; the message names the file, the cache dir and the fetch command."""


class ChecksumError(WeightsError):
    """A downloaded checkpoint does not match its published checksum."""


# --- the world in the way: transient, retried ----------------------------------------------------------


class TransientError(SlipError):
    """A failure that may pass on retry."""

    transient = True


class DeviceOutOfMemoryError(TransientError):
    """The accelerator (or the host) ran out of memory; retry with a smaller points batch."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when empty), at most ``limit`` characters: what
    one-line errors quote of a library's exception."""
    return (str(e).strip() or type(e).__name__).splitlines()[0][:limit]
