"""The command line: `slip data synth`, `slip train-ranker`, `slip evaluate-local` (typer, in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
                               "--batch-size", "8", "--device", "cpu", "--save-initial", "--quiet",
                               "--random-image", "--random-text"])
    assert done.exit_code == 0, done.output
    assert "best validation loss" in done.output and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["init"] == {"image": "random", "text": "random (tiny-random)"}
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


def test_training_in_a_log_writes_no_progress_bars(tmp_path, synth_dir):
    """The real entry point with stderr a pipe (a batch script's log): the epochs' bars stay off, the result is
    printed as ever."""
    done = subprocess.run([sys.executable, "-m", "producer", "train-ranker", str(synth_dir), "--out", str(tmp_path / "r"),
                           "--image-backbone", "test_resnet", "--text-encoder", "tiny-random", "--image-size", "32",
                           "--proj-dim", "16", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
                           "--random-image", "--random-text"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "best validation loss" in done.stdout
    assert "batch" not in done.stderr and "\r" not in done.stderr and "epoch 1/2" not in done.stderr, done.stderr


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    app = _app()
    done = runner.invoke(app, ["data", "synth", "--classes", "99", "--out", str(tmp_path / "x")])
    assert done.exit_code == 2 and done.output.strip().startswith("error: --classes")
    done = runner.invoke(app, ["train-ranker", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"])
    assert done.exit_code == 2 and "does not exist" in done.output and "Traceback" not in done.output
    done = runner.invoke(app, ["evaluate-local", str(tmp_path / "missing"), "--ranker", "tiny-random", "--quiet"])
    assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1


def _offline_env(tmp_path) -> dict:
    """SLIP_CACHE and the Hugging Face caches pointed at empty directories, offline."""
    return {**os.environ, "SLIP_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "1"}


def test_missing_pretrained_backbone_fails_the_command_in_one_line(tmp_path, synth_dir):
    """The real entry point: exit code 2, one `error:` line on stderr naming the fetch command, no traceback."""
    done = subprocess.run([sys.executable, "-m", "producer", "train-ranker", str(synth_dir),
                           "--out", str(tmp_path / "o"), "--image-backbone", "test_resnet", "--text-encoder", "minilm",
                           "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet"],
                          env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "slip weights fetch timm/test_resnet.r160_in1k" in lines[0] and str(tmp_path / "cache") in lines[0]
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_missing_pretrained_text_encoder_fails_unless_random_text(tmp_path, synth_dir, monkeypatch):
    for key, value in _offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    args = ["train-ranker", str(synth_dir), "--out", str(tmp_path / "o"), "--image-backbone", "test_resnet",
            "--random-image", "--text-encoder", "tiny-random", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--quiet"]
    done = runner.invoke(_app(), args)
    assert done.exit_code == 2 and "--random-text" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = runner.invoke(_app(), [*args[:7], "--text-encoder", "distilbert-base-uncased", *args[9:]])
    assert done.exit_code == 2 and "slip weights fetch distilbert-base-uncased" in done.stderr
    assert done.exception is None or isinstance(done.exception, SystemExit)
