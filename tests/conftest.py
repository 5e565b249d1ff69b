"""Test setup: Triton runs through its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, i.e. before eekernels is imported.
"""
import os

import pytest
import torch

import importlib.util

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:  # no triton: torch only
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests use tiny tensors: one thread avoids oversubscribing a 2-core CI machine (10x slower when busy).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.nodeid.split("/")[-1]:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
