"""``eekernels calibrate``: an exit schedule chosen from measurements (:mod:`eekernels.calibration`), written to a
file that ``eekernels sample --schedule calibrated:FILE`` reads.

It runs the model at full depth on a small calibration set (seeded noise; labels ``i % classes``, or for a
text-conditioned checkpoint (PixArt, SD3, FLUX) caption ``i % N`` of ``--prompt-embeds``), measures the error
of every candidate depth at every solver call, picks the depths under ``--budget`` (a block-FLOP fraction) by a
dynamic program and, unless ``--holdout 0``, checks the error proxy on held-out noise.
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
    p.add_argument("--sampler", default=None,
                   help="ddpm | ddim | dpmsolver++ | euler | heun; flow_euler | flow_heun | flow_dpmsolver++ for flow "
                        "models (SD3, FLUX) (default: dpmsolver++, or flow_euler for a flow model)")
    p.add_argument("--prompt-embeds", default=None,
                   help="text families (PixArt, SD3, FLUX): a .safetensors of caption embeddings with diffusers' "
                        "keys prompt_embeds (N, L, D), prompt_attention_mask, pooled_prompt_embeds and their "
                        "negative_* (eekernels.models.condition.save_prompt_embeds); noise i takes caption i %% N")
    p.add_argument("--guidance", type=float, default=3.5,
                   help="FLUX.1-dev (guidance-distilled): the guidance embedding's scale")
    p.add_argument("--shift", type=float, default=None,
                   help="flow samplers: the sigma shift (SD3 / SD3.5's scheduler: 3.0; default: the solver's 1.0)")
    p.add_argument("--dynamic-shift", action="store_true",
                   help="flow samplers: resolution-dependent shift from the image token count, as the FLUX "
                        "pipelines compute it (use_dynamic_shifting, image_seq_len = (size / patch)^2)")
    p.add_argument("--size", type=int, default=None,
                   help="latent height = width for models without a fixed size (default: the model's sample_size, "
                        "else 32)")
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
    p.add_argument("--select", default="proxy", choices=("proxy", "closed-loop"),
                   help="proxy: the DP's optimum; closed-loop: sample the calibration set under the DP's optima of "
                        "several error weightings (and reuse limits) and keep the closest to full depth")
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
    if args.prompt_embeds and not Path(args.prompt_embeds).is_file():
        raise ValueError(f"--prompt-embeds: no such file {args.prompt_embeds!r}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size: expected an integer >= 1, got {args.size}")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance: expected a finite number, got {args.guidance}")


def text_conditions(args, model, n: int):
    """(y, negative) of ``n`` rows for a text-conditioned model: caption i % N of ``--prompt-embeds`` (negative:
    the file's negative_* rows the same way, or None), FLUX-dev's guidance from ``--guidance``; checked against
    the model with errors that name ``--prompt-embeds``."""
    from eekernels.models.condition import load_prompt_embeds
    from eekernels.samplers.sampling import check_condition

    if not args.prompt_embeds:
        raise ValueError(f"--prompt-embeds: expected a caption-embedding file for the text-conditioned "
                         f"{type(model).__name__} (calibration runs it on real captions), got none")
    y, neg = load_prompt_embeds(args.prompt_embeds, where="--prompt-embeds")
    rows = torch.arange(n)

    def cycle(c):
        c = c.index(rows % c.batch)
        if "guidance" in (getattr(model, "condition_extras", None) or {}) and "guidance" not in c.extra:
            c.extra["guidance"] = torch.full((n,), float(args.guidance))
        return c

    y, neg = cycle(y), None if neg is None else cycle(neg)
    if args.cfg_scale != 1 and neg is None:
        try:  # PixArt has a learned null caption; SD3 and FLUX raise: they need the negative prompt's embeddings
            model.null_condition(1, y.length, device=y.tokens.device, dtype=y.tokens.dtype)
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"--prompt-embeds: CFG (--cfg-scale {args.cfg_scale:g}) with {type(model).__name__}, "
                             "which has no null caption, expected negative_prompt_embeds in the file (or "
                             "--cfg-scale 1)") from None
    try:
        check_condition(model, y, n, y.tokens.device)
        if neg is not None:
            check_condition(model, neg, n, neg.tokens.device, name="negative")
    except ValueError as e:
        raise ValueError(f"--prompt-embeds: {e}") from None
    return y, neg


def run(args) -> int:
    check_args(args)
    from eekernels.calibration import calibrate, save_schedule
    from eekernels.eval.images import seeded_inputs
    from eekernels.jobs.sample import load_model, model_defaults, parse_device
    from eekernels.samplers import SOLVERS

    device = parse_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, name = load_model(args, device)
    model = model.eval()
    text = getattr(model, "condition", "label") == "text"
    if args.sampler is None:
        args.sampler = model_defaults(model)["sampler"]
    size = model.input_size or args.size or getattr(model, "sample_size", None) or 32
    if model.input_size and args.size not in (None, model.input_size):
        raise ValueError(f"--size: {name} takes {model.input_size} x {model.input_size} inputs only, got {args.size}")
    shape = (model.in_channels, size, size)
    opts = {}
    if args.shift is not None or args.dynamic_shift:
        flag = "--shift" if args.shift is not None else "--dynamic-shift"
        if args.sampler not in SOLVERS or SOLVERS[args.sampler].prediction != "flow":
            raise ValueError(f"{flag}: expected a flow sampler (flow_euler, flow_heun, flow_dpmsolver++), got "
                             f"--sampler {args.sampler}")
        if args.shift is not None:
            if not (math.isfinite(args.shift) and args.shift > 0):
                raise ValueError(f"--shift: expected a finite number > 0, got {args.shift}")
            opts["shift"] = args.shift
        if args.dynamic_shift:
            patch = int(getattr(model, "patch_size", None) or 2)
            opts.update(use_dynamic_shifting=True, image_seq_len=(size // patch) ** 2)
    n, h = args.samples, args.holdout
    noise, labels = seeded_inputs(n + h, args.seed, None if text else model.num_classes, shape)
    noise = noise.to(device)
    negative = None
    if text:
        labels, negative = (None if c is None else c.to(device) for c in text_conditions(args, model, n + h))
        part = lambda c, s: None if c is None else c.index(s)  # noqa: E731
    else:
        labels = None if labels is None else labels.to(device)
        part = lambda c, s: None if c is None else c[s]  # noqa: E731
    holdout = None if h == 0 else (noise[n:], part(labels, slice(n, None)), part(negative, slice(n, None)))
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
                      conditions=part(labels, slice(0, n)), negative=part(negative, slice(0, n)),
                      max_reuse=args.max_reuse, measure=args.measure, select=args.select, holdout=holdout,
                      validate_plans=args.validate_plans, time_reference=True, progress=progress,
                      depth_costs=None if args.costs == "blocks" else "flops", **opts,
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
    if rep.selection:
        print(f"  closed-loop: {len(rep.selection)} candidate plans sampled; final-sample RMS to full depth "
              f"{min(r['real'] for r in rep.selection):.4g} (kept) .. {max(r['real'] for r in rep.selection):.4g}")
    ref = f", one full-depth sampling run {rep.reference_seconds:.2f} s" if rep.reference_seconds else ""
    print(f"  cost: {rep.model_calls} model calls ({rep.measure}), {rep.block_evaluations:.2f} full forwards of "
          f"blocks, {rep.seconds:.2f} s{ref}")
    if val is not None:
        print(f"  proxy vs real final-sample error on {val['num_samples']} held-out noises: Spearman "
              f"{val['spearman']:.3f} over {len(val['plans'])} plans")
    print(f"wrote {out.resolve()}" + (" (replaced the file that was there)" if existed else "")
          + f"; use it with: eekernels sample --schedule calibrated:{out}")
    return 0
