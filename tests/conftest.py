"""Suite-wide settings: one intra-op thread per test (deterministic reductions, and fast on the
2-core CI machine where a second thread only contends)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
