"""Shared harness of the op microbenchmarks (benchmarks/bench_<op>.py).

Run: ``python -m pytest benchmarks/bench_modulated_layer_norm.py --benchmark-only`` (or ``benchmarks/`` for
all of them; ``bench_*.py`` files are collected here).

Each case is one provider of one op. pytest-benchmark times it on the host (a CUDA case synchronizes inside
the timed function), and ``Bench.record`` also times the case and its baseline (torch eager, same inputs) in the
same process with the same timer, putting into ``benchmark.extra_info``:
- ``ms`` (median), and on CUDA ``ms_p20`` / ``ms_p80`` from ``triton.testing.do_bench``;
- ``speedup``: baseline time / our time (> 1 means faster than torch eager);
- ``GB/s`` (bytes read + written / time) or ``TFLOP/s``.

Providers: ``torch_eager`` (the unfused torch a user would write, in the input dtype), ``torch_compile``
(that, compiled), ``eekernels`` (our public function, backend auto), ``triton`` and ``cuda`` (forced backends).
On CPU the sizes are small and only interpreter-free providers run: the Triton interpreter and CUDA providers
skip with a reason. On CUDA the shape is DiT-XL/2's (64, 256, 1152) in bfloat16, plus torch.compile.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bfloat16 is what DiT samples in on GPUs; CPU kernels are fastest (and most often used) in float32.
DTYPE = torch.bfloat16 if CUDA else torch.float32

if not CUDA:
    # One intra-op thread: on a shared 2-core machine, OpenMP threads waiting for each other turn 50 us
    # ops into 30 ms ones, and the small CPU sizes gain nothing from a second thread.
    torch.set_num_threads(1)

SKIP_ON_CPU = {
    "triton": "the Triton interpreter is a correctness tool, not a speed one: triton is benchmarked on CUDA only",
    "cuda": "needs a CUDA GPU (and eekernels._C); none is visible on this machine",
    "cublas": "needs a CUDA GPU; none is visible on this machine",
    "torch_compile": "inductor's CPU compile takes minutes on this machine's cores; compiled on CUDA only",
}


def pytest_collect_file(file_path, parent):
    # pytest collects test_*.py by default; the microbenchmarks are bench_*.py (docs/design.md's naming).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def synced(fn):
    """The timed function: on CUDA it waits for the GPU, since pytest-benchmark times on the host."""
    if not CUDA:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


def median_ms(*fns) -> list[tuple[float, float, float]]:
    """(median, 20% quantile, 80% quantile) in ms per function: do_bench (CUDA events) on CUDA; on CPU
    perf_counter with the functions interleaved, so that load from other processes hits each alike."""
    if CUDA:
        import triton.testing

        return [tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])) for fn in fns]
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    deadline = time.perf_counter() + 0.5 * len(fns)
    while len(times[0]) < 5 or (time.perf_counter() < deadline and len(times[0]) < 200):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [_quantiles(ts) for ts in times]


class Bench:
    """One benchmark case: the provider's callable, timing, and the figures that go into extra_info."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    @staticmethod
    def require(provider: str) -> None:
        """Skip, with the reason, a provider this machine cannot time meaningfully."""
        if not CUDA and provider in SKIP_ON_CPU:
            pytest.skip(SKIP_ON_CPU[provider])
        if provider == "cuda":
            from eekernels import _ext

            if not _ext.available():
                pytest.skip(_ext.unavailable_reason())

    @staticmethod
    def randn(*shape, dtype=None, scale=1.0, offset=0.0):
        return (torch.randn(*shape, device=DEVICE) * scale + offset).to(dtype or DTYPE)

    @staticmethod
    def provider(provider: str, op, eager, args):
        """The callable timed for ``provider``: torch eager, torch.compile of it, or our op on a backend."""
        if provider == "torch_eager":
            return lambda: eager(*args)
        if provider == "torch_compile":
            compiled = torch.compile(eager)
            return lambda: compiled(*args)
        import eekernels

        name = "auto" if provider == "eekernels" else provider

        def run():
            with eekernels.backend(name):
                return op(*args)

        return run

    def record(self, fn, baseline, *, bytes_moved: int | None = None, flops: int | None = None,
               extra_baselines: dict | None = None) -> None:
        """Time ``fn`` with pytest-benchmark, then ``fn`` and ``baseline`` with one timer, into extra_info."""
        fn()  # compile / autotune outside the timings
        if CUDA:
            torch.cuda.synchronize()
        self.benchmark(synced(fn))
        others = extra_baselines or {}
        (ours, p20, p80), (base, _, _), *rest = median_ms(fn, baseline, *others.values())
        info = self.benchmark.extra_info
        info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE), ms=round(ours, 4),
                    baseline_ms=round(base, 4), speedup=round(base / ours, 3))
        if CUDA:
            info.update(ms_p20=round(p20, 4), ms_p80=round(p80, 4))
        if bytes_moved is not None:
            info["GB/s"] = round(bytes_moved / (ours * 1e-3) / 1e9, 1)
        if flops is not None:
            info["TFLOP/s"] = round(flops / (ours * 1e-3) / 1e12, 2)
        for name, (other, _, _) in zip(others, rest):
            info[f"speedup_vs_{name}"] = round(other / ours, 3)


@pytest.fixture
def bench(benchmark):
    return Bench(benchmark)
