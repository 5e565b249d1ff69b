"""Host overhead per call of the five public ops: validation, backend selection and the op path check.

At DiT-XL/2 batch 2 the H100 waits on the host (about 9.1 ms of CPU per forward, RESULTS.md), so what each
public call adds on top of its math matters. Each case calls the public op on tiny CPU tensors under
``backend("torch")`` and, in the same process with the same timer, the op's torch reference directly (the
same math, nothing else), and the registered ``torch.ops.eekernels.<op>`` entry, which validates too (in the
op's impl) but pays the dispatcher. ``extra_info``: ``us``, ``reference_us`` and ``torch_ops_us`` (medians per
call), ``overhead_us`` (public - reference: what validation and dispatch cost), ``ratio`` (public / reference,
1.0 = free) and ``torch_ops_ratio`` (torch.ops / public).

Run: ``python -m pytest benchmarks/bench_host_overhead.py --benchmark-only``, or
``python benchmarks/bench_host_overhead.py`` for the same medians as a markdown table. CPU tensors on any
machine: this measures Python on the host, not kernels.
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


# op -> (public call, what backend "torch" runs, called directly, the torch.ops call): tiny shapes, every
# optional tensor given (the most checks).
def _cases():
    x, y = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
    gate, shift, scale = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    w_lin, b_lin = torch.randn(32, 64), torch.randn(32)
    xg, wg, bg, sg, hg = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8), torch.randn(2, 8), torch.randn(2, 8)
    ops, tops = eekernels.ops, torch.ops.eekernels
    return {
        "layer_norm": (lambda: ops.layer_norm(x, weight, bias),
                       lambda: _module("layer_norm").reference(x, weight, bias),
                       lambda: tops.layer_norm(x, weight, bias, 1e-6)),
        "modulated_layer_norm": (lambda: ops.modulated_layer_norm(x, shift, scale),
                                 lambda: _module("modulated_layer_norm").reference(x, shift, scale),
                                 lambda: tops.modulated_layer_norm(x, shift, scale, 1e-6)),
        "gated_residual_norm": (lambda: ops.gated_residual_norm(x, y, gate, shift, scale),
                                lambda: _module("gated_residual_norm")._torch(x, y, gate, shift, scale, None, None,
                                                                               1e-6),
                                lambda: tops.gated_residual_norm(x, y, gate, shift, scale, None, None, 1e-6)),
        "linear_act": (lambda: ops.linear_act(x, w_lin, b_lin, "gelu_tanh"),
                       lambda: _module("linear_act").reference(x, w_lin, b_lin, "gelu_tanh"),
                       lambda: tops.linear_act(x, w_lin, b_lin, "gelu_tanh")),
        "group_norm_act": (lambda: ops.group_norm_act(xg, 4, wg, bg, sg, hg),
                           lambda: _module("group_norm_act")._torch(xg, 4, wg, bg, sg, hg, "silu", 1e-5),
                           lambda: tops.group_norm_act(xg, 4, wg, bg, sg, hg, "silu", 1e-5)),
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


OPS = ["layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act", "group_norm_act"]


def measure(op):
    """Medians in us per call of (public, reference, torch.ops), interleaved in one run, one thread."""
    public, reference, registered = _cases()[op]
    torch.testing.assert_close(public(), reference())  # same math, so the difference is the host overhead
    torch.testing.assert_close(registered(), reference())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host path is single-threaded; a second OpenMP thread only adds noise
    try:
        with eekernels.backend("torch"):  # the context is entered once, outside the timings
            return _median_us(public, reference, registered)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("op", OPS)
def test_host_overhead(benchmark, op):
    public = _cases()[op][0]
    with eekernels.backend("torch"):
        benchmark(public)
    ours, ref, registered = measure(op)
    benchmark.extra_info.update(device="cpu", us=round(ours, 2), reference_us=round(ref, 2),
                                torch_ops_us=round(registered, 2), overhead_us=round(ours - ref, 2),
                                ratio=round(ours / ref, 3), torch_ops_ratio=round(registered / ours, 3))


if __name__ == "__main__":
    print("| op | public us | torch.ops us | reference us | torch.ops / public | public / reference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in OPS:
        ours, ref, registered = measure(name)
        print(f"| {name} | {ours:.2f} | {registered:.2f} | {ref:.2f} | {registered / ours:.2f} | {ours / ref:.2f} |")
