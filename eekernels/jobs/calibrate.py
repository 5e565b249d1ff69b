"""``eekernels calibrate``: an exit schedule chosen from measurements (:mod:`eekernels.calibration`), written to a
file that ``eekernels sample --schedule calibrated:FILE`` reads.

It runs the model at full depth on a small calibration set (seeded noise, labels ``i % classes``), measures the
error of every candidate depth at every solver call, picks the depths under ``--budget`` (a block-FLOP
fraction) by a dynamic program and, unless ``--holdout 0``, checks the error proxy on held-out noise.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="glyph-dit", help="a shipped diffusion model (the base, not fine-tuned)")
    p.add_argument("--checkpoint", default=None, help="a model file instead of --model")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of an unnamed DiT size")
    p.add_argument("--sampler", default="dpmsolver++", help="ddpm | ddim | dpmsolver++ | euler | heun")
    p.add_argument("--steps", type=int, default=20, help="solver steps (>= 1)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    p.add_argument("--exit-policy", default="drop", choices=("drop", "cache"),
                   help="drop: skipped blocks add nothing; cache: they add what they added at the last full call")
    p.add_argument("--budget", type=float, default=0.7, help="block-FLOP fraction not to exceed, in (0, 1]")
    p.add_argument("--costs", default="blocks", choices=("blocks", "flops"),
                   help="what the budget counts: blocks (depth d costs d) or flops (measured per depth: a U-Net's "
                        "levels cost unequally)")
    p.add_argument("--samples", type=int, default=32, help="calibration noises (>= 1)")
    p.add_argument("--holdout", type=int, default=16, help="held-out noises to validate the proxy on (0: none)")
    p.add_argument("--validate-plans", type=int, default=8, help="plans the validation ranks")
    p.add_argument("--max-reuse", type=int, default=4, help="cache: most calls a recording is replayed for")
    p.add_argument("--measure", default="auto", choices=("auto", "prefix", "calls"),
                   help="prefix: one forward gives every depth (generic-loop families); calls: any model")
    p.add_argument("--seed", type=int, default=0, help="calibration noise i is seeded seed + i")
    p.add_argument("--out", default="calibrated.json", help="the schedule file to write (replaced if there)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (None: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")


def check_args(args) -> None:
    for name in ("steps", "samples", "max_reuse"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    for name in ("holdout", "validate_plans"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.budget) and 0 < args.budget <= 1):
        raise ValueError(f"--budget: expected a block-FLOP fraction in (0, 1], got {args.budget}")
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale: expected a finite number, got {args.cfg_scale}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out: expected a file path, got the folder {args.out!r}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint: no such file {args.checkpoint!r}")


def run(args) -> int:
    check_args(args)
    from eekernels.calibration import calibrate, save_schedule
    from eekernels.eval.images import seeded_inputs
    from eekernels.jobs.sample import load_model, parse_device

    device = parse_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, name = load_model(args, device)
    model = model.eval()
    shape = (model.in_channels, model.input_size or 32, model.input_size or 32)
    n, h = args.samples, args.holdout
    noise, labels = seeded_inputs(n + h, args.seed, model.num_classes, shape)
    noise = noise.to(device)
    labels = None if labels is None else labels.to(device)
    holdout = None if h == 0 else (noise[n:], None if labels is None else labels[n:])
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=None, desc="calibrate", unit="call")

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    sched = calibrate(model, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                      exit_policy=args.exit_policy, budget=args.budget, noises=noise[:n],
                      conditions=None if labels is None else labels[:n], max_reuse=args.max_reuse,
                      measure=args.measure, holdout=holdout, validate_plans=args.validate_plans,
                      time_reference=True, progress=progress, depth_costs=None if args.costs == "blocks" else "flops",
                      name=f"calibrated({name}, {args.exit_policy}, {args.sampler} {args.steps}, budget {args.budget:g})")
    if bar is not None:
        bar.close()
    rep = sched.calibration
    out = Path(args.out)
    existed = out.exists()
    save_schedule(sched, out)
    val = rep.validation
    print(f"calibrated {name}: {args.exit_policy}, {args.sampler} {args.steps} steps, CFG {args.cfg_scale}, "
          f"{n} calibration samples")
    print(f"  depth per call: {rep.plan}")
    if rep.depth_costs is None:
        print(f"  block-FLOP fraction {rep.block_flop_fraction:.3f} (budget {args.budget:g}), proxy {rep.proxy:.4g}")
    else:
        print(f"  FLOP fraction {rep.cost_fraction:.3f} (budget {args.budget:g}; measured FLOPs per depth), block "
              f"fraction {rep.block_flop_fraction:.3f}, proxy {rep.proxy:.4g}")
    ref = f", one full-depth sampling run {rep.reference_seconds:.2f} s" if rep.reference_seconds else ""
    print(f"  cost: {rep.model_calls} model calls ({rep.measure}), {rep.block_evaluations:.2f} full forwards of "
          f"blocks, {rep.seconds:.2f} s{ref}")
    if val is not None:
        print(f"  proxy vs real final-sample error on {val['num_samples']} held-out noises: Spearman "
              f"{val['spearman']:.3f} over {len(val['plans'])} plans")
    print(f"wrote {out.resolve()}" + (" (replaced the file that was there)" if existed else "")
          + f"; use it with: eekernels sample --schedule calibrated:{out}")
    return 0
