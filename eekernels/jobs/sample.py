"""``eekernels sample``: the main job.

With no arguments it loads the shipped ASE fine-tuned glyph DiT (``glyph-dit-ase``, nothing downloaded),
samples a grid of glyphs with DPM-Solver++ (20 steps) and classifier-free guidance under the model's exit
schedule on the best device available, writes ``samples.png``, and prints the images/s of early exit
against full depth: both measured in this run on the same noise and labels, interleaved over ``--repeats``
runs each (median ratio and its range; on the CPU on one thread). It also writes the base model
(``glyph-dit``) at full depth as ``samples_base_full_depth.png``, for the image quality early exit keeps.

``--checkpoint PATH`` takes any supported file instead: a shipped-format file, an ``eekernels finetune``
checkpoint, or a facebookresearch/DiT checkpoint (latent models write their latents unless ``--vae``
names a local diffusers ``AutoencoderKL`` folder to decode them).

Under torchrun (``torchrun --nproc_per_node=N -m eekernels sample --num-images M --out DIR``) the images are
sharded over the ranks by :func:`run_sharded`, with eekernels/jobs/distributed.py's seeds, files and gathering.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from eekernels.jobs import distributed

DEFAULT_MODEL = "glyph-dit-ase"
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "respaced")


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a shipped diffusion model: glyph-dit-ase (ASE fine-tuned), glyph-dit (its base), "
                        "glyph-dit-flow (flow matching) or glyph-dit-flow-distilled (its 4/8-step reflow)")
    p.add_argument("--checkpoint", default=None,
                   help="a model file instead of --model: the shipped format, an `eekernels finetune` output, or a "
                        "facebookresearch/DiT checkpoint")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for a facebookresearch checkpoint of an unnamed DiT size (None: from the "
                        "named config)")
    p.add_argument("--sampler", default=None,
                   help="ddpm | ddim | dpmsolver++ | euler | heun; flow models: flow_euler | flow_heun | "
                        "flow_dpmsolver++ (default: the model's own, see --steps; else dpmsolver++, flow_euler)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (>= 1; default: the model's own, e.g. 4 for glyph-dit-flow-distilled, else 20)")
    p.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                   help="how the steps are placed on the 1000 training timesteps (None: the solver's own, as in "
                        "diffusers: leading for ddpm/ddim, linspace for the others); respaced (ddim, ddpm only) is "
                        "DiT's create_diffusion spacing")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (1: no guidance; default: the model's own, 1 for a "
                        "guidance-distilled model, else 1.5)")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N output channels (None: all); 3 is DiT's forward_with_cfg rule, to "
                        "match facebookresearch/DiT's sample.py with its checkpoints")
    p.add_argument("--schedule", default="auto",
                   help="'auto' (the model's own, else ase-demo), a preset name, 'full', 'periodic:K:DEPTH' (for "
                        "--exit-policy cache), or depths per t-bin '12,12,10,...'")
    p.add_argument("--exit-policy", default="drop", choices=("drop", "cache"),
                   help="drop: skipped blocks add nothing (ASE); cache: they add what they added at the last "
                        "full-depth call (needs --schedule periodic:K:DEPTH)")
    p.add_argument("--num-images", type=int, default=10, help="image i gets label i %% classes")
    p.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded seed + i")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs of each mode (early exit, full depth), interleaved; the ratio printed is "
                        "their median, with its range")
    p.add_argument("--out", default=".",
                   help="output folder: samples.png, and samples_base_full_depth.png (shipped ASE model) or "
                        "samples_full_depth.png; a file already there is replaced and the output says so "
                        "(under torchrun: samples/, samples.npz, grid.png; a rerun resumes)")
    p.add_argument("--device", default=None, help="cuda, mps, cpu, ... (None: the best available)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder to decode latent models")
    p.add_argument("--no-compare", action="store_true",
                   help="only the early-exit run: no full-depth runs, no speed comparison, no full-depth grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    # ---- torchrun: multi-process options (eekernels/jobs/distributed.py) ----
    distributed.add_arguments(p)


def check_args(args) -> None:
    """The checks that need no model: ValueError naming the option, before anything is loaded."""
    from eekernels.samplers.solvers import SOLVERS

    for name in ("num_images", "steps", "repeats", "per_proc_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.cfg_channels is not None and args.cfg_channels < 1:
        raise ValueError(f"--cfg-channels: expected an integer >= 1 (or leave it out: all channels), "
                         f"got {args.cfg_channels}")
    if args.sampler is not None and args.sampler not in SOLVERS:
        raise ValueError(f"--sampler: expected one of {sorted(SOLVERS)}, got {args.sampler!r}")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale: expected a finite number, got {args.cfg_scale}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint: no such file {args.checkpoint!r}")
    if args.device is not None:
        parse_device(args.device)


def parse_device(spec: str) -> torch.device:
    """``--device`` as a torch.device that this machine has; ValueError otherwise."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N, mps, ..., got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {spec!r} asked for, but CUDA is not available here (torch {torch.__version__})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {spec!r} asked for, but {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device: {spec!r} asked for, but MPS is not available here")
    return device


def sampler_options(args) -> dict:
    """The keywords for ``eekernels.sample`` beyond solver/steps/CFG: only those the user gave."""
    options = {}
    if args.timestep_spacing is not None:
        options["timestep_spacing"] = args.timestep_spacing
    if args.cfg_channels is not None:
        options["cfg_channels"] = args.cfg_channels
    return options


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Model and schedule
# --------------------------------------------------------------------------------------------------
def load_model(args, device):
    """(model, name) for ``--checkpoint`` or else ``--model``; ValueError if it is not a diffusion model."""
    from eekernels.models.pretrained import PRETRAINED, load_diffusion_model

    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise ValueError(f"--checkpoint: expected a model file, got {str(args.checkpoint)!r} (no such file)")
        return load_diffusion_model(args.checkpoint, device, num_heads=args.num_heads, option="--checkpoint")
    if args.model not in PRETRAINED:
        raise ValueError(f"--model: expected a shipped model {sorted(PRETRAINED)} (or use --checkpoint PATH), "
                         f"got {args.model!r}")
    return load_diffusion_model(args.model, device, option="--model")


def model_defaults(model) -> dict:
    """The solver, steps and CFG scale ``model`` samples with unless told otherwise: those its file records in
    ``pretrained_meta["sampling"]`` (a few-step model: flow_euler, 4 steps, CFG 1), else DPM-Solver++ for an
    epsilon model or flow Euler for a flow model, 20 steps, CFG 1.5."""
    flow = getattr(model, "prediction", "epsilon") == "flow"
    out = {"sampler": "flow_euler" if flow else "dpmsolver++", "steps": 20, "cfg_scale": 1.5}
    declared = (getattr(model, "pretrained_meta", None) or {}).get("sampling") or {}
    out.update({k: declared[k] for k in out if k in declared})
    return out


def resolve_sampling(args, model, name: str) -> None:
    """``--sampler`` / ``--steps`` / ``--cfg-scale`` left out: :func:`model_defaults`. A sampler for the other kind
    of model (an epsilon solver for a flow model, or the reverse) is refused here, before any sampling."""
    from eekernels.samplers.solvers import SOLVERS

    for key, value in model_defaults(model).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    want = getattr(model, "prediction", "epsilon")
    if SOLVERS[args.sampler].prediction != want:
        fits = sorted(k for k, c in SOLVERS.items() if c.prediction == want)
        raise ValueError(f"--sampler: {name} predicts {want!r}, which {args.sampler!r} does not take; expected one "
                         f"of {fits}, got {args.sampler!r}")


def shipped_base(name: str) -> str | None:
    """The shipped model that shipped model ``name`` was fine-tuned from (its provenance record), or None."""
    from eekernels.models.pretrained import pretrained_names, provenance

    record = provenance().get(name)
    if not isinstance(record, dict):
        return None
    for r in (record, record.get("init") or {}):  # the last fine-tune, then the first one (from the base)
        base = r.get("from") if isinstance(r, dict) else None
        if base != name and base in pretrained_names():
            return base
    return None


def resolve_schedule(spec: str, model):
    """``--schedule``: :meth:`eekernels.schedules.ExitSchedule.from_spec`, with errors that name the option."""
    from eekernels.schedules import ExitSchedule

    return ExitSchedule.from_spec(spec, model, option="--schedule")


def flop_fraction(model, args, schedule) -> float:
    """The run's block-FLOP fraction (:meth:`ExitSchedule.block_flop_fraction`); checks --exit-policy against --schedule."""
    from eekernels.samplers import make_solver, plan_depths

    spacing = {"timestep_spacing": args.timestep_spacing} if args.timestep_spacing else {}
    default = model_defaults(model)  # for options not resolved yet (resolve_sampling)
    solver = make_solver(args.sampler or default["sampler"], args.steps or default["steps"], **spacing)
    try:
        plan_depths(model, solver, schedule, args.exit_policy)  # the checks sample() makes, before any work
    except ValueError as e:
        if args.exit_policy != "cache":
            raise
        raise ValueError(f"--exit-policy cache: needs a --schedule that runs full depth first and then again "
                         f"periodically, e.g. --schedule periodic:3:{max(1, model.num_blocks // 2)}; got --schedule "
                         f"{args.schedule!r}, whose first call is not at full depth") from None
    return 1.0 if schedule is None else schedule.block_flop_fraction(solver.timesteps)


# --------------------------------------------------------------------------------------------------
# Per-rank sampling (a torchrun runner calls this on its shard of noise and labels)
# --------------------------------------------------------------------------------------------------
def sample_images(model, noise: torch.Tensor, labels: torch.Tensor | None, *, sampler: str, steps: int,
                  cfg_scale: float, schedule, exit_policy: str = "drop", generator=None, **options) -> torch.Tensor:
    """Samples (n, C, H, W) for ``noise`` (n, C, H, W) and ``labels`` (n,) on the model's device.

    options: further keywords for ``eekernels.sample`` (``timestep_spacing``, ``cfg_channels``).
    """
    from eekernels.samplers import sample

    if labels is None or model.num_classes is None or getattr(model, "null_class", None) is None:
        cfg_scale = 1.0  # no guidance without a null class
        options.pop("cfg_channels", None)
    if model.num_classes is None:
        labels = None
    return sample(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, schedule=schedule,
                  exit_policy=exit_policy, generator=generator, **options)


def make_sample_fn(model, *, sampler: str, steps: int, cfg_scale: float, schedule, exit_policy: str = "drop",
                   **options):
    """``sample_fn(noise, labels, generator) -> images`` with the settings bound (what a sharded runner calls)."""

    def sample_fn(noise, labels, generator=None):
        return sample_images(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             schedule=schedule, exit_policy=exit_policy, generator=generator, **options)

    return sample_fn


def seeded_inputs(model, num_images: int, seed: int, device):
    """The seeded noise and labels of images 0..num_images-1 (:func:`eekernels.eval.images.seeded_inputs`) on ``device``."""
    from eekernels.eval.images import seeded_inputs as seeded

    shape = (model.in_channels, model.input_size, model.input_size)
    noise, labels = seeded(num_images, seed, model.num_classes, shape)
    return noise.to(device), None if labels is None else labels.to(device)


def _timed(fn, device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@contextmanager
def timing_threads(device):
    """On the CPU, torch on one thread for the timed runs (restored after); yields the thread count it set.

    With torch's default of one thread per core, every op waits for its slowest thread, so any other process on
    the cores stretches a run (one run per mode gave ratios from 0.28x to 3.69x on a loaded 2-core machine).
    One thread, plus interleaved repeats, keeps the ratio meaningful. Elsewhere nothing changes (yields None).
    """
    if device.type != "cpu":
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def time_interleaved(fns: dict, repeats: int, device, bar=None) -> dict:
    """{name: (seconds per run, first output)}: ``repeats`` runs of each fn, alternating (load drifts hit all)."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            out, seconds = _timed(fn, device)
            times[k].append(seconds)
            outs.setdefault(k, out)
            if bar is not None:
                bar.update()
    return {k: (times[k], outs[k]) for k in fns}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def to_pixels(x: torch.Tensor, vae_path: str | None) -> torch.Tensor | None:
    """(n, 3, H, W) images in [-1, 1] from samples; decodes latents with a local VAE; None if it cannot."""
    if x.shape[1] == 3:
        return x
    if vae_path:
        from diffusers.models import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True).to(x.device).eval()
        with torch.no_grad():
            return vae.decode(x / 0.18215).sample
    return None


def save_grid(path, images: torch.Tensor, nrow: int) -> None:
    """A PNG grid of float images (n, C, H, W) in [-1, 1], small glyphs scaled up to about 256 px."""
    from eekernels.eval.images import save_grid as grid, to_uint8

    grid(path, to_uint8(images), nrow, min_size=256)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def _write(path: Path, save) -> str:
    """``save(path)``; returns the note for the output: what was written, and whether it replaced a file."""
    existed = path.exists()
    save(path)
    return f"wrote {path}" + (" (replaced the file that was there)" if existed else "")


def run(args) -> int:
    check_args(args)
    if distributed.launched_by_torchrun():
        return run_sharded(args)
    from tqdm import tqdm

    device = parse_device(args.device) if args.device else best_device()
    model, name = load_model(args, device)
    resolve_sampling(args, model, name)
    schedule = resolve_schedule(args.schedule, model)
    frac = flop_fraction(model, args, schedule)
    options = sampler_options(args)
    noise, labels = seeded_inputs(model, args.num_images, args.seed, device)
    common = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, **options)
    compare = schedule is not None and not args.no_compare
    base_name = shipped_base(name) if (compare and not args.checkpoint) else None
    n = args.num_images
    print(f"eekernels sample: {name} ({model.num_blocks} blocks) on {device}, {args.sampler} {args.steps} steps, "
          f"CFG {args.cfg_scale}, {n} images, schedule "
          f"{getattr(schedule, 'name', 'full depth')} (block-FLOP fraction {frac:.3f})", flush=True)

    modes = {"early exit" if schedule is not None else "full depth":
             lambda: sample_images(model, noise, labels, **common, schedule=schedule, exit_policy=args.exit_policy)}
    if compare:
        modes["full depth"] = lambda: sample_images(model, noise, labels, **common, schedule=None)
    repeats = args.repeats if compare else 1
    bar = tqdm(total=len(modes) * repeats + (base_name is not None), desc="eekernels sample", unit="run",
               delay=1.0, disable=args.no_progress, file=sys.stderr)  # shown only if the job takes over a second
    with timing_threads(device) as threads:
        # Warm-up, untimed: on CUDA a whole run per mode (graph capture of every depth); elsewhere one step on
        # two images (lazy imports, allocator).
        for fn_schedule, policy in [(schedule, args.exit_policy), (None, "drop")][:len(modes)]:
            if device.type == "cuda":
                sample_images(model, noise, labels, **common, schedule=fn_schedule, exit_policy=policy)
            else:
                sample_images(model, noise[:2], None if labels is None else labels[:2], **{**common, "steps": 1},
                              schedule=fn_schedule if policy == "drop" else None)
        timed = time_interleaved(modes, repeats, device, bar)
    base_images = None
    if base_name is not None:  # untimed: the quality reference, not part of the speed comparison
        from eekernels.models.pretrained import load_pretrained

        base_images = sample_images(load_pretrained(base_name, device), noise, labels, **common, schedule=None)
        bar.update()
    bar.close()

    for mode, (times, _) in timed.items():
        med = statistics.median(times)
        runs = f" (median of {len(times)} runs)" if len(times) > 1 else ""
        print(f"  {mode:<10}: {n} images in {med:.2f} s = {n / med:.2f} images/s{runs}")
    if compare:
        ratios = [f / e for e, f in zip(timed["early exit"][0], timed["full depth"][0])]
        spread = (f"median of {len(ratios)} interleaved pairs, range {min(ratios):.2f}-{max(ratios):.2f}x; "
                  if len(ratios) > 1 else "one pair of runs; ")
        print(f"  early exit is {statistics.median(ratios):.2f}x the full-depth throughput ({spread}block-FLOP "
              f"fraction {frac:.3f}, ideal {1 / frac:.2f}x)")
    if threads is not None:
        print(f"  timed on 1 CPU thread (torch.set_num_threads(1) for the timed runs, then back to {threads}), so "
              "that other processes on the cores disturb the timings less")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Ten classes: rows of 5 up to ten images (0-4 over 5-9), rows of 10 beyond; else a square-ish grid.
    nrow = (5 if n <= 10 else 10) if model.num_classes == 10 else max(1, math.ceil(math.sqrt(n)))
    early = next(iter(timed.values()))[1]
    pixels = to_pixels(early, args.vae)
    if pixels is None:
        print("  " + _write(out_dir / "latents.pt", lambda p: torch.save(early.cpu(), p)))
        pixels = early[:, :3] / early[:, :3].abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        print("  latent model without --vae: samples.png previews 3 latent channels")
    print("  " + _write(out_dir / "samples.png", lambda p: save_grid(p, pixels, nrow))
          + f": {name}, {getattr(schedule, 'name', 'full depth')}")
    if base_images is not None:
        pix = to_pixels(base_images, args.vae)
        print("  " + _write(out_dir / "samples_base_full_depth.png", lambda p: save_grid(p, pix, nrow))
              + f": the base model {base_name} (that {name} was fine-tuned from) at full depth, same noise and "
                "labels, for comparing image quality")
    elif compare:
        pix = to_pixels(timed["full depth"][1], args.vae)
        if pix is not None:
            print("  " + _write(out_dir / "samples_full_depth.png", lambda p: save_grid(p, pix, nrow))
                  + f": the same model {name} at full depth (a model fine-tuned for early exit may look worse "
                    "there)")
    return 0


def run_sharded(args) -> int:
    """``torchrun ... -m eekernels sample --num-images M --out DIR``: this rank's share of the images.

    Model, schedule and solver are the single-process job's (above), so a sharded run samples exactly what one
    process would; seeds, sharding, files and gathering are eekernels/jobs/distributed.py's.
    """
    ctx = distributed.setup(args.device)
    try:
        model, name = load_model(args, ctx.device)
        resolve_sampling(args, model, name)
        schedule = resolve_schedule(args.schedule, model)
        flop_fraction(model, args, schedule)  # checks --exit-policy against --schedule
        options = sampler_options(args)
        fn = make_sample_fn(model, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                            schedule=schedule, exit_policy=args.exit_policy, **options)

        def sample_fn(noise, labels, generator):
            pixels = to_pixels(fn(noise, labels, generator), args.vae)
            if pixels is None:
                raise ValueError(f"--vae: {name} samples latents ({model.in_channels} channels); pass --vae to "
                                 "decode them into images")
            return pixels

        if ctx.is_main:
            print(f"eekernels sample: {name} on {ctx.world_size} process(es) ({ctx.backend or 'single'}, "
                  f"{ctx.device.type}), {args.num_images} images into {args.out}, {args.sampler} {args.steps} steps, "
                  f"CFG {args.cfg_scale}, schedule {getattr(schedule, 'name', 'full depth')}", flush=True)
        # Options left at their default stay out of run.json, so folders made before they existed still resume.
        run_config = {"model": name, "sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                      "schedule": repr(schedule), "exit_policy": args.exit_policy, "vae": args.vae, **options}
        size = model.input_size
        # Decoded latents: DiT's VAE (sd-vae-ft) gives 8 pixels per latent; a pixel model's images are its input.
        image_size = (size * 8, size * 8) if args.vae else (size, size)
        result = distributed.sample_to_folder(
            sample_fn, num_images=args.num_images, out_dir=args.out, noise_shape=(model.in_channels, size, size),
            batch_size=args.per_proc_batch_size, base_seed=args.seed, num_classes=model.num_classes, ctx=ctx,
            run_config=run_config, progress=not args.no_progress, image_size=image_size)
        if ctx.is_main:
            made = args.num_images - result["resumed"]
            print(f"  {made} new images ({result['resumed']} already written) in {result['seconds']:.2f} s = "
                  f"{result['images_per_s']:.2f} images/s over {ctx.world_size} process(es)")
            print(f"  wrote {result['npz']} (arr_0: uint8 N x H x W x C) and {result['grid']} (both remade from "
                  "the PNGs in samples/ on every run)")
    finally:
        distributed.teardown(ctx)
    return 0
