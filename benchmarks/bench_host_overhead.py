"""Host overhead per call of the five public ops: validation, backend selection and the op path check.

At DiT-XL/2 batch 2 the H100 waits on the host (about 9.1 ms of CPU per forward, RESULTS.md), so what each
public call adds on top of its math matters. Each case calls the public op on tiny CPU tensors under
``backend("torch")`` and, in the same process with the same timer, the op's torch reference directly (the
same math, nothing else). ``extra_info``: ``us`` and ``reference_us`` (medians per call), ``overhead_us``
(their difference: what validation and dispatch cost) and ``ratio`` (public / reference, 1.0 = free).

Run: ``python -m pytest benchmarks/bench_host_overhead.py --benchmark-only``. CPU tensors on any machine:
this measures Python on the host, not kernels.
"""
import statistics
import sys
import time

import pytest
import torch

import eekernels
import eekernels.ops


def _module(op):
    return sys.modules[f"eekernels.ops.{op}"]  # eekernels.ops.<op> is the public function, not the module


# op -> (public call, what backend "torch" runs, called directly): tiny shapes, every optional tensor given
# (the most checks).
def _cases():
    x, y = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    gate, shift, scale = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    w_lin, b_lin = torch.randn(32, 64), torch.randn(32)
    xg, wg, bg, sg, hg = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8), torch.randn(2, 8), torch.randn(2, 8)
    ops = eekernels.ops
    return {
        "layer_norm": (lambda: ops.layer_norm(x, weight, bias),
                       lambda: _module("layer_norm").reference(x, weight, bias)),
        "modulated_layer_norm": (lambda: ops.modulated_layer_norm(x, shift, scale),
                                 lambda: _module("modulated_layer_norm").reference(x, shift, scale)),
        "gated_residual_norm": (lambda: ops.gated_residual_norm(x, y, gate, shift, scale),
                                lambda: _module("gated_residual_norm")._torch(x, y, gate, shift, scale, None, None,
                                                                               1e-6)),
        "linear_act": (lambda: ops.linear_act(x, w_lin, b_lin, "gelu_tanh"),
                       lambda: _module("linear_act").reference(x, w_lin, b_lin, "gelu_tanh")),
        "group_norm_act": (lambda: ops.group_norm_act(xg, 4, wg, bg, sg, hg),
                           lambda: _module("group_norm_act")._torch(xg, 4, wg, bg, sg, hg, "silu", 1e-5)),
    }


def _median_us(*fns, blocks=60, per_block=50):
    """Median per-call time in us of each function: blocks of calls, interleaved so that load from other
    processes hits each alike; one block is timed as a whole, so the timer's cost is spread over its calls."""
    for fn in fns:
        for _ in range(per_block):
            fn()
    times = [[] for _ in fns]
    for _ in range(blocks):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter_ns()
            for _ in range(per_block):
                fn()
            ts.append((time.perf_counter_ns() - t0) / per_block / 1e3)
    return [statistics.median(ts) for ts in times]


@pytest.mark.parametrize("op", ["layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act",
                                "group_norm_act"])
def test_host_overhead(benchmark, op):
    public, reference = _cases()[op]
    torch.testing.assert_close(public(), reference())  # same math, so the difference is the host overhead
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host path is single-threaded; a second OpenMP thread only adds noise
    try:
        with eekernels.backend("torch"):  # the context is entered once, outside the timings
            benchmark(public)
            ours, ref = _median_us(public, reference)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(device="cpu", us=round(ours, 2), reference_us=round(ref, 2),
                                overhead_us=round(ours - ref, 2), ratio=round(ours / ref, 3))
