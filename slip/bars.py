"""Progress bars (tqdm) that show only where someone watches: on a terminal, never in a log.

tqdm's own ``disable=None`` turns a bar off when its stream is not a terminal: in a redirected stderr (a batch
script, CI, a worker's log) a bar would write a run of carriage-returned updates instead.
"""

from __future__ import annotations

from typing import Any, Iterable, MutableMapping, TextIO

HF_BARS_OFF = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's switch, read by transformers when it is imported


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options: Any):
    """A ``tqdm`` over ``iterable`` (``options`` as tqdm's: ``total``, ``desc``, ``unit``...): off when
    ``enabled`` is False, or when its stream (stderr by default) is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, **options)


def library_bars_follow(stream: TextIO, environ: MutableMapping[str, str]) -> None:
    """The same rule for the bars libraries draw themselves (transformers' "Loading weights" per model, the hub's
    downloads): off when ``stream`` is not a terminal, through their documented switch in ``environ`` (a value the
    user set stays). Call it at a process's edge, before transformers is imported."""
    if not stream.isatty():
        environ.setdefault(HF_BARS_OFF, "1")
