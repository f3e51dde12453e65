"""Assembles the library's typer app from the command modules."""

from __future__ import annotations

import typer

from slip.cli.segment import segment
from slip.cli.weights import weights_app

app = typer.Typer(
    name="slip",
    help="SLIP (SAM + CLIP): segment objects in images from a text prompt.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("segment")(segment)
app.add_typer(weights_app, name="weights", help="Fetch and list model weights.")
