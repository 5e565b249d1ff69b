"""``eekernels sample``: the main job.

With no arguments it loads the shipped ASE fine-tuned glyph DiT (``glyph-dit-ase``, nothing downloaded),
samples a grid of glyphs with DPM-Solver++ (20 steps) and classifier-free guidance under the model's exit
schedule on the best device available, writes ``samples.png``, and prints the images/s of early exit
against full depth: both measured in this run on the same noise and labels, interleaved over ``--repeats``
runs each after an untimed warm-up (the ratio of the median times, and the range of the pairs' ratios). On
the CPU the job samples on one torch thread and times the CPU time of that thread (:func:`one_thread`,
:func:`time_interleaved`). It also writes the base model (``glyph-dit``) at full depth as
``samples_base_full_depth.png``, for the image quality early exit keeps. Images are sampled in batches of
``--per-proc-batch-size`` (image i's noise is drawn when its batch is sampled) and at most
``MAX_MAIN_IMAGES`` of them: the main job keeps them for one grid. ``--schedule auto`` (the default) is the
schedule the model records; a model that records none (one not fine-tuned for early exit, such as ``glyph-dit``
or a facebookresearch/DiT checkpoint) samples at full depth, and the job prints a line saying so.

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

from eekernels.jobs import distributed, options

DEFAULT_MODEL = "glyph-dit-ase"
MAX_MAIN_IMAGES = 1024  # the main job holds its images for one grid; a folder of many images is the torchrun job's
MAIN_FILES = ("samples.png", "samples_full_depth.png", "samples_base_full_depth.png", "latents.pt")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "respaced")


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a shipped diffusion model: glyph-dit-ase (ASE fine-tuned) or glyph-dit (its base)")
    p.add_argument("--checkpoint", default=None,
                   help="a model file instead of --model: the shipped format, an `eekernels finetune` output, or a "
                        "facebookresearch/DiT checkpoint")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for a facebookresearch checkpoint of an unnamed DiT size (None: from the "
                        "named config)")
    p.add_argument("--sampler", default=None,
                   help="ddpm | ddim | dpmsolver++ | euler | heun; flow models: flow_euler | flow_heun | "
                        "flow_dpmsolver++ (default: a joint plan's schedule's own, else the model's own, see --steps; "
                        "else dpmsolver++, flow_euler)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (>= 1; default: a joint plan's schedule's own, else the model's own, e.g. 4 for "
                        "glyph-dit-flow-distilled, else 20)")
    p.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                   help="how the steps are placed on the 1000 training timesteps (None: the solver's own, as in "
                        "diffusers: leading for ddpm/ddim, linspace for the others); respaced (ddim, ddpm only) is "
                        "DiT's create_diffusion spacing")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (1: no guidance; default: the model's own, else 1.5)")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N output channels (None: all); 3 is DiT's forward_with_cfg rule, to "
                        "match facebookresearch/DiT's sample.py with its checkpoints")
    p.add_argument("--schedule", default="auto",
                   help="'auto' (the schedule the model records, e.g. glyph-dit-ase's; full depth for a model that "
                        "records none: one not fine-tuned for early exit), a preset name, 'full', 'periodic:K:DEPTH' "
                        "(for --exit-policy cache or forecast; DEPTH 0: no block between full calls, TaylorSeer's "
                        "shape), 'calibrated:FILE', or depths per t-bin '12,12,10,...'")
    p.add_argument("--exit-policy", default=_Unset("drop"), choices=("drop", "cache", "forecast"),
                   help="drop: skipped blocks add nothing (ASE); cache: they add what they added at the last "
                        "full-depth call (needs --schedule periodic:K:DEPTH); forecast: that, extrapolated in t from "
                        "the last two full calls (a joint plan's schedule, from `eekernels calibrate --search`: its "
                        "per-call policies unless given)")
    p.add_argument("--forecast-order", type=int, default=None, choices=(1, 2),
                   help="--exit-policy forecast: a line (1) or a parabola (2) in t through the last full calls "
                        "(default: the schedule's own, from `eekernels calibrate`, else 1)")
    p.add_argument("--forecast-target", default=None, choices=("residual", "blocks"),
                   help="--exit-policy forecast: extrapolate the skipped blocks' residual, or each skipped block's "
                        "attention and MLP outputs with its gates recomputed (blocks: DiT checkpoints; default: the "
                        "schedule's own, else residual)")
    p.add_argument("--num-images", type=int, default=10,
                   help=f"image i gets label i %% classes (main job: at most {MAX_MAIN_IMAGES})")
    p.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded seed + i")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs of each mode (early exit, full depth), interleaved after an untimed warm-up; "
                        "the ratio printed is that of the median times, with the range of the pairs' ratios")
    p.add_argument("--out", default=".",
                   help="output folder: samples.png, and samples_base_full_depth.png (shipped ASE model) or "
                        "samples_full_depth.png; a file already there is replaced and the output says so "
                        "(under torchrun: samples/, samples.npz, grid.png; a rerun resumes)")
    p.add_argument("--device", default=None, help="cuda, mps, cpu, ... (None: the best available)")
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder to decode a latent model's samples (refused for a "
                        "model that samples pixels)")
    p.add_argument("--no-compare", action="store_true",
                   help="only the early-exit run: no full-depth runs, no speed comparison, no full-depth grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    # ---- torchrun: multi-process options (eekernels/jobs/distributed.py) ----
    distributed.add_arguments(p)


def check_args(args) -> None:
    """The checks that need no model, before anything is loaded: ValueError naming the option."""
    from eekernels.models.pretrained import PRETRAINED
    from eekernels.samplers.solvers import SOLVERS

    options.positive(args, "num_images", "steps", "repeats", "per_proc_batch_size", "cfg_channels", "num_heads")
    if args.sampler is not None and args.sampler not in SOLVERS:
        raise ValueError(f"--sampler: expected one of {sorted(SOLVERS)}, got {args.sampler!r}")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale: expected a finite number, got {args.cfg_scale}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint: no such file {args.checkpoint!r}")
    if not args.checkpoint and args.model not in PRETRAINED:
        raise ValueError(f"--model: expected a shipped model {sorted(PRETRAINED)} (or use --checkpoint PATH), "
                         f"got {args.model!r}")
    options.seed_range(args.seed, args.num_images + args.per_proc_batch_size)  # the last batch is padded
    if args.device is not None:
        parse_device(args.device)
    if args.vae is not None and not (Path(args.vae) / "config.json").is_file():
        raise ValueError(f"--vae: expected a local diffusers AutoencoderKL folder (with config.json), got "
                         f"{args.vae!r}" + ("" if Path(args.vae).is_dir() else " (no such folder)"))
    if distributed.launched_by_torchrun():
        distributed.check_out(args.out)
    else:
        if args.num_images > MAX_MAIN_IMAGES:
            raise ValueError(f"--num-images: the main job keeps its images in memory for one grid and takes at most "
                             f"{MAX_MAIN_IMAGES}, got {args.num_images}; to write many images to a folder, run it "
                             f"under torchrun: torchrun --nproc_per_node=1 -m eekernels sample --num-images "
                             f"{args.num_images} --out DIR")
        options.output_folder(args.out, files=MAIN_FILES)


def parse_device(spec: str) -> torch.device:
    """``--device`` as a torch.device that this machine has; ValueError otherwise."""
    return options.parse_device(spec, "--device")


def sampler_options(args) -> dict:
    """The keywords for ``eekernels.sample`` beyond solver/steps/CFG: only those the user gave."""
    options = {}
    if args.timestep_spacing is not None:
        options["timestep_spacing"] = args.timestep_spacing
    if args.cfg_channels is not None:
        options["cfg_channels"] = args.cfg_channels
    for name in ("forecast_order", "forecast_target"):  # sample() commands: None leaves the schedule's own
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Model, schedule and the checks sample() makes
# --------------------------------------------------------------------------------------------------
def load_model(args, device):
    """(model, name) for ``--checkpoint`` or else ``--model``; ValueError if it is not a diffusion model or if a
    weight is NaN or Inf (its samples would not be finite)."""
    from eekernels.models.pretrained import PRETRAINED, load_diffusion_model

    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            raise ValueError(f"--checkpoint: expected a model file, got {str(args.checkpoint)!r} (no such file)")
        spec, option = args.checkpoint, "--checkpoint"
        kw = {"num_heads": args.num_heads, "config": getattr(args, "model_config", None),  # calibrate, finetune
              "config_option": "--model-config"}
    else:
        if args.model not in PRETRAINED:
            raise ValueError(f"--model: expected a shipped model {sorted(PRETRAINED)} (or use --checkpoint PATH), "
                             f"got {args.model!r}")
        spec, option, kw = args.model, "--model", {}
    return options.load_checked(lambda: load_diffusion_model(spec, device, option=option, **kw), option)


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


def auto_note(spec: str, model, schedule) -> str | None:
    """The line saying why ``--schedule auto`` gave full depth, or None: another spec, or the schedule the model
    records (which the job's first line names)."""
    from eekernels.schedules import ExitSchedule

    if spec.strip() != "auto" or schedule is not None:
        return None
    if ExitSchedule.recorded(model) is not None:
        return "schedule auto: full depth (the model records a full-depth fine-tune)"
    return ("schedule auto: full depth (the model records no early-exit schedule; pass --schedule ase-demo or "
            "calibrated:FILE to exit early)")


class _Unset(str):
    """An option's default, told apart from the same value given (a joint plan's schedule fills in what was not
    given; ``--help`` shows the value)."""


def model_defaults(model) -> dict:
    """The solver, steps and CFG scale ``model`` samples with unless told otherwise: those its file records in
    ``pretrained_meta["sampling"]`` (a few-step model: flow_euler, 4 steps, CFG 1), else DPM-Solver++ for an
    epsilon model or flow Euler for a flow model, 20 steps, CFG 1.5."""
    flow = getattr(model, "prediction", "epsilon") == "flow"
    out = {"sampler": "flow_euler" if flow else "dpmsolver++", "steps": 20, "cfg_scale": 1.5}
    declared = (getattr(model, "pretrained_meta", None) or {}).get("sampling") or {}
    out.update({k: declared[k] for k in out if k in declared})
    return out


def plan_args(args, schedule, model, name: str = "the model") -> None:
    """--sampler, --steps and --exit-policy from a joint plan (``ExitSchedule.steps``, ``.sampler``, ``.policies``:
    ``eekernels calibrate --search``) where not given, else the model's own (:func:`model_defaults`) and drop;
    --cfg-scale left out: the model's own. One that contradicts the plan is refused, naming the option, and so is a
    sampler for the other kind of model (an epsilon solver for a flow model, or the reverse). A plan of several
    policies leaves ``args.exit_policy`` None (sample() follows its per-call policies)."""
    from eekernels.samplers.sampling import resolve_plan
    from eekernels.samplers.solvers import SOLVERS

    own = model_defaults(model)
    policy = None if isinstance(args.exit_policy, _Unset) else args.exit_policy
    try:
        args.sampler, args.steps, policy, mixed = resolve_plan(schedule, args.sampler, args.steps, policy,
                                                               defaults=(own["sampler"], own["steps"]))
    except ValueError as e:
        raise ValueError(options.as_option(str(e), _CLI_NAMES, "--schedule")) from None
    args.exit_policy = None if mixed else policy
    if args.cfg_scale is None:
        args.cfg_scale = own["cfg_scale"]
    want = getattr(model, "prediction", "epsilon")
    if SOLVERS[args.sampler].prediction != want:
        fits = sorted(k for k, c in SOLVERS.items() if c.prediction == want)
        raise ValueError(f"--sampler: {name} predicts {want!r}, which {args.sampler!r} does not take; expected one "
                         f"of {fits}, got {args.sampler!r}")


def call_options(model, args) -> dict:
    """The keywords of ``eekernels.sample`` for this model: solver, steps, CFG and the options the user gave.
    A model without a null class samples without guidance."""
    kw = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, **sampler_options(args))
    if model.num_classes is None or getattr(model, "null_class", None) is None:
        kw["cfg_scale"] = 1.0  # no guidance without a null class
        kw.pop("cfg_channels", None)
    return kw


_CLI_NAMES = {"sampler": "--sampler", "steps": "--steps", "cfg_scale": "--cfg-scale", "cfg_channels": "--cfg-channels",
              "timestep_spacing": "--timestep-spacing", "exit_policy": "--exit-policy", "schedule": "--schedule",
              "forecast_order": "--forecast-order", "forecast_target": "--forecast-target"}


def check_call(model, args, schedule) -> None:
    """Every input check ``eekernels.sample`` makes before its first model call, on a one-image probe (nothing is
    run), with errors naming the CLI option."""
    from eekernels.samplers.sampling import (_check_inputs, check_forecast_target, resolve_forecast_order,
                                             resolve_forecast_target)

    kw = call_options(model, args)
    probe = torch.zeros(1, model.in_channels, model.input_size, model.input_size)
    label = None if model.num_classes is None else torch.zeros(1, dtype=torch.long)
    try:
        _check_inputs(model, probe, label, kw["sampler"], kw["steps"], kw["cfg_scale"], args.exit_policy or "forecast",
                      schedule,
                      None, kw.get("cfg_channels"))
        resolve_forecast_order(schedule, kw.get("forecast_order"))
        check_forecast_target(resolve_forecast_target(schedule, kw.get("forecast_target")), model,
                              args.exit_policy or "forecast")
    except ValueError as e:
        other = "--checkpoint" if args.checkpoint else "--model"
        raise ValueError(options.as_option(str(e), _CLI_NAMES, other)) from None


def flop_fraction(model, args, schedule) -> float:
    """The run's block-FLOP fraction (:meth:`ExitSchedule.block_flop_fraction`); checks --timestep-spacing against
    --sampler and --exit-policy against --schedule, as ``eekernels.sample`` would."""
    from eekernels.samplers import make_solver, plan_depths

    spacing = {"timestep_spacing": args.timestep_spacing} if args.timestep_spacing else {}
    try:
        solver = make_solver(args.sampler, args.steps, **spacing)
    except ValueError as e:
        raise ValueError(options.as_option(str(e), _CLI_NAMES, "--sampler")) from None
    try:
        plan_depths(model, solver, schedule, args.exit_policy or "forecast")  # sample()'s checks (None: a mixed plan)
    except ValueError as e:
        if args.exit_policy != "cache" or "full-depth call" not in str(e):
            raise ValueError(options.as_option(str(e), _CLI_NAMES, "--schedule")) from None
        raise ValueError(f"--exit-policy cache: needs a --schedule that runs full depth first and then again "
                         f"periodically, e.g. --schedule periodic:3:{max(1, model.num_blocks // 2)}; got --schedule "
                         f"{args.schedule!r}, whose first call is not at full depth") from None
    return 1.0 if schedule is None else schedule.block_flop_fraction(solver.timesteps)


def load_vae(args, model, name: str, device):
    """The ``--vae`` AutoencoderKL on ``device`` (None without ``--vae``), checked against the model's latents."""
    if args.vae is None:
        return None
    if model.in_channels == 3:
        raise ValueError(f"--vae: {name} samples images (3 channels), not latents; leave --vae out")
    from diffusers.models import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"--vae: cannot load a diffusers AutoencoderKL from {args.vae!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if vae.config.latent_channels != model.in_channels:
        raise ValueError(f"--vae: {args.vae!r} decodes {vae.config.latent_channels}-channel latents, {name} samples "
                         f"{model.in_channels} channels")
    options.finite_weights(vae, "--vae", repr(args.vae))
    return vae.to(device).eval()


def pixel_size(model, vae) -> int:
    """The side of the images a run writes: the model's input, times the VAE's upsampling when decoding."""
    return model.input_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)


def prepare(args, device):
    """(model, name, schedule, block-FLOP fraction, sample() keywords, vae): every check that needs the model, in
    the order the options are read; nothing is sampled or written."""
    model, name = load_model(args, device)
    option = "--checkpoint" if args.checkpoint else "--model"
    if getattr(model, "condition", "label") == "text":
        raise ValueError(f"{option}: {name} is a text-conditioned {type(model).__name__}; `eekernels sample` takes "
                         "class-conditional and unconditional models (sample it with eekernels.sample() and a "
                         "TextCondition)")
    if getattr(model, "input_size", None) is None:
        raise ValueError(f"{option}: {name} ({type(model).__name__}) has no fixed input size; `eekernels sample` "
                         "takes models with one")
    schedule = resolve_schedule(args.schedule, model)
    plan_args(args, schedule, model, name)
    check_call(model, args, schedule)
    frac = flop_fraction(model, args, schedule)
    vae = load_vae(args, model, name, device)
    return model, name, schedule, frac, call_options(model, args), vae


# --------------------------------------------------------------------------------------------------
# Sampling in batches (a torchrun runner calls sample_images on its batches of noise and labels)
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


def seeded_inputs(model, num_images: int, seed: int, device, start: int = 0):
    """The seeded noise and labels of images start..start+num_images-1 (:mod:`eekernels.eval.images`: image i's
    noise from a CPU generator seeded seed + i, label i % classes) on ``device``."""
    from eekernels.eval.images import image_labels, seeded_noise

    idx = range(start, start + num_images)
    noise = seeded_noise(idx, (model.in_channels, model.input_size, model.input_size), seed)
    labels = image_labels(idx, model.num_classes)
    return noise.to(device), None if labels is None else labels.to(device)


def batches(n: int, batch_size: int) -> list[range]:
    """Images 0..n-1 in batches of ``batch_size`` (the last one shorter)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def sample_batches(sample_fn, model, n: int, batch_size: int, seed: int, device) -> torch.Tensor:
    """Images 0..n-1 (on the CPU), each batch's noise drawn when that batch is sampled."""
    outs = []
    for b in batches(n, batch_size):
        noise, labels = seeded_inputs(model, len(b), seed, device, start=b.start)
        outs.append(sample_fn(noise, labels).cpu())
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@contextmanager
def one_thread(device):
    """On the CPU, torch on one thread while the job samples (restored after); yields the thread count it replaced.

    With torch's default of one thread per core, every op waits for its slowest thread, so any other process on
    the cores stretches a run (one run per mode gave ratios from 0.28x to 3.69x on a loaded 2-core machine, and
    an untimed base-model run took 30 s instead of 1.2 s). On one thread all of torch's work runs on the calling
    thread, so that thread's CPU time is the run's compute time (:func:`clock`). Elsewhere nothing changes
    (yields None).
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


def clock(device):
    """The clock the job times with: on the CPU the calling thread's CPU time (``time.thread_time``: time spent
    waiting for a core is not counted, and under :func:`one_thread` all of torch's work is on this thread);
    elsewhere wall time, with the device synchronized before each reading."""
    if device.type == "cpu":
        return time.thread_time

    def wall():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return wall


def time_interleaved(fns: dict, repeats: int, device, bar=None) -> dict:
    """{name: (times, wall times, first output)}: ``repeats`` runs of each fn, alternating (load drifts hit all);
    times by :func:`clock`."""
    now = clock(device)
    times, walls, outs = {k: [] for k in fns}, {k: [] for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, t0 = time.perf_counter(), now()
            out = fn()
            t1 = now()
            times[k].append(t1 - t0)
            walls[k].append(time.perf_counter() - w0)
            outs.setdefault(k, out)
            if bar is not None:
                bar.update()
    return {k: (times[k], walls[k], outs[k]) for k in fns}


def speed_ratio(early: list[float], full: list[float]) -> tuple[float, float, float]:
    """(median full time / median early time, lowest and highest ratio of an interleaved pair).

    The ratio of medians, not the median of the pairs' ratios: on a loaded 2-core machine, over windows of 5
    pairs of CPU times, it spread 0.07x where the median of ratios spread 0.11x (25 pairs, one process).
    """
    pairs = [f / e for e, f in zip(early, full)]
    return statistics.median(full) / statistics.median(early), min(pairs), max(pairs)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def to_pixels(x: torch.Tensor, vae) -> torch.Tensor | None:
    """(n, 3, H, W) images in [-1, 1] from samples; decodes latents with ``vae`` (:func:`load_vae`, on x's device
    or the samples are moved to it), in batches; None for latents without a VAE."""
    if x.shape[1] == 3:
        return x
    if vae is None:
        return None
    dev = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for chunk in x.split(16):
            out.append(vae.decode(chunk.to(dev) / vae.config.scaling_factor).sample.to(x.device))
    return torch.cat(out)


def save_grid(path, images: torch.Tensor, nrow: int) -> None:
    """A PNG grid of float images (n, C, H, W) in [-1, 1], small glyphs scaled up to about 256 px."""
    from eekernels.eval.images import save_grid as grid, to_uint8

    grid(path, to_uint8(images), nrow, min_size=256)


def _write(path: Path, save) -> str:
    """``save(path)``; returns the note for the output: what was written, and whether it replaced a file."""
    existed = path.exists()
    save(path)
    return f"wrote {path}" + (" (replaced the file that was there)" if existed else "")


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def run(args) -> int:
    check_args(args)
    if distributed.launched_by_torchrun():
        return run_sharded(args)
    from tqdm import tqdm

    device = parse_device(args.device) if args.device else best_device()
    model, name, schedule, frac, common, vae = prepare(args, device)
    compare = schedule is not None and not args.no_compare
    base_name = shipped_base(name) if (compare and not args.checkpoint) else None
    n, bs = args.num_images, args.per_proc_batch_size
    print(f"eekernels sample: {name} ({model.num_blocks} blocks) on {device}, {args.sampler} {args.steps} steps, "
          f"CFG {args.cfg_scale}, {n} images" + (f" in batches of {bs}" if n > bs else "") + ", schedule "
          f"{getattr(schedule, 'name', 'full depth')} (block-FLOP fraction {frac:.3f})", flush=True)
    note = auto_note(args.schedule, model, schedule)
    if note:
        print(f"  {note}", flush=True)

    def full_depth(kw):  # a run without a schedule (the comparison, warm-ups): no forecast to configure
        return {k: v for k, v in kw.items() if k not in ("forecast_order", "forecast_target")}

    def run_mode(m, sched, policy, **over):
        kw = {**common, **over}
        fn = make_sample_fn(m, **(kw if sched is not None else full_depth(kw)), schedule=sched, exit_policy=policy)
        return lambda: sample_batches(fn, m, n, bs, args.seed, device)

    modes = {"early exit" if schedule is not None else "full depth": (schedule, args.exit_policy)}
    if compare:
        modes["full depth"] = (None, "drop")
    repeats = args.repeats if compare else 1
    bar = tqdm(total=len(modes) * repeats + (base_name is not None), desc="eekernels sample", unit="run",
               delay=1.0, disable=args.no_progress, file=sys.stderr)  # shown only if the job takes over a second
    with one_thread(device) as threads:
        # Warm-up, untimed: on CUDA a whole run per mode (graph capture of every depth); elsewhere the first batch
        # for a few steps (lazy imports, the allocator's buffers at the batch's sizes).
        for sched, policy in modes.values():
            if device.type == "cuda":
                run_mode(model, sched, policy)()
            else:
                noise, labels = seeded_inputs(model, min(n, bs), args.seed, device)
                make_sample_fn(model, **full_depth({**common, "steps": min(args.steps, 3)}),  # cache: at full depth
                               schedule=sched if policy == "drop" and getattr(sched, "steps", None) is None
                               else None)(noise, labels)  # a plan's steps are fixed: warmed at full depth
        timed = time_interleaved({k: run_mode(model, *v) for k, v in modes.items()}, repeats, device, bar)
        base_images = None
        if base_name is not None:  # untimed: the quality reference, not part of the speed comparison
            from eekernels.models.pretrained import load_pretrained

            base = load_pretrained(base_name, device)
            base_images = run_mode(base, None, "drop", **call_options(base, args))()
            bar.update()
    bar.close()

    cpu = device.type == "cpu"
    for mode, (times, walls, _) in timed.items():
        med = statistics.median(times)
        runs = f", median of {len(times)} runs" if len(times) > 1 else ""
        wall = f" of CPU time ({statistics.median(walls):.2f} s wall)" if cpu else ""
        print(f"  {mode:<10}: {n} images in {med:.2f} s{wall} = {n / med:.2f} images/s{runs}")
    if compare:
        ratio, low, high = speed_ratio(timed["early exit"][0], timed["full depth"][0])
        how = (f"ratio of the median times of {repeats} interleaved runs each, pairs {low:.2f}-{high:.2f}x"
               if repeats > 1 else "one pair of runs")
        print(f"  early exit is {ratio:.2f}x the full-depth throughput ({how}; block-FLOP fraction {frac:.3f}, "
              f"ideal {1 / frac:.2f}x)")
    if threads is not None:
        print(f"  sampled on 1 CPU thread (torch.set_num_threads(1), then back to {threads}) after an untimed "
              "warm-up; times are that thread's CPU time, so waiting for a core on a busy machine does not count "
              "(not pinned to a core: caches and clock speed are still shared)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Ten classes: rows of 5 up to ten images (0-4 over 5-9), rows of 10 beyond; else a square-ish grid.
    nrow = (5 if n <= 10 else 10) if model.num_classes == 10 else max(1, math.ceil(math.sqrt(n)))
    early = next(iter(timed.values()))[2]
    pixels = to_pixels(early, vae)
    if pixels is None:
        print("  " + _write(out_dir / "latents.pt", lambda p: torch.save(early.cpu(), p)))
        pixels = early[:, :3] / early[:, :3].abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        print("  latent model without --vae: samples.png previews 3 latent channels")
    print("  " + _write(out_dir / "samples.png", lambda p: save_grid(p, pixels, nrow))
          + f": {name}, {getattr(schedule, 'name', 'full depth')}")
    if base_images is not None:
        pix = to_pixels(base_images, vae)
        print("  " + _write(out_dir / "samples_base_full_depth.png", lambda p: save_grid(p, pix, nrow))
              + f": the base model {base_name} (that {name} was fine-tuned from) at full depth, same noise and "
                "labels, for comparing image quality")
    elif compare:
        pix = to_pixels(timed["full depth"][2], vae)
        if pix is not None:
            print("  " + _write(out_dir / "samples_full_depth.png", lambda p: save_grid(p, pix, nrow))
                  + f": the same model {name} at full depth (a model fine-tuned for early exit may look worse "
                    "there)")
    return 0


def run_sharded(args) -> int:
    """``torchrun ... -m eekernels sample --num-images M --out DIR``: this rank's share of the images.

    Model, schedule and solver are the single-process job's (above), checked the same way before any image is
    sampled or any file written; batches, seeds, files and gathering are eekernels/jobs/distributed.py's.
    """
    ctx = distributed.setup(args.device)
    try:
        model, name, schedule, _, common, vae = prepare(args, ctx.device)
        if model.in_channels != 3 and vae is None:
            raise ValueError(f"--vae: {name} samples latents ({model.in_channels} channels); pass --vae to decode "
                             "them into images")
        fn = make_sample_fn(model, **common, schedule=schedule, exit_policy=args.exit_policy)

        def sample_fn(noise, labels, generator):
            return to_pixels(fn(noise, labels, generator), vae)

        if ctx.is_main:
            print(f"eekernels sample: {name} on {ctx.world_size} process(es) ({ctx.backend or 'single'}, "
                  f"{ctx.device.type}), {args.num_images} images into {args.out} in batches of "
                  f"{args.per_proc_batch_size}, {args.sampler} {args.steps} steps, CFG {args.cfg_scale}, schedule "
                  f"{getattr(schedule, 'name', 'full depth')}", flush=True)
            note = auto_note(args.schedule, model, schedule)
            if note:
                print(f"  {note}", flush=True)
        # Options left at their default stay out of run.json, so folders made before they existed still resume.
        run_config = {"model": name, "sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
                      "schedule": repr(schedule), "exit_policy": args.exit_policy, "vae": args.vae,
                      **sampler_options(args)}
        size = pixel_size(model, vae)
        result = distributed.sample_to_folder(
            sample_fn, num_images=args.num_images, out_dir=args.out,
            noise_shape=(model.in_channels, model.input_size, model.input_size), batch_size=args.per_proc_batch_size,
            base_seed=args.seed, num_classes=model.num_classes, ctx=ctx, run_config=run_config,
            progress=not args.no_progress, image_size=(size, size))
        if ctx.is_main:
            made = args.num_images - result["resumed"]
            print(f"  {made} new images ({result['resumed']} already written) in {result['seconds']:.2f} s = "
                  f"{result['images_per_s']:.2f} images/s over {ctx.world_size} process(es)")
            print(f"  wrote {result['npz']} (arr_0: uint8 N x H x W x C) and {result['grid']} (both remade from "
                  "the PNGs in samples/ on every run)")
    finally:
        distributed.teardown(ctx)
    return 0
