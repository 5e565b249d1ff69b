"""Writing your own exit schedule: timestep -> number of blocks, evaluated on the device with no host sync.

An ``ExitSchedule`` is a table of depths over equal-width bins of t in [0, 1000) (t = 0 is data, 999 is
noise). Build one from bins, a ramp, any Python function, or rescale one written for another depth; a
step-indexed ``periodic`` schedule drives the training-free ``exit_policy="cache"``. Every solver asks
``schedule.depth(t)`` per model call; this script checks that the model ran exactly those depths.

    python python/examples/03_custom_schedule.py
"""
import argparse
import time

import torch

import eekernels
from eekernels import ExitSchedule


def tiny_model():
    """The shipped glyph DiT if installed, else a small random DiT (the schedules do not care)."""
    from eekernels.models import DiT, load_pretrained, pretrained_names

    if "glyph-dit-ase" in pretrained_names():
        return load_pretrained("glyph-dit-ase").eval()
    model = DiT(input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=8, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-images", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    model = tiny_model()
    L = model.num_blocks

    # ---- five ways to write a schedule for this L-block model
    schedules = {
        # ASE's reference shape (DiT-XL/2: 28 28 24 24 20 20 16 16 12 12 over ten bins), rescaled to L blocks
        "ase-demo": ExitSchedule.preset("ase-demo", total_depth=L),
        # your own bins: full depth for the cleaner 40% of t, then 3/4, then half
        "piecewise": ExitSchedule.piecewise([L] * 4 + [3 * L // 4] * 3 + [L // 2] * 3),
        # a linear ramp from L blocks at t = 0 to L/2 at t = 999
        "linear": ExitSchedule.linear(min_depth=L // 2, max_depth=L),
        # any function of the integer timestep (tabulated once, so it is still one gather on the device)
        "from_fn": ExitSchedule.from_fn(lambda t: L if t < 300 else max(1, L - 1 - t // 250), total_depth=L),
        # a schedule written for DiT-XL/2's 28 blocks, rescaled to this model
        "rescaled": ExitSchedule.piecewise([28, 26, 24, 22, 20, 18, 16, 14, 12, 10]).rescaled(L),
    }
    probe = torch.tensor([0.0, 250.0, 512.5, 750.0, 999.0])  # fractional t (DPM-Solver, Euler) is fine
    print(f"model: {type(model).__name__} with {L} blocks; depth at t = {probe.tolist()}")

    noise = torch.randn(args.num_images, model.in_channels, model.input_size, model.input_size)
    labels = torch.arange(args.num_images) % model.num_classes
    seen = []  # the depth of every model call, as the model received it
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("depth")), with_kwargs=True)
    solver = eekernels.samplers.make_solver("ddim", args.steps)
    for name, s in schedules.items():
        seen.clear()
        t0 = time.perf_counter()
        eekernels.sample(model, noise, labels, sampler="ddim", steps=args.steps, cfg_scale=1.5, schedule=s)
        dt = time.perf_counter() - t0
        want = s.plan(solver.timesteps).tolist()
        assert seen == want, (name, seen, want)  # the model ran exactly schedule.depth(t) at every call
        print(f"  {name:10s} {s.depth(probe).tolist()}  mean depth {sum(seen) / len(seen):5.2f} "
              f"-> {s.block_flop_fraction(solver.timesteps):.2f} of the block FLOPs, {dt:.2f}s")

    # ---- step-indexed: full depth every 3rd call, L/2 blocks in between, reusing what the skipped blocks
    # added at the last full call (training-free early exit for a model that was not fine-tuned)
    periodic = ExitSchedule.periodic(3, L // 2, total_depth=L)
    seen.clear()
    eekernels.sample(model, noise, labels, sampler="ddim", steps=args.steps, schedule=periodic,
                     exit_policy="cache")
    print(f"  periodic   depths per call {seen}")
    assert seen == [L if i % 3 == 0 else L // 2 for i in range(args.steps)]


if __name__ == "__main__":
    main()
