"""Every engine test module runs torch at one intra-op thread: bit-for-bit comparisons pick the same kernels
whatever the machine, and the shared 2-core machine is not oversubscribed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
