"""Training speed of ASE fine-tuning: sorted-prefix execution vs the naive all-blocks-then-pick (issue 4/5).

Same model, same batches, timesteps and noise (same seeds), the ASE reference schedule rescaled to the
model's depth (``ase-demo``): one optimizer step of ``Trainer`` with the model's own per-sample-depth
forward (each block runs only on the samples still in it) against ``NaiveExitModel`` (every block on every
sample, exit states picked with ``torch.where``, as the ASE reference code). Target: >= 1.25x steps/s on
CPU at a DiT-S-like size.

    python benchmarks/bench_finetune.py                      # DiT-S-like (12 blocks, width 384), prints the ratio
    python -m pytest benchmarks/bench_finetune.py            # pytest-benchmark, small size
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from eekernels import ExitSchedule  # noqa: E402
from eekernels.models import DiT  # noqa: E402
from eekernels.eval.naive import NaiveExitModel  # noqa: E402
from eekernels.training import TrainConfig, Trainer  # noqa: E402


def make_trainers(depth=12, hidden=384, heads=6, input_size=16, patch=2, channels=4, batch=16, seed=0):
    """(sorted-prefix trainer, naive trainer) on identical copies of one model, identical data."""
    torch.manual_seed(seed)
    kwargs = dict(input_size=input_size, patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
                  num_heads=heads, num_classes=10)
    a, b = DiT(**kwargs), DiT(**kwargs)
    b.load_state_dict(a.state_dict())
    schedule = ExitSchedule.preset("ase-demo", depth)
    data = torch.utils.data.TensorDataset(torch.randn(8 * batch, channels, input_size, input_size),
                                          torch.arange(8 * batch) % 10)
    cfg = TrainConfig(steps=10**9, batch_size=batch, lr=1e-5, seed=seed, log_every=10**9)
    fast = Trainer(a, cfg, data=data, schedule=schedule)
    naive = Trainer(b, cfg, data=data, schedule=schedule, forward=NaiveExitModel(b))
    return fast, naive, schedule


def measure(fast: Trainer, naive: Trainer, rounds: int = 5, warmup: int = 1) -> dict:
    """Median seconds per step of each, interleaved step by step (a shared, noisy CPU hits both alike)."""
    it_f, it_n = fast.data.iterate(), naive.data.iterate()
    times = {"sorted": [], "naive": []}
    for r in range(warmup + rounds):
        for name, tr, it in (("sorted", fast, it_f), ("naive", naive, it_n)):
            x, y = next(it)
            t0 = time.perf_counter()
            m = tr.train_step(x, y)
            float(m["loss"])
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"sorted_s_per_step": med["sorted"], "naive_s_per_step": med["naive"],
            "speedup": med["naive"] / med["sorted"], "times": times}


# ---- pytest-benchmark (small size, CI-friendly) ------------------------------------------------------------
def _small():
    return make_trainers(depth=6, hidden=96, heads=4, input_size=16, patch=4, batch=8)


def test_bench_train_step_sorted_prefix(benchmark):
    fast, _, _ = _small()
    it = fast.data.iterate()
    benchmark.extra_info["schedule"] = "ase-demo(6)"
    benchmark(lambda: fast.train_step(*next(it)))


def test_bench_train_step_naive(benchmark):
    _, naive, _ = _small()
    it = naive.data.iterate()
    benchmark.extra_info["schedule"] = "ase-demo(6)"
    benchmark(lambda: naive.train_step(*next(it)))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--control", action="store_true", help="also time both at full depth (implementation parity)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fast, naive, sched = make_trainers(a.depth, a.hidden, a.heads, a.input_size, a.patch, batch=a.batch)
    tokens = (a.input_size // a.patch) ** 2
    print(f"DiT depth {a.depth} width {a.hidden}, {tokens} tokens, batch {a.batch}, schedule {sched} "
          f"(mean depth {sum(sched.table) / len(sched.table) / a.depth:.3f} of full), {torch.get_num_threads()} threads")
    r = measure(fast, naive, rounds=a.rounds)
    print(f"sorted-prefix: {1 / r['sorted_s_per_step']:.3f} steps/s ({r['sorted_s_per_step'] * 1000:.0f} ms/step)")
    print(f"naive        : {1 / r['naive_s_per_step']:.3f} steps/s ({r['naive_s_per_step'] * 1000:.0f} ms/step)")
    print(f"speedup      : {r['speedup']:.2f}x (target >= 1.25x; FLOP-proportional ideal "
          f"{a.depth * len(sched.table) / sum(sched.table):.2f}x)")
    if a.control:  # same two implementations at full depth: the ratio that is not early exit's doing
        full = ExitSchedule.full(a.depth)
        fast.schedule = naive.schedule = full
        c = measure(fast, naive, rounds=a.rounds)
        print(f"control, both at full depth: sorted-prefix {c['sorted_s_per_step'] * 1000:.0f} ms/step, "
              f"naive {c['naive_s_per_step'] * 1000:.0f} ms/step, ratio {c['speedup']:.2f}x")
