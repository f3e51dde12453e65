"""Puts ``tests/`` on ``sys.path`` so that every test folder can import the shared helpers there
(``from s3_server import S3Server, count_s3_requests``)."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
