"""Progress bars (tqdm) that show only where someone watches: on a terminal, never in a log.

tqdm's own ``disable=None`` turns a bar off when its stream is not a terminal: in a redirected stderr (a batch
script, CI, a worker's log) a bar would write a run of carriage-returned updates instead.
"""

from __future__ import annotations

from typing import Any, Iterable


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any):
    """A ``tqdm`` over ``iterable`` (``options`` as tqdm's: ``total``, ``desc``, ``unit``...): off when
    ``enabled`` is False, or when its stream (stderr by default) is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, **options)
