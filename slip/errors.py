"""The one exception tree of SLIP.

Every failure a user can cause ends in a subclass of :class:`SlipError` whose message says what went
wrong and what to do about it. Each class has one meaning, carried by its ``transient`` flag:

* ``transient = False`` (permanent): the request, its input or its weights are wrong; retrying the same
  request cannot help, so queue code never retries it;
* ``transient = True``: the world was in the way (a store or broker blip, device memory, a worker holding
  other models); the same request may succeed later, so queue code retries it with back-off.

Queue code reads the flag from the class (:func:`is_transient`), never a class name.
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


class InvalidKeyError(InputError):
    """An object-store key is absolute, escapes its root (``..``) or has forbidden characters."""


class ConfigError(InputError):
    """A model spec, parameter or setting is invalid."""


class DatasetError(InputError):
    """A dataset directory or annotation file is missing or malformed."""


class ObjectNotFoundError(InputError):
    """A key the request names does not exist in the object store (a wrong job id, a deleted input)."""


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


class StoreError(TransientError):
    """The object store could not be reached or did not answer in time (after the store's own retries)."""


class BrokerError(TransientError):
    """Redis (the broker or result backend) could not be reached."""


class ModelMismatchError(TransientError):
    """This worker holds other models than the request names; another worker can serve it."""
