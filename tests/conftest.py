"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture
def torch_threads_restored():
    """torch's thread count is put back after the test, which may change it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
