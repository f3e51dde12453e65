"""Helpers of the tests that start web servers and look at pages: wait for a server's first answer, and run
headless Chromium (installed by ``scripts/setup.sh``; a test without it is skipped, never passed)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests


def wait_http(url: str, process: subprocess.Popen, log: Path, *, what: str = "the server",
              timeout_s: float = 60.0) -> None:
    """Return once ``url`` answers (any status); RuntimeError with the tail of ``log`` when ``process`` exits or
    ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.2)


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with ``args`` (``--dump-dom URL``, ``--screenshot=FILE``, ...); skips the test when it
    is not installed."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
