"""End-to-end sampling throughput: full depth vs the ASE schedule vs plain torch, in the same run.

Run: ``python -m pytest benchmarks/bench_sampling.py --benchmark-only`` (``eekernels bench`` prints the same
comparison as a table and writes JSON). Figures go into ``benchmark.extra_info``:
- CPU (CI size: a 12-block DiT of width 128, DDIM-10, CFG 1.5, 4 images): ``ase_over_full``, the ASE
  schedule's throughput over full depth (mean depth about 0.71 of full; target >= 1.25), and eekernels over
  the plain-torch DiT with the same sampler;
- CUDA (DiT-XL/2 random weights, bf16, DDIM-50, CFG 1.5, 32 images, the ASE reference schedule): images/s of
  every system of ``eekernels bench`` (target >= 30 for eekernels with graphs), and the time of one DDIM-50
  trajectory at batch 2 (1 image with CFG; target <= 0.15 s).
"""
from __future__ import annotations

import argparse

import pytest
import torch

from eekernels.eval import bench as B
from eekernels.jobs.bench import add_arguments

CUDA = torch.cuda.is_available()


def _args(**kw):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    args.batch, args.steps = (32, 50) if CUDA else (4, 10)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_sampling_ase_vs_full(benchmark):
    """The ASE schedule against full depth and against plain torch (CPU sizes off CUDA)."""
    args = _args(repeats=5 if not CUDA else 3, no_compile=not CUDA)
    result = B.run_bench(args)
    print("\n" + B.format_table(result))
    model, schedule, noise, y, device, _ = B.build(args)
    from eekernels.samplers import sample

    graphs = CUDA

    def run():
        out = sample(model, noise, y, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, schedule=schedule,
                     graphs=graphs)
        if CUDA:
            torch.cuda.synchronize()
        return out

    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
    info = benchmark.extra_info
    info.update({f"{r['system']} images/s": round(r["images_per_s"], 3) for r in result["rows"]})
    info.update({k: round(v, 3) for k, v in result["ratios"].items()})
    info.update(block_flop_fraction=round(result["info"]["block_flop_fraction"], 3), device=result["info"]["device"])
    if not CUDA:
        assert result["ratios"]["ase_over_full_eekernels_eager"] >= 1.25, (
            f"ASE over full depth {result['ratios']['ase_over_full_eekernels_eager']:.3f} < 1.25 "
            f"(block FLOP fraction {result['info']['block_flop_fraction']:.3f})")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none is visible on this machine")
def test_one_trajectory_batch2(benchmark):
    """One DDIM-50 trajectory of 1 image with CFG (batch 2), graphs on, DiT-XL/2 bf16 (target <= 0.15 s)."""
    args = _args(batch=1, steps=50)
    model, schedule, noise, y, _, _ = B.build(args)
    from eekernels.samplers import sample

    def run():
        out = sample(model, noise, y, sampler="ddim", steps=50, cfg_scale=1.5, schedule=schedule)
        torch.cuda.synchronize()
        return out

    run()
    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.extra_info["s_per_trajectory"] = round(benchmark.stats.stats.median, 4)
