"""``eekernels calibrate``: an exit schedule chosen from measurements (:mod:`eekernels.calibration`), written to a
file that ``eekernels sample --schedule calibrated:FILE`` reads.

It runs the model at full depth on a small calibration set (seeded noise; labels ``i % classes``, or for a
text-conditioned checkpoint (PixArt, SD3, FLUX) caption ``i % N`` of ``--prompt-embeds``), measures the error
of every candidate depth at every solver call and picks the depths under ``--budget`` (a block-FLOP fraction) by
a dynamic program. That is the whole default run (on the shipped glyph-dit at the defaults: about 1.5x one
sampling run of the calibration set). Two extras, each one flag away, cost more and change nothing in the
schedule: ``--validate`` checks the error proxy on held-out noise (``--validate-plans`` + 2 sampling runs of
``--holdout`` noises: about 4x the calibration at the defaults) and ``--time-reference`` times one plain
full-depth sampling run of the calibration set (about 0.7x). The printed ``time:`` line splits the run's time
between the three. Opt-in, ``--search steps,policy`` plans over solver steps, depth and exit policy together and
puts every plan against the fewer-steps baseline (full depth at the step count of the same FLOPs), sampling each on
the calibration set; it prints what it chose and what each alternative measured, and returns the baseline where no
plan beats it (costlier: one calibration per step count and policy plus one sampling run per alternative).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from eekernels.jobs import options

DEFAULT_MODEL = "glyph-dit"
DEFAULT_HOLDOUT, DEFAULT_VALIDATE_PLANS, DEFAULT_MAX_REUSE, DEFAULT_GUIDANCE = 16, 8, 4, 3.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = __doc__.split("\n\n")[1].replace("``", "")
    p.description = f"{p.description}. {what}" if p.description else what
    p.add_argument("--model", default=None, help=f"a shipped diffusion model (the base, not fine-tuned); "
                                                 f"{DEFAULT_MODEL} unless --checkpoint is given")
    p.add_argument("--checkpoint", default=None, help="a model file instead of --model")
    p.add_argument("--num-heads", type=int, default=None,
                   help="--checkpoint only: attention heads of a facebookresearch DiT or PixArt file of an unnamed size")
    p.add_argument("--model-config", default=None, metavar="FILE",
                   help="--checkpoint of PixArt-Σ only: the PixArt-sigma training config (.py, read without running "
                        "it) it was trained with, for its qk_norm / kv_compress_config; the KV compressions without "
                        "weights (uniform, ave, uniform_every) leave no trace in the checkpoint and run "
                        "uncompressed without it")
    p.add_argument("--sampler", default=None,
                   help="ddpm | ddim | dpmsolver++ | euler | heun; flow_euler | flow_heun | flow_dpmsolver++ for flow "
                        "models (SD3, FLUX) (default: dpmsolver++, or flow_euler for a flow model)")
    p.add_argument("--prompt-embeds", default=None,
                   help="text families (PixArt, SD3, FLUX) only: a .safetensors of caption embeddings with diffusers' "
                        "keys prompt_embeds (N, L, D), prompt_attention_mask, pooled_prompt_embeds and their "
                        "negative_* (eekernels.models.condition.save_prompt_embeds); noise i takes caption i %% N")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"guidance-distilled models (FLUX.1-dev) only: the guidance embedding's scale (default "
                        f"{DEFAULT_GUIDANCE})")
    p.add_argument("--shift", type=float, default=None,
                   help="flow samplers: the sigma shift (SD3 / SD3.5's scheduler: 3.0; default: the solver's 1.0)")
    p.add_argument("--dynamic-shift", action="store_true",
                   help="flow samplers: resolution-dependent shift from the image token count, as the FLUX "
                        "pipelines compute it (use_dynamic_shifting, image_seq_len = (size / patch)^2; replaces "
                        "--shift)")
    p.add_argument("--size", type=int, default=None,
                   help="latent height = width for models without a fixed size (default: the model's sample_size, "
                        "else 32)")
    p.add_argument("--steps", type=int, default=20, help="solver steps (>= 1)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    p.add_argument("--exit-policy", default="drop", choices=("drop", "cache", "forecast"),
                   help="drop: skipped blocks add nothing; cache: they add what they added at the last full call; "
                        "forecast: what they added extrapolated in t from the last two full calls (planned by the "
                        "joint search, against the fewer-steps baseline)")
    p.add_argument("--search", default=None,
                   help="opt-in joint plan: 'steps' (also fewer solver steps at deeper plans of the same block "
                        "FLOPs), 'policy' (each call its own exit policy among drop, cache and forecast; or name "
                        "them), 'uncond' (also plans that run CFG's conditional half alone at some calls, the "
                        "unconditional output forecast; needs --cfg-scale != 1), e.g. 'steps,policy'. Every "
                        "alternative and the fewer-steps baseline (full depth at the step count of the same FLOPs) are sampled on the calibration set; the closest to full "
                        "depth at --steps is written (the baseline where no plan beats it), with its steps and "
                        "per-call policies. Costs one calibration per step count and policy plus one sampling run "
                        "per alternative (about 10-20x the default run)")
    p.add_argument("--forecast-order", type=int, default=None, choices=(1, 2),
                   help="the forecast orders the joint search samples its forecasting plans at (default: both 1 and "
                        "2; the schedule written keeps the chosen plan's, which `eekernels sample` then uses)")
    p.add_argument("--forecast-target", default=None, choices=("residual", "blocks"),
                   help="what the joint search's forecasting plans extrapolate: the skipped blocks' residual, or each "
                        "skipped block's attention and MLP outputs (blocks: native DiT checkpoints; default: each the "
                        "model runs; the schedule written keeps the chosen one)")
    p.add_argument("--budget", type=float, default=0.7, help="block-FLOP fraction not to exceed, in (0, 1]")
    p.add_argument("--costs", default="blocks", choices=("blocks", "flops"),
                   help="what the budget counts: blocks (depth d costs d) or flops (measured per depth: a U-Net's "
                        "levels cost unequally)")
    p.add_argument("--samples", type=int, default=32, help="calibration noises (>= 1)")
    p.add_argument("--validate", action="store_true",
                   help="also check the error proxy against the real final-sample error on held-out noises (Spearman "
                        "over --validate-plans plans): --validate-plans + 2 sampling runs of --holdout noises, about "
                        "4x the calibration's time at the defaults; the schedule is the same either way")
    p.add_argument("--holdout", type=int, default=None,
                   help=f"--validate: held-out noises (default {DEFAULT_HOLDOUT}; 0 without --validate: none)")
    p.add_argument("--validate-plans", type=int, default=None,
                   help=f"--validate: plans the validation ranks (default {DEFAULT_VALIDATE_PLANS})")
    p.add_argument("--time-reference", action="store_true",
                   help="also time one plain full-depth sampling run of the calibration set, to compare the "
                        "calibration's cost with (about 0.7x the calibration's time)")
    p.add_argument("--max-reuse", type=int, default=None,
                   help=f"--exit-policy cache: most calls a recording is replayed for (default {DEFAULT_MAX_REUSE})")
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
    """Every option that can be checked without the model, before anything is loaded (with the checks that every
    command shares, :mod:`eekernels.jobs.options`); fills in the defaults of the options that only apply with
    another one (given without it, they are refused: they would be ignored)."""
    if args.model is not None and args.checkpoint:
        raise ValueError(f"--model: expected --model or --checkpoint, got both (--model {args.model}, --checkpoint "
                         f"{args.checkpoint})")
    args.model = args.model or DEFAULT_MODEL
    options.positive(args, "num_heads", "steps", "samples", "size")
    if args.num_heads is not None and not args.checkpoint:
        raise ValueError(f"--num-heads: only used with --checkpoint (a shipped model knows its heads), got "
                         f"--num-heads {args.num_heads} with --model {args.model}")
    from eekernels.samplers import SOLVERS

    if args.sampler is not None and args.sampler not in SOLVERS:
        raise ValueError(f"--sampler: expected one of {sorted(SOLVERS)}, got {args.sampler!r}")
    if not args.validate:
        for option, value, harmless in (("--holdout", args.holdout, 0), ("--validate-plans", args.validate_plans, None)):
            if value not in (None, harmless):  # --holdout 0 asks for no validation: what it gets
                raise ValueError(f"{option}: only used with --validate (held-out validation), got {option} {value} "
                                 f"without it")
    args.holdout = DEFAULT_HOLDOUT if args.holdout is None else args.holdout
    args.validate_plans = DEFAULT_VALIDATE_PLANS if args.validate_plans is None else args.validate_plans
    if args.validate and args.holdout < 2:
        raise ValueError(f"--holdout: expected an integer >= 2 with --validate, got {args.holdout}")
    if args.validate:
        options.positive(args, "validate_plans")
    options.seed_range(args.seed, args.samples + (args.holdout if args.validate else 0))
    if args.search is not None:
        from eekernels.calibration import parse_search

        try:
            parse_search(args.search, args.exit_policy)
        except ValueError as e:
            raise ValueError(f"--search: {str(e).split(': ', 1)[1]}") from None
        from eekernels.calibration import search_names

        if "uncond" in search_names(args.search) and args.cfg_scale == 1:
            raise ValueError("--search: 'uncond' plans forecast classifier-free guidance's unconditional branch; "
                             "expected --cfg-scale != 1, got 1")
        if args.validate:
            raise ValueError("--validate: the joint search (--search) validates by sampling every alternative on the "
                             "calibration set; got --validate with --search")
    if args.max_reuse is not None and args.exit_policy != "cache" and args.search is None:
        raise ValueError(f"--max-reuse: only used with --exit-policy cache, got --max-reuse {args.max_reuse} with "
                         f"--exit-policy {args.exit_policy}")
    args.max_reuse = DEFAULT_MAX_REUSE if args.max_reuse is None else args.max_reuse
    options.positive(args, "max_reuse")
    if not (math.isfinite(args.budget) and 0 < args.budget <= 1):
        raise ValueError(f"--budget: expected a block-FLOP fraction in (0, 1], got {args.budget}")
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale: expected a finite number, got {args.cfg_scale}")
    if args.shift is not None and args.dynamic_shift:
        raise ValueError(f"--shift: --dynamic-shift replaces it (the shift comes from the image token count), got "
                         f"--shift {args.shift:g} with --dynamic-shift")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift: expected a finite number > 0, got {args.shift}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance: expected a finite number, got {args.guidance}")
    if args.device is not None:
        options.parse_device(args.device, "--device")
    options.output_file(args.out, "--out")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint: no such file {args.checkpoint!r}")
    options.model_config(args.model_config, args.checkpoint)
    if args.prompt_embeds and not Path(args.prompt_embeds).is_file():
        raise ValueError(f"--prompt-embeds: no such file {args.prompt_embeds!r}")


def check_model_args(args, model, name: str) -> None:
    """The options that apply to some models only, against the loaded model (before any calibration work)."""
    text = getattr(model, "condition", "label") == "text"
    if args.prompt_embeds and not text:
        raise ValueError(f"--prompt-embeds: only used with a text-conditioned model (PixArt, SD3, FLUX), got "
                         f"{name}, a class-label {type(model).__name__} (its calibration set uses labels i % classes)")
    takes_guidance = "guidance" in (getattr(model, "condition_extras", None) or {})
    if args.guidance is not None and not takes_guidance:
        raise ValueError(f"--guidance: only used with a guidance-distilled model (FLUX.1-dev), got {name}, a "
                         f"{type(model).__name__} without a guidance embedding")
    if args.num_heads is not None and getattr(model, "num_heads", None) != args.num_heads:
        raise ValueError(f"--num-heads: {name} has {getattr(model, 'num_heads', None)} heads from its own file "
                         f"(--num-heads is for a facebookresearch DiT or PixArt file of an unnamed size), got "
                         f"--num-heads {args.num_heads}")
    if model.input_size and args.size not in (None, model.input_size):
        raise ValueError(f"--size: {name} takes {model.input_size} x {model.input_size} inputs only, got {args.size}")


#: calibrate()'s (and sample()'s) argument names -> this command's options, for the errors of check_call
_CLI_NAMES = {"sampler": "--sampler", "steps": "--steps", "cfg_scale": "--cfg-scale", "exit_policy": "--exit-policy",
              "noise": "--size", "y": "--prompt-embeds", "negative": "--prompt-embeds", "shift": "--shift",
              "image_seq_len": "--dynamic-shift", "use_dynamic_shifting": "--dynamic-shift"}


def check_call(model, args, noise, conditions, negative, solver_options: dict) -> None:
    """The input checks ``calibrate()`` makes before its first model call (``sample()``'s, and the solver it
    builds), made here first so that nothing has run and the errors name this command's options."""
    from eekernels.samplers.sampling import _check_inputs, solver_for

    try:
        _check_inputs(model, noise, conditions, args.sampler, args.steps, args.cfg_scale, args.exit_policy, None,
                      None, None, negative)
        solver_for(model, args.sampler, args.steps, **solver_options)
    except ValueError as e:
        raise ValueError(options.as_option(str(e), _CLI_NAMES, "--checkpoint" if args.checkpoint else "--model")) \
            from None
    check_grid = getattr(model, "check_grid", None)  # PixArt-Σ's KV compression takes some grids only
    if check_grid is not None:
        patch = model.patch_size
        try:
            check_grid(noise.shape[-2] // patch, noise.shape[-1] // patch)
        except ValueError as e:
            raise ValueError(f"--size: {e}") from None


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
        if "guidance" in c.extra and args.guidance is not None:
            raise ValueError(f"--guidance: the --prompt-embeds file holds its own guidance (extra.guidance), which "
                             f"the calibration uses; got --guidance {args.guidance:g} as well")
        if "guidance" in (getattr(model, "condition_extras", None) or {}) and "guidance" not in c.extra:
            c.extra["guidance"] = torch.full((n,), DEFAULT_GUIDANCE if args.guidance is None else args.guidance)
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
    from eekernels.calibration import calibrate
    from eekernels.eval.images import seeded_inputs
    from eekernels.jobs.sample import load_model, model_defaults
    from eekernels.samplers import SOLVERS

    device = options.parse_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available()
                                                                                else "cpu")
    model, name = load_model(args, device)
    model = model.eval()
    check_model_args(args, model, name)
    text = getattr(model, "condition", "label") == "text"
    if args.sampler is None:
        args.sampler = model_defaults(model)["sampler"]
    size = model.input_size or args.size or getattr(model, "sample_size", None) or 32
    shape = (model.in_channels, size, size)
    opts = {}
    if args.shift is not None or args.dynamic_shift:
        flag = "--shift" if args.shift is not None else "--dynamic-shift"
        if args.sampler not in SOLVERS or SOLVERS[args.sampler].prediction != "flow":
            raise ValueError(f"{flag}: expected a flow sampler (flow_euler, flow_heun, flow_dpmsolver++), got "
                             f"--sampler {args.sampler}")
        if args.shift is not None:
            opts["shift"] = args.shift
        if args.dynamic_shift:
            patch = int(getattr(model, "patch_size", None) or 2)
            opts.update(use_dynamic_shifting=True, image_seq_len=(size // patch) ** 2)
    n, h = args.samples, (args.holdout if args.validate else 0)
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
    check_call(model, args, noise, labels, negative, opts)
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
                      validate_plans=args.validate_plans, time_reference=args.time_reference, progress=progress,
                      depth_costs=None if args.costs == "blocks" else "flops", search=args.search,
                      forecast_order=args.forecast_order, forecast_target=args.forecast_target, **opts,
                      name=f"calibrated({name}, {args.exit_policy}, {args.sampler} {args.steps}, budget {args.budget:g})")
    if bar is not None:
        bar.close()
    rep = sched.calibration
    out = Path(args.out)
    existed = out.exists()
    sched.save(out)
    val = rep.validation
    what = f"joint plan ({args.search or args.exit_policy})" if rep.joint is not None else args.exit_policy
    print(f"calibrated {name}: {what}, {args.sampler} {args.steps} steps, CFG {args.cfg_scale}, "
          f"{n} calibration samples")
    if rep.joint is not None:
        from eekernels.calibration import describe_joint

        print(f"  the plan: {rep.sampler} {rep.steps} steps; policy per call: {rep.policies}")
    print(f"  depth per call: {rep.plan}")
    modes = sched.uncond_modes(torch.tensor(rep.call_timesteps))
    if modes is not None:
        print(f"  CFG's unconditional half per call (forecast: the conditional half alone runs): {modes}")
    if rep.joint is not None:
        print("\n".join(describe_joint(rep)))
    if rep.joint is not None and rep.steps != args.steps:
        print(f"  block-FLOP fraction {rep.joint['spent_fraction']:.3f} of full depth at {args.steps} steps (budget "
              f"{args.budget:g}); {rep.block_flop_fraction:.3f} of full depth at its own {rep.steps} steps, proxy "
              f"{rep.proxy:.4g}")
    elif rep.depth_costs is None:
        print(f"  block-FLOP fraction {rep.block_flop_fraction:.3f} (budget {args.budget:g}), proxy {rep.proxy:.4g}")
    else:
        print(f"  FLOP fraction {rep.cost_fraction:.3f} (budget {args.budget:g}; measured FLOPs per depth), block "
              f"fraction {rep.block_flop_fraction:.3f}, proxy {rep.proxy:.4g}")
    if rep.selection:
        what = "final-sample RMS to full depth" if rep.objective == "rms" else f"objective {rep.objective}"
        print(f"  closed-loop: {len(rep.selection)} candidate plans sampled; {what} "
              f"{min(r['real'] for r in rep.selection):.4g} (kept) .. {max(r['real'] for r in rep.selection):.4g}")
    if val is not None:
        print(f"  proxy vs real final-sample error on {val['num_samples']} held-out noises: Spearman "
              f"{val['spearman']:.3f} over {len(val['plans'])} plans")
    print(f"  cost: {rep.model_calls} model calls ({rep.measure}), {rep.block_evaluations:.2f} full forwards of "
          f"blocks")
    print("  time: " + "; ".join(time_split(rep)))
    print(f"wrote {out.resolve()}" + (" (replaced the file that was there)" if existed else "")
          + f"; use it with: eekernels sample --schedule calibrated:{out}")
    return 0


def time_split(rep) -> list[str]:
    """The run's seconds, split: the calibration (the schedule), the held-out validation and the reference
    timing (each optional, with the flag that runs it)."""
    parts = [f"calibration {rep.seconds:.2f} s"]
    val = rep.validation
    parts.append(f"validation {val['seconds']:.2f} s ({len(val['plans']) + 1} sampling runs of {val['num_samples']} "
                 f"held-out noises)" if val is not None else "validation not run (--validate)")
    parts.append(f"reference timing {rep.reference_seconds:.2f} s (one full-depth sampling run of the calibration "
                 f"set)" if rep.reference_seconds is not None else "reference timing not run (--time-reference)")
    return parts
