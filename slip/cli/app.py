"""The library's commands, put on a typer root by :func:`add_library_commands`."""

from __future__ import annotations

import typer


def add_library_commands(root: typer.Typer) -> None:
    """Register the library's commands (segment, weights, data, training, evaluation) on ``root``."""
    from slip.cli.calibrate import calibrate
    from slip.cli.data import data_app
    from slip.cli.segment import segment
    from slip.cli.train import evaluate_local, train_judge, train_ranker
    from slip.cli.train_sam import train_sam
    from slip.cli.weights import weights_app

    root.command("segment")(segment)
    root.add_typer(weights_app, name="weights", help="Fetch and list model weights.")
    root.add_typer(data_app, name="data")
    root.command("train-ranker")(train_ranker)
    root.command("evaluate-local")(evaluate_local)
    root.command("train-judge")(train_judge)
    root.command("train-sam")(train_sam)
    root.command("calibrate")(calibrate)
    root.command("compare")(__import__("slip.cli.compare", fromlist=["compare"]).compare)


def library_app() -> typer.Typer:
    """A root with the library's commands only (``python -m slip.cli``)."""
    root = typer.Typer(name="slip", help="SLIP (SAM + CLIP): segment objects in images from a text prompt.",
                       no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    add_library_commands(root)
    return root
