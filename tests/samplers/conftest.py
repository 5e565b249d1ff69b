"""Sampler tests run tiny models: one intra-op thread. On a loaded 2-core machine every op on a tiny tensor
otherwise pays an OpenMP wake-up (measured: torch.tanh on 2400 elements, 0.004 ms on 1 thread, 17 ms on 2)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
