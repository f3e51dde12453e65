"""Assembles the library's typer app from the command modules."""

from __future__ import annotations

import typer

from slip.cli.data import data_app
from slip.cli.segment import segment
from slip.cli.train import evaluate_local, train_judge, train_ranker
from slip.cli.train_sam import train_sam
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
app.add_typer(data_app, name="data")
app.command("train-ranker")(train_ranker)
app.command("evaluate-local")(evaluate_local)
app.command("train-judge")(train_judge)
app.command("train-sam")(train_sam)
