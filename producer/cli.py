"""The ``slip`` console command: one root composing the library's commands and the queue's.

Neither side is changed: the library's commands come from :func:`slip.cli.app.add_library_commands`, the
queue's from the producer's command modules. No command module imports model code or reads the
environment at import, so ``slip --help`` starts in well under a second; each command reads its settings
where it runs. Every error a user can cause ends as one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys

import typer

from slip.bars import library_bars_follow
from slip.cli.app import add_library_commands

HELP = "SLIP (SAM + CLIP): segment objects in images from a text prompt, locally or on a queue of GPU workers."


def build_app() -> typer.Typer:
    """The ``slip`` root: library commands, then ``slip submit ...`` and the queue's job commands."""
    from producer import queue_cli, results_cli, train_sam_cli, training_cli

    root = typer.Typer(name="slip", help=HELP, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False)
    add_library_commands(root)
    submit = typer.Typer(help="Submit jobs to the queue (Redis + Celery workers).", no_args_is_help=True)
    submit.command("segment")(queue_cli.submit_segment)
    submit.command("train")(training_cli.submit_train)
    submit.command("evaluate")(training_cli.submit_evaluate)
    submit.command("train-sam")(train_sam_cli.submit_train_sam)
    root.add_typer(submit, name="submit")
    for name, command in (("status", queue_cli.status), ("jobs", queue_cli.jobs), ("wait", queue_cli.wait),
                          ("retry", queue_cli.retry),
                          ("results", results_cli.results), ("gallery", results_cli.gallery),
                          ("report", training_cli.report), ("demo", queue_cli.demo)):
        root.command(name)(command)
    __import__("producer.review_cli").review_cli.register(root)  # slip labels ..., slip review (issue 18)
    root.command("dashboard")(__import__("producer.dashboard").dashboard.dashboard_command)  # web page + /metrics
    return root


def main() -> None:
    """Console entry point ``slip``. In a log (stderr not a terminal) no library draws a progress bar."""
    library_bars_follow(sys.stderr, os.environ)
    build_app()()


if __name__ == "__main__":
    main()
