"""Bad inputs fail alone, for good, with their reason in the completion records; every error a user can
cause at `slip submit segment` is one line on stderr, exit 2, no traceback, and nothing is submitted."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from queue_helpers import TINY_CLI_ARGS, invoke_cli, job_id_from, make_images, outcomes

pytestmark = pytest.mark.integration


def png_bytes(size: tuple[int, int], colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def one_line_error(proc) -> str:
    """The single ``error: ...`` line of a command that exited 2 without a traceback."""
    assert proc.exit_code == 2 and isinstance(proc.exception, SystemExit), (proc.exception, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_bad_inputs_fail_for_good_with_their_reason_and_good_ones_complete(worker, client, tmp_path):
    folder = tmp_path / "mixed"
    good = make_images(folder, 4, seed=3, prefix="good")
    data = png_bytes((60, 50), (10, 200, 10))
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "notimage.png").write_text("this is a text file renamed to .png\n")
    (folder / "huge.png").write_bytes(png_bytes((300, 200)))  # 60 000 px, over --max-pixels 20000
    proc = invoke_cli(["submit", "segment", str(folder), "--prompt", "a red box", "--wait", "--batch-size", "2",
                       "--max-pixels", "20000", *TINY_CLI_ARGS], worker["env"])
    assert proc.exit_code == 1, proc.stdout + proc.stderr  # partial: some images failed
    assert isinstance(proc.exception, SystemExit) and "Traceback" not in proc.stdout + proc.stderr
    job = job_id_from(proc.stdout)
    status = client.status(job)
    assert status.counts == {"done": 4, "failed": 3, "running": 0, "queued": 0, "waiting": 0, "lost": 0}
    assert status.retryable == 0, "bad input is failed for good: `slip retry` has nothing to re-run"
    names = {i.index: i.name for i in client.export_items(job)}
    by_name = {names[i]: o for i, o in outcomes(client.store, job).items()}
    assert {p.name for p in good} == {n for n, o in by_name.items() if o.state == "done"}
    expected = {
        "corrupt.png": ("ImageError", "corrupt or truncated"),
        "notimage.png": ("ImageError", "not an image"),
        "huge.png": ("ImageTooLargeError", "over the limit"),
    }
    failures = {name: reason for _, name, reason in client.failed_units(status)}
    log = worker["log"].read_text()
    for name, (error, words) in expected.items():
        outcome = by_name[name]
        assert outcome.state == "failed" and outcome.permanent and outcome.error == error, outcome
        assert words in outcome.reason and failures[name] == outcome.reason
        assert f"failed: {name}: {outcome.reason}" in proc.stdout
        assert not re.search(rf"{re.escape(name)}: .*; retry \d", log), "bad input is never retried"
    assert not [line for line in log.splitlines() if f"job {job} chunk" in line and "sending again" in line], \
        "nor sent again"
    assert not list(Path(worker["env"]["SLIP_STORE"]).glob("results/*/*/error.json")), "failures live in the records"


def test_empty_prompt_is_rejected_at_submit_and_nothing_is_uploaded(worker, client, tmp_path):
    make_images(tmp_path / "imgs", 1, seed=5)
    before = client.store.list("jobs"), client.store.list("inputs")
    line = one_line_error(invoke_cli(["submit", "segment", str(tmp_path / "imgs"), "--prompt", "   "], worker["env"]))
    assert "empty" in line
    assert (client.store.list("jobs"), client.store.list("inputs")) == before, "nothing was submitted"


SUBMIT_ERRORS = {
    "33 prompts": ([arg for i in range(33) for arg in ("-p", f"thing {i}")], "33 prompts given; a request takes at most 32"),
    "an empty prompt": (["-p", "a cat", "-p", ""], "prompt 1 is empty or blank"),
    "a prompt too long": (["-p", "x" * 301], "prompt 0 has 301 characters (limit 300)"),
    "a bad filter chain": (["-p", "x", "--filters", "containment:keep=sideways"], "keep must be 'parent' or 'child'"),
    "an unknown filter": (["-p", "x", "--filters", "containment,sideways"], "unknown filter 'sideways'"),
    "a threshold out of range": (["-p", "x", "--threshold", "1.5"], "threshold 1.5 is not a cosine similarity"),
    "a threshold that is no number": (["-p", "x", "--threshold", "nan"], "is not a cosine similarity"),
    "3 thresholds for 2 prompts": (["-p", "a red box", "-p", "a blue disc", "--threshold", "0.1", "--threshold", "0.2",
                                    "--threshold", "0.3"], "3 thresholds for 2 prompts: give one value, or one per prompt"),
    "a bad --instances": (["-p", "x", "--instances", "some"], "instances"),
    "a bad crop background": (["-p", "x", "--crop-background", "pink"], "crop_background"),
    "a point grid of 0": (["-p", "x", "--points-per-side", "0"], "points_per_side"),
}


@pytest.mark.parametrize("case", sorted(SUBMIT_ERRORS))
def test_submit_validation_errors_are_one_line_and_submit_nothing(worker, client, tmp_path, case):
    args, words = SUBMIT_ERRORS[case]
    make_images(tmp_path / "imgs", 1, seed=6)
    before = client.store.list("jobs"), client.store.list("inputs"), client.board.active()
    line = one_line_error(invoke_cli(["submit", "segment", str(tmp_path / "imgs"), *args], worker["env"]))
    assert words in line, line
    assert (client.store.list("jobs"), client.store.list("inputs"), client.board.active()) == before


@pytest.mark.parametrize(
    "args, env_changes, message",
    [
        (["status", "20990101-000000-abcdef"], {}, "no job '20990101-000000-abcdef'"),
        (["wait", "20990101-000000-abcdef"], {}, "no job '20990101-000000-abcdef'"),
        (["retry", "20990101-000000-abcdef"], {}, "no job '20990101-000000-abcdef'"),
        (["status", "../etc"], {}, "is not a job id"),
        (["submit", "segment", "/nonexistent/x.png", "-p", "cat"], {}, "no such file or directory: /nonexistent/x.png"),
        (["submit", "segment", "/nonexistent/x.png", "-p", "cat"], {"SLIP_BROKER_URL": "redis://127.0.0.1:1/0"},
         "cannot reach Redis at redis://127.0.0.1:1/0"),
        (["status", "x"], {"SLIP_MAX_ATTEMPTS": "many"}, "SLIP_MAX_ATTEMPTS='many' is not a valid int"),
    ],
    ids=["status-of-no-job", "wait-for-no-job", "retry-of-no-job", "status-of-a-bad-id", "submit-a-missing-file",
         "submit-without-redis", "a-bad-setting"],
)
def test_user_errors_are_one_line(worker, args, env_changes, message):
    """(`slip status` of an existing job with Redis away answers only after the client's ~40 s of retries,
    which ride out a Redis restart: not run here.)"""
    env = dict(worker["env"], **env_changes)
    assert message in one_line_error(invoke_cli(args, env))
