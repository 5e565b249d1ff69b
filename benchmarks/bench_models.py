"""Score-network benchmarks: early-exit cost, library overhead against plain torch, per-sample depth.

Run: ``python -m pytest benchmarks/bench_models.py --benchmark-only`` (CPU cases always; CUDA cases on a GPU).
Each case times its baseline in the same process and puts the ratio into ``benchmark.extra_info``:
- ``depth_fraction``: forward at depth k over full depth, against k / L (target: within 10%);
- ``overhead``: eekernels DiT over the same DiT in plain torch at full depth (target: <= 1.05 on CPU);
- ``per_sample``: a mixed-depth batch over the FLOP-proportional ideal, full time x mean depth / L (<= 1.05);
- CUDA, DiT-XL/2 bf16 random weights, full depth: B = 64 (target <= 28 ms on an H100; plain eager 55.4 ms)
  and B = 2 (target: below plain eager), medians with 20% / 80% quantiles from ``triton.testing.do_bench``.
"""
from __future__ import annotations

import time

import pytest
import torch

from eekernels.eval.baselines import TorchDiT, randomized  # the plain-torch baseline
from eekernels.models import DiT

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none is visible on this machine")

# DiT-B width and depth on a small CPU-friendly latent: 64 tokens, batch 2.
CPU_CFG = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12)
CPU_BATCH = 2


def _cpu_setup():
    torch.manual_seed(0)
    model = randomized(DiT(**CPU_CFG))
    B = CPU_BATCH
    x = torch.randn(B, 4, 16, 16)
    t = torch.rand(B) * 999
    y = torch.randint(0, 1000, (B,))
    return model, x, t, y


def _paired_min_s(fn_a, fn_b, reps=5) -> tuple[float, float]:
    """Best-of-``reps`` seconds of two functions, run alternately so that load on a shared CPU hits both alike."""
    fn_a(), fn_b()  # warm-up
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def _record(benchmark, fn, rounds=3):
    """Let pytest-benchmark time ``fn`` for its table (the ratios come from the paired timings)."""
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 6, 9])
@torch.no_grad()
def test_cpu_depth_fraction(benchmark, k):
    model, x, t, y = _cpu_setup()
    got, full = _paired_min_s(lambda: model(x, t, y, depth=k), lambda: model(x, t, y))
    _record(benchmark, lambda: model(x, t, y, depth=k))
    L = model.num_blocks
    benchmark.extra_info.update(depth=k, full_depth=L, time_ratio=round(got / full, 4), ideal=round(k / L, 4),
                                rel_dev=round(got / full / (k / L) - 1, 4))


@torch.no_grad()
def test_cpu_overhead_vs_plain_torch(benchmark):
    model, x, t, y = _cpu_setup()
    plain = TorchDiT(model)
    torch.testing.assert_close(model(x, t, y), plain(x, t, y), rtol=1e-4, atol=1e-4)
    got, base = _paired_min_s(lambda: model(x, t, y), lambda: plain(x, t, y))
    _record(benchmark, lambda: model(x, t, y))
    benchmark.extra_info.update(ours_s=got, plain_torch_s=base, overhead=round(got / base, 4))


@pytest.mark.parametrize("per_depth", [1, 4])
@torch.no_grad()
def test_cpu_per_sample_vs_flop_ideal(benchmark, per_depth):
    # per_depth samples at each of 4 depths: 1 is the worst case (the deep blocks run at batch 1, where a
    # CPU GEMM is least efficient); 4 is a mixed-timestep serving batch of 16.
    model, x, t, y = _cpu_setup()
    reps = 2 * per_depth
    x, t, y = x.repeat(reps, 1, 1, 1), t.repeat(reps), y.repeat(reps)
    depth = torch.tensor([12, 3, 9, 6]).repeat(per_depth)
    got, full = _paired_min_s(lambda: model(x, t, y, depth=depth), lambda: model(x, t, y))
    _record(benchmark, lambda: model(x, t, y, depth=depth))
    ideal = full * depth.double().mean().item() / model.num_blocks
    benchmark.extra_info.update(depths=depth.tolist(), full_s=full, ideal_s=ideal, vs_ideal=round(got / ideal, 4))


# --------------------------------------------------------------------------------------------------
# CUDA: DiT-XL/2, bf16, full depth, against plain torch eager
# --------------------------------------------------------------------------------------------------
def _do_bench(fn):
    import triton.testing

    med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=100, rep=500)
    return med, lo, hi


@requires_cuda
@pytest.mark.parametrize("B", [64, 2])
@torch.no_grad()
def test_cuda_dit_xl2_bf16(benchmark, B):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = randomized(DiT.from_config("DiT-XL/2")).to(torch.bfloat16)
    plain = TorchDiT(model)
    x = torch.randn(B, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(B, device="cuda") * 999
    y = torch.randint(0, 1000, (B,), device="cuda")
    want = TorchDiT(model.float())(x.float(), t, y)  # float32 baseline for the error check
    model.to(torch.bfloat16)
    out, base_out = model(x, t, y), plain(x, t, y)
    err = ((out.float() - want).norm() / want.norm()).item()
    base_err = ((base_out.float() - want).norm() / want.norm()).item()
    assert err <= 2 * base_err + 1e-3, (err, base_err)

    depth20 = lambda: model(x, t, y, depth=20)  # the ASE reference schedule's mean depth
    base = _do_bench(lambda: plain(x, t, y))
    got = _do_bench(lambda: model(x, t, y))
    got20 = _do_bench(depth20)
    benchmark.pedantic(lambda: (model(x, t, y), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=2)
    flops = 237e9 * B  # docs/design.md: 237 GFLOP per image per forward at 256 px
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), batch=B, ours_ms=[round(v, 3) for v in got],
        plain_eager_ms=[round(v, 3) for v in base], speedup=round(base[0] / got[0], 3),
        tflops=round(flops / got[0] / 1e9, 1), depth20_ms=round(got20[0], 3),
        depth20_ratio=round(got20[0] / got[0], 3), rel_err_vs_fp32=err, plain_rel_err_vs_fp32=base_err,
    )
