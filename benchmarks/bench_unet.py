"""U-Net benchmarks (CPU): early-exit cost per depth, ours against diffusers' UNet2DModel, per-sample depth.

Run: ``python -m pytest benchmarks/bench_unet.py --benchmark-only``.
Model: a DDPM-CIFAR-shaped UNet2DModel at reduced width (block_out_channels (64, 128, 128, 128), two
resnets per level, attention at 16x16 as in DDPM), 32x32 inputs, batch 2, float32, random weights.
Each case times its baseline in the same process and puts the ratio into ``benchmark.extra_info``:
- ``depth``: forward at depth d over full depth (``time_ratio``), beside the conv/GEMM FLOP ratio
  (``flop_ratio``, from ``torch.utils.flop_counter``). A U-Net spends most FLOPs at the top levels, so
  dropping deep levels saves less than d / L; the FLOP ratio is the ideal to compare against;
- ``vs_diffusers``: ours over the diffusers module at full depth (the same function, checked first);
- ``per_sample``: a mixed-depth batch over the FLOP-proportional ideal (sum of each sample's FLOP share).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

diffusers = pytest.importorskip("diffusers", reason="the U-Net baseline is diffusers' UNet2DModel")
from diffusers import UNet2DModel  # noqa: E402

from eekernels.models.unet import UNet  # noqa: E402

CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128, 128),
              layers_per_block=2, norm_num_groups=32, attention_head_dim=32,
              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
BATCH = 2


def _setup():
    torch.manual_seed(0)
    ref = UNet2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.5)
    model = UNet.from_diffusers(ref)
    x = torch.randn(BATCH, 3, 32, 32)
    t = torch.rand(BATCH) * 999
    return ref, model, x, t


def _median_s(fn, reps=5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench(benchmark, fn, rounds=5):
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = benchmark.stats  # None under --benchmark-disable (a smoke run): time it here instead
    return stats.stats.median if stats is not None else _median_s(fn, reps=1)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@torch.no_grad()
def test_cpu_depth(benchmark, depth):
    _, model, x, t = _setup()
    L = model.num_blocks
    full = _median_s(lambda: model(x, t))
    got = _bench(benchmark, lambda: model(x, t, depth=depth))
    flop_ratio = _flops(lambda: model(x, t, depth=depth)) / _flops(lambda: model(x, t))
    ratio = got / full
    benchmark.extra_info.update(depth=depth, full_depth=L, full_s=full, time_ratio=round(ratio, 4),
                                flop_ratio=round(flop_ratio, 4), vs_flop_ideal=round(ratio / flop_ratio, 4))


@torch.no_grad()
def test_cpu_vs_diffusers(benchmark):
    ref, model, x, t = _setup()
    torch.testing.assert_close(model(x, t), ref(x, t).sample, rtol=1e-4, atol=1e-4)
    base = _median_s(lambda: ref(x, t))
    got = _bench(benchmark, lambda: model(x, t))
    benchmark.extra_info.update(diffusers_s=base, ratio=round(got / base, 4))


@torch.no_grad()
def test_cpu_per_sample_vs_flop_ideal(benchmark):
    _, model, x, t = _setup()
    x, t = x.repeat(2, 1, 1, 1), t.repeat(2)
    depth = torch.tensor([4, 1, 3, 2])
    full = _median_s(lambda: model(x, t))
    share = [_flops(lambda d=d: model(x[:1], t[:1], depth=d)) for d in depth.tolist()]
    ideal = full * sum(share) / (len(share) * _flops(lambda: model(x[:1], t[:1])))
    got = _bench(benchmark, lambda: model(x, t, depth=depth))
    benchmark.extra_info.update(depths=depth.tolist(), full_s=full, ideal_s=ideal, vs_ideal=round(got / ideal, 4))


# --------------------------------------------------------------------------------------------------
# CUDA: DDPM-CIFAR10-32 (35.7M parameters) with random weights, bf16, against diffusers eager
# --------------------------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")


@requires_cuda
@pytest.mark.parametrize("B", [64, 2])
@torch.no_grad()
def test_cuda_ddpm_cifar10_bf16(benchmark, B):
    import triton.testing

    from eekernels.models.unet import UNET_CONFIGS

    torch.manual_seed(0)
    ref = UNet2DModel(**UNET_CONFIGS["DDPM-CIFAR10-32"]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.5)
    ref = ref.to("cuda", torch.bfloat16)
    model = UNet.from_diffusers(ref)
    x = torch.randn(B, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(B, device="cuda") * 999
    want, out = ref(x, t).sample.float(), model(x, t).float()
    rel = ((out - want).norm() / want.norm()).item()
    assert rel < 2e-2, f"bf16 output differs from diffusers by {rel:.3g} (relative)"

    def bench(fn):
        return [round(v, 3) for v in triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=50, rep=300)]

    base = bench(lambda: ref(x, t))
    ours = {d: bench(lambda d=d: model(x, t, depth=d)) for d in range(1, model.num_blocks + 1)}
    benchmark.pedantic(lambda: (model(x, t), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=2)
    full = ours[model.num_blocks][0]
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(), batch=B, rel_err_vs_diffusers=rel, diffusers_ms=base,
        ours_ms_by_depth=ours, speedup_vs_diffusers=round(base[0] / full, 3),
        time_ratio_by_depth={d: round(v[0] / full, 3) for d, v in ours.items()},
    )
