"""How a worker starts and says what is wrong: signal handlers connected once, a worker that cannot start says
one line (naming SLIP_DEVICE) and exits 1, SLIP_LOG_LEVEL applies to the README's worker command, and the
Redis hint names the URL's own host and port. Real ``celery -A worker worker`` and ``slip`` processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from queue_helpers import REPO, flush, node_name, queue_env, run_cli, start_worker, stop_worker
import redis_dbs

pytestmark = pytest.mark.integration
DB = redis_dbs.WORKER_START


def test_a_second_worker_app_connects_no_handler_twice():
    from celery import signals

    from jobs.settings import Settings
    from worker.app import create_app

    watched = (signals.worker_init, signals.worker_ready, signals.worker_shutting_down, signals.worker_shutdown,
               signals.worker_process_init, signals.worker_process_shutdown)
    create_app(Settings(), worker=True)
    before = [len(s.receivers) for s in watched]
    create_app(Settings(), worker=True)
    assert [len(s.receivers) for s in watched] == before, "a second worker app registered its handlers again"
    ours = [key for s in watched for key, *_ in s.receivers if str(key[0]).startswith("slip.worker.")]
    assert len(ours) == len(watched), ours


def test_a_worker_that_cannot_start_says_one_line_naming_slip_device_and_exits_1(tmp_path):
    env = queue_env(tmp_path / "store", db=DB, SLIP_DEVICE="cuda:99")  # no machine has a 100th GPU
    log = tmp_path / "worker.log"
    process = start_worker(env, ("gpu", "cpu"), "nogpu", log_path=log)
    try:
        code = process.wait(timeout=180)
    finally:
        stop_worker(process, timeout_s=5)
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 1, text[-3000:]
    assert len(errors) == 1 and "SLIP_DEVICE=cuda:99" in errors[0] and "--device" not in errors[0], text[-3000:]
    assert "Traceback" not in text and "CRITICAL" not in text and "did_start_ok" not in text, text[-3000:]


def test_slip_log_level_applies_to_the_readme_worker_command(tmp_path):
    """`celery -A worker worker -Q gpu,cpu` without --loglevel (the README's command): Celery's own default is
    WARNING; SLIP_LOG_LEVEL=INFO must still show the worker's start-up lines."""
    flush(DB)
    env = queue_env(tmp_path / "store", db=DB, SLIP_LOG_LEVEL="INFO")
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", "gpu,cpu", "-n", "quiet@%h",
               "--without-mingle", "--without-gossip"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "SLIP resources ready" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        assert "reaper" in text and f"({node_name('quiet')}): a beat every" in text, text[-3000:]
    finally:
        stop_worker(process)
        flush(DB)


def test_the_redis_hint_names_the_urls_host_and_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    env = queue_env(tmp_path / "store", db=0, port=port)
    done = run_cli(["status", "20260101-000000-abcdef"], env, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert f"redis://127.0.0.1:{port}/0" in lines[0] and f"redis-server --port {port}" in lines[0], lines[0]
