"""The one exception tree of SLIP.

Every failure a user can cause ends in a subclass of :class:`SlipError` whose message says what went
wrong and what to do about it. Queue code classifies failures by these classes: subclasses of
:class:`InputError` are the caller's fault and are never retried; :class:`TransientError` may succeed
on a retry.
"""

from __future__ import annotations


class SlipError(Exception):
    """Base class for every error SLIP raises on purpose."""


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


# --- weights ------------------------------------------------------------------------------------------


class WeightsError(SlipError):
    """Model weights could not be found, downloaded or verified."""


class WeightsNotFoundError(WeightsError):
    """A checkpoint is not on disk; the message names the file, the cache dir and the fetch command."""


class ChecksumError(WeightsError):
    """A downloaded checkpoint does not match its published checksum."""


# --- runtime ------------------------------------------------------------------------------------------


class TransientError(SlipError):
    """A failure that may pass on retry (out of memory, a storage or broker blip)."""


class DeviceOutOfMemoryError(TransientError):
    """The accelerator ran out of memory; retry with a smaller points batch."""


class StoreError(SlipError):
    """The object store could not read or write an object."""


class ObjectNotFoundError(StoreError):
    """A key does not exist in the object store."""
