"""Every engine test module runs torch at one intra-op thread (the ``one_thread`` fixture of tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _engines_at_one_thread(one_thread):
    yield
