"""The command line: `slip data synth`, `slip train-ranker`, `slip evaluate-local` (typer, in-process)."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from slip.cli.data import data_app
from slip.cli.train import evaluate_local, train_ranker

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("train-ranker")(train_ranker)
    app.command("evaluate-local")(evaluate_local)
    app.add_typer(data_app, name="data")
    return app


def test_synth_train_evaluate_report(tmp_path):
    app = _app()
    data = tmp_path / "synth"
    done = runner.invoke(app, ["data", "synth", "--classes", "5", "--per-class", "8", "--size", "40", "--out", str(data)])
    assert done.exit_code == 0, done.output
    assert (data / "classes.json").is_file() and len(list(data.rglob("*.mask.png"))) == 40
    out = tmp_path / "ranker"
    done = runner.invoke(app, ["train-ranker", str(data), "--out", str(out), "--image-backbone", "test_resnet",
                               "--text-encoder", "tiny-random", "--image-size", "32", "--proj-dim", "16", "--epochs", "1",
                               "--batch-size", "8", "--device", "cpu", "--save-initial", "--quiet"])
    assert done.exit_code == 0, done.output
    assert "best validation loss" in done.output and (out / "model.safetensors").is_file()
    report, summary = tmp_path / "report.html", tmp_path / "eval.json"
    done = runner.invoke(app, ["evaluate-local", str(data), "--ranker", str(out / "initial"), "--ranker", str(out),
                               "--composites", "3", "--tile-size", "32", "--json", str(summary),
                               "--report", str(report), "--device", "cpu", "--quiet"])
    assert done.exit_code == 0, done.output
    runs = json.loads(summary.read_text())
    assert [r["spec"] for r in runs] == [str(out / "initial"), str(out)]
    assert all(r["summary"]["plain"]["queries"] == 12 for r in runs)
    assert runs[1]["curve"]["best_epoch"] == 1
    assert "<h2>Gallery</h2>" in report.read_text()


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    app = _app()
    done = runner.invoke(app, ["data", "synth", "--classes", "99", "--out", str(tmp_path / "x")])
    assert done.exit_code == 2 and done.output.strip().startswith("error: --classes")
    done = runner.invoke(app, ["train-ranker", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"])
    assert done.exit_code == 2 and "does not exist" in done.output and "Traceback" not in done.output
    done = runner.invoke(app, ["evaluate-local", str(tmp_path / "missing"), "--ranker", "tiny-random", "--quiet"])
    assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1
