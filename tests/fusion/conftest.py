"""Fixtures shared by the library tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Training tests use tiny tensors: on a shared 2-core machine a second OpenMP thread only spins
    waiting for a core (a 2 s training run took 27 s with 2 threads beside other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
