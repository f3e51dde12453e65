"""Bad inputs fail alone, with their reason recorded; user errors at the CLI are one line, no traceback."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from worker.ledger import task_records

from queue_helpers import TINY_CLI_ARGS, invoke_cli, job_id_from, make_images, run_cli

pytestmark = pytest.mark.integration


def png_bytes(size: tuple[int, int], colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_fail_with_their_reason_and_good_ones_complete(worker, client, tmp_path):
    folder = tmp_path / "mixed"
    good = make_images(folder, 4, seed=3)
    data = png_bytes((60, 50), (10, 200, 10))
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "notimage.png").write_text("this is a text file renamed to .png\n")
    (folder / "huge.png").write_bytes(png_bytes((300, 200)))  # 60 000 px, over --max-pixels 20000
    proc = run_cli(["submit", "segment", str(folder), "--prompt", "a red box", "--wait", "--batch-size", "1",
                    "--max-pixels", "20000", *TINY_CLI_ARGS], worker["env"])
    assert proc.returncode == 1, proc.stdout + proc.stderr  # partial: some images failed
    assert "Traceback" not in proc.stderr
    job = job_id_from(proc.stdout)
    status = client.status(job)
    assert status.counts == {"done": 4, "failed": 3, "pending": 0, "lost": 0}
    by_name = {Path(s.name).name: s for s in status.items}
    assert {p.name for p in good} == {n for n, s in by_name.items() if s.state == "done"}
    expected = {
        "corrupt.png": ("ImageError", "corrupt or truncated"),
        "notimage.png": ("ImageError", "not an image"),
        "huge.png": ("ImageTooLargeError", "over the limit"),
    }
    tasks = {i: r.task_id for r in task_records(client.store, job) for i in r.items}
    log = worker["log"].read_text()
    for name, (error, words) in expected.items():
        state = by_name[name]
        assert state.state == "failed" and state.permanent and state.error == error and words in state.reason
        doc = json.loads((Path(worker["env"]["SLIP_STORE"]) / state.result_key / "error.json").read_text())
        assert doc["error"] == error and words in doc["reason"] and doc["permanent"] is True
        assert f"failed: {state.name}: " in proc.stdout
        result = client.app.AsyncResult(tasks[state.index])
        assert result.state == "FAILURE" and words in str(result.result), "the reason is in the task state too"
        assert f"slip.segment[{tasks[state.index]}] retry" not in log.lower(), "bad input is never retried"


def test_empty_prompt_is_rejected_at_submit(worker, client, tmp_path):
    make_images(tmp_path / "imgs", 1, seed=5)
    jobs_before = client.store.list("jobs")
    proc = invoke_cli(["submit", "segment", str(tmp_path / "imgs"), "--prompt", "   "], worker["env"])
    assert proc.exit_code == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty" in lines[0], proc.stderr
    assert client.store.list("jobs") == jobs_before, "nothing was submitted"


@pytest.mark.parametrize(
    "args, env_changes, message",
    [
        (["status", "20990101-000000-abcdef"], {}, "no job '20990101-000000-abcdef'"),
        (["submit", "segment", "/nonexistent/x.png", "-p", "cat"], {}, "no such file or directory: /nonexistent/x.png"),
        (["status", "x"], {"SLIP_BROKER_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis at redis://127.0.0.1:1/0"),
        (["status", "x"], {"SLIP_MAX_DELIVERIES": "many"}, "SLIP_MAX_DELIVERIES='many' is not a valid int"),
    ],
)
def test_user_errors_are_one_line(worker, args, env_changes, message):
    env = dict(worker["env"], **env_changes)
    proc = invoke_cli(args, env)
    assert proc.exit_code == 2 and isinstance(proc.exception, SystemExit), proc.exception
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
