"""Puts ``tests/`` on ``sys.path`` so that every test folder can import the shared helpers there
(``from s3_server import S3Server, count_s3_requests``); fixtures every folder may use (``one_thread``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="module")
def one_thread():
    """torch at one intra-op thread for a test module (restored after): bit-for-bit comparisons pick the same
    kernels whatever the machine, and the shared 2-core machine is not oversubscribed. A module asks for it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (or a folder's conftest, autouse)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
