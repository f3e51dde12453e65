"""The queue's errors: the broker, the store, keys, a worker holding other models. They subclass
:mod:`slip.errors`'s classes, so the tree stays one and the ``transient`` flag keeps its meaning (a
transient error may pass on a later attempt; a permanent one never does).

:data:`REDIS_ERRORS` is the one tuple of Redis connection troubles every queue module catches.
"""

from __future__ import annotations

import redis

from slip.errors import InputError, TransientError

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class InvalidKeyError(InputError):
    """An object-store key is absolute, escapes its root (``..``) or has forbidden characters."""


class ObjectNotFoundError(InputError):
    """A key the request names does not exist in the object store (a wrong job id, a deleted input)."""


class StoreError(TransientError):
    """The object store could not be reached or did not answer in time (after the store's own retries)."""


class BrokerError(TransientError):
    """Redis (the broker or result backend) could not be reached."""


class ModelMismatchError(TransientError):
    """This worker holds other models than the job names; another worker can serve it."""
