"""Queue commands for training jobs (``slip submit train ...``); filled in by the training work."""

from __future__ import annotations

import typer


def register(submit_app: typer.Typer, app: typer.Typer) -> None:
    """Add training commands to ``slip submit`` (``submit_app``) and to ``slip`` (``app``)."""
