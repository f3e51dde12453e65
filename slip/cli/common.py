"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import typer

from slip import names
from slip.errors import SlipError

EXIT_USER_ERROR = 2  # bad input, missing weights, invalid options
EXIT_PARTIAL = 1  # some items failed, the others were written


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn any :class:`SlipError` into a one-line message and exit code 2."""
    try:
        yield
    except SlipError as e:
        fail(str(e))


def cache_dir_from_env() -> Path | None:
    """``$SLIP_CACHE`` as a path, read at the CLI edge (through :class:`slip.settings.ModelSettings`)."""
    from slip.settings import ModelSettings

    return ModelSettings.from_env(os.environ, ("cache_dir",)).cache_dir


SYNTH_SPEC = names.SYNTH
SYNTH_WARNING = ("the bundled 'synth' models were trained only on a synthetic world of shapes and icons: on "
                 "photographs their masks and matches mean little; for real images use `slip weights fetch vit_b` "
                 "and `slip weights fetch openai/clip-vit-base-patch32`")


def synth_warning(*specs: str) -> None:
    """One line on stderr when any of the model ``specs`` is the bundled synthetic-world model."""
    if SYNTH_SPEC in specs:
        typer.echo(f"warning: {SYNTH_WARNING}", err=True)
