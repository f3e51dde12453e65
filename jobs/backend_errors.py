"""Which storage-backend errors may pass by waiting (retried by :class:`jobs.store.Store`) and which not.

Transient: ``OSError`` and timeouts, botocore's and aiohttp's errors (an endpoint down, a reset connection,
a slow answer). Permanent (raised at once): access denied, a missing bucket or folder, a bad request,
missing credentials or region.
"""

from __future__ import annotations

import asyncio
import errno
import functools

# OSError numbers that waiting cannot fix (bad request, name too long, read-only, root on two filesystems)
_PERMANENT_ERRNOS = {errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.EROFS, errno.EXDEV}
_PERMANENT_OS_ERRORS = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


@functools.cache
def backend_errors() -> tuple[type[BaseException], ...]:
    """Exception classes a storage backend may raise: OSError and timeouts, plus botocore's and aiohttp's
    when those packages are installed (the ``s3`` extra)."""
    errors: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpClientError

        errors.append(AiohttpClientError)
    except ImportError:
        pass
    return tuple(errors)


@functools.cache
def _permanent_botocore_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore import exceptions as b
    except ImportError:
        return ()
    return (b.NoCredentialsError, b.PartialCredentialsError, b.NoRegionError, b.ParamValidationError)


def is_permanent(error: BaseException) -> bool:
    """Whether waiting cannot fix ``error`` (denied, missing bucket or folder, bad request, no credentials)."""
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return True
    if isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS:
        return True
    return isinstance(error, _permanent_botocore_errors())


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text[:limit]}"
