"""Test setup: Triton runs through its CPU interpreter when no GPU is present; the slow tier is marked here.

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

# The slow tier (`python -m pytest -q -m slow`; pyproject's addopts leave it out of the README's test command,
# .ci/run runs both): end-to-end runs that take tens of seconds to minutes each on 2 cores. Listed here, by
# file and test function (every parametrization), so that one place says what the tier holds; the _C build
# tests in test_build.py carry the marker themselves. A name here that its file no longer has is an error.
SLOW = {
    # python/train_glyphs.py, benchmarks/fidelity.py and the training-free benchmarks, each run end to end
    "tests/test_fidelity_quick.py": {
        "test_train_glyphs_quick_end_to_end", "test_fidelity_quick_on_the_shipped_models",
        "test_training_free_quick_on_the_shipped_base", "test_training_free_unet_quick_against_deepcache",
    },
    # real torchrun / two spawned gloo processes
    "tests/jobs/test_distributed.py": {
        "test_two_ranks_shard_gather_and_resume", "test_torchrun_sample_cli",
        "test_torchrun_bad_option_one_line_from_rank_0", "test_two_ranks_both_stop_when_rank_0_finds_the_lock",
    },
    # every python/examples/ script in its own process (test_every_example_is_tested stays in the default tier)
    "tests/test_examples.py": {"test_example_runs"},
    # benchmarks/gpu_suite.py --dry-run in its own process
    "tests/test_suite_dry_run.py": {"test_dry_run_end_to_end"},
    # torchrun: two gloo processes running diffusers' context parallelism on a tiny Wan
    "tests/families/test_wan.py": {"test_context_parallel_two_processes"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    stale = set()
    for item in items:
        if "gpu" in item.nodeid.split("/")[-1]:
            item.add_marker(pytest.mark.gpu)
        names = SLOW.get(item.nodeid.split("::")[0], ())
        if getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)
        module = getattr(item, "module", None)
        stale |= {f"{item.nodeid.split('::')[0]}::{n}" for n in names if module and not hasattr(module, n)}
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {sorted(stale)}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
