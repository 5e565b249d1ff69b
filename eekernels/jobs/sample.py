"""``eekernels sample``: the main job.

With no arguments it loads the shipped ASE fine-tuned glyph DiT (``glyph-dit-ase``, nothing downloaded),
samples a grid of glyphs with DPM-Solver++ (20 steps) and classifier-free guidance under the model's exit
schedule on the best device available, writes ``samples.png``, and prints the images/s of early exit
against full depth, both measured in this run on the same noise and labels.

``--checkpoint PATH`` takes any supported file instead: a shipped-format file, an ``eekernels finetune``
checkpoint, or a facebookresearch/DiT checkpoint (latent models write their latents unless ``--vae``
names a local diffusers ``AutoencoderKL`` folder to decode them).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "glyph-dit-ase"


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="a shipped model (eekernels.models.pretrained_names())")
    p.add_argument("--checkpoint", default=None, help="a model file instead of --model (facebookresearch DiT, ...)")
    p.add_argument("--num-heads", type=int, default=None, help="heads, for a checkpoint of an unnamed DiT size")
    p.add_argument("--sampler", default="dpmsolver++", help="ddpm | ddim | dpmsolver++ | euler | heun")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--schedule", default="auto",
                   help="'auto' (the model's own, else ase-demo), a preset name, 'full', or depths per t-bin '12,12,10,...'")
    p.add_argument("--exit-policy", default="drop", choices=("drop", "cache"))
    p.add_argument("--num-images", type=int, default=10, help="image i gets label i %% classes (default: 0-9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=".", help="output folder (samples.png)")
    p.add_argument("--device", default=None, help="default: the best available (cuda, mps, cpu)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder to decode latent models")
    p.add_argument("--no-compare", action="store_true", help="skip the full-depth run (no speed comparison)")
    # ---- torchrun: multi-process options (eekernels/jobs/distributed.py) ----
    from eekernels.jobs import distributed

    distributed.add_arguments(p)


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
    from eekernels.models.pretrained import load_model_file, load_pretrained

    if args.checkpoint:
        model = load_model_file(args.checkpoint, device, num_heads=args.num_heads)
        return model, str(args.checkpoint)
    return load_pretrained(args.model, device), args.model


def resolve_schedule(spec: str, model):
    """``auto`` | ``full`` | ``none`` | a preset | ``"d0,d1,..."`` -> an ExitSchedule for ``model`` (or None)."""
    from eekernels.schedules import PRESETS, ExitSchedule

    L = model.num_blocks
    spec = spec.strip()
    if spec in ("full", "none"):
        return None
    if spec == "auto":
        meta = (getattr(model, "pretrained_meta", None) or {}).get("schedule") or {}
        preset = meta.get("preset", "ase-demo")
        sched = ExitSchedule.preset(preset, L) if preset in PRESETS else None
        if meta.get("table") and (sched is None or list(sched.table) != list(meta["table"])):
            sched = ExitSchedule.piecewise(meta["table"], total_depth=L)  # the table it was tuned with
        sched.validate_for(model)
        return sched
    if spec in PRESETS:
        sched = ExitSchedule.preset(spec, L if spec != "ase-dit-xl" else None)
    elif spec.startswith("periodic:"):  # periodic:K:DEPTH, for --exit-policy cache
        _, k, d = spec.split(":")
        return ExitSchedule.periodic(int(k), int(d), L)
    else:
        try:
            depths = [int(v) for v in spec.split(",")]
        except ValueError:
            raise ValueError(f"--schedule: expected 'auto', 'full', a preset {sorted(PRESETS)}, 'periodic:K:D' "
                             f"or comma-separated depths, got {spec!r}") from None
        sched = ExitSchedule.piecewise(depths, total_depth=L)
    sched.validate_for(model)
    return sched


# --------------------------------------------------------------------------------------------------
# Per-rank sampling (a torchrun runner calls this on its shard of noise and labels)
# --------------------------------------------------------------------------------------------------
def sample_images(model, noise: torch.Tensor, labels: torch.Tensor | None, *, sampler: str, steps: int,
                  cfg_scale: float, schedule, exit_policy: str = "drop", generator=None) -> torch.Tensor:
    """Samples (n, C, H, W) for ``noise`` (n, C, H, W) and ``labels`` (n,) on the model's device."""
    from eekernels.samplers import sample

    if labels is None or model.num_classes is None or getattr(model, "null_class", None) is None:
        cfg_scale = 1.0  # no guidance without a null class
    if model.num_classes is None:
        labels = None
    return sample(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, schedule=schedule,
                  exit_policy=exit_policy, generator=generator)


def make_sample_fn(model, *, sampler: str, steps: int, cfg_scale: float, schedule, exit_policy: str = "drop"):
    """``sample_fn(noise, labels, generator) -> images`` with the settings bound (what a sharded runner calls)."""

    def sample_fn(noise, labels, generator=None):
        return sample_images(model, noise, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             schedule=schedule, exit_policy=exit_policy, generator=generator)

    return sample_fn


def seeded_inputs(model, num_images: int, seed: int, device):
    """Noise for image i from a CPU generator seeded ``seed + i`` (any device gives the same images); label ``i % classes``."""
    shape = (model.in_channels, model.input_size, model.input_size)
    g = torch.Generator()
    noise = torch.stack([torch.randn(shape, generator=g.manual_seed(seed + i)) for i in range(num_images)])
    labels = None if model.num_classes is None else torch.arange(num_images) % model.num_classes
    return noise.to(device), None if labels is None else labels.to(device)


def _timed(fn, device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


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
    from PIL import Image

    n, C, H, W = images.shape
    rows = math.ceil(n / nrow)
    pix = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torch.zeros((C, rows * (H + 2) + 2, nrow * (W + 2) + 2), dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, 2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + q * (W + 2): 2 + q * (W + 2) + W] = pix[k]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, 256 // max(H, W))  # small glyphs are hard to see: scale them up
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def run(args) -> int:
    if args.num_images < 1:
        raise ValueError(f"--num-images: expected >= 1, got {args.num_images}")
    if args.steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {args.steps}")
    # ---- torchrun: shard the images over the ranks, one PNG each, npz + grid (eekernels/jobs/distributed.py) ----
    from eekernels.jobs import distributed

    if distributed.launched_by_torchrun():
        return distributed.run_sample_job(args)
    device = torch.device(args.device) if args.device else best_device()
    model, name = load_model(args, device)
    schedule = resolve_schedule(args.schedule, model)
    noise, labels = seeded_inputs(model, args.num_images, args.seed, device)
    common = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale)
    compare = schedule is not None and not args.no_compare

    from eekernels.training.fidelity import block_flop_fraction

    frac = block_flop_fraction(model, args.sampler, args.steps, schedule, args.exit_policy)
    print(f"eekernels sample: {name} ({model.num_blocks} blocks) on {device}, {args.sampler} {args.steps} steps, "
          f"CFG {args.cfg_scale}, {args.num_images} images, schedule "
          f"{getattr(schedule, 'name', 'full depth')} (block-FLOP fraction {frac:.3f})", flush=True)

    # Warm-up, untimed: on CUDA a whole run per configuration (graph capture of every depth); elsewhere one
    # step on two images (lazy imports, allocator).
    configs = [(schedule, args.exit_policy)] + ([(None, "drop")] if compare else [])
    for sched, policy in configs:
        if device.type == "cuda":
            sample_images(model, noise, labels, **common, schedule=sched, exit_policy=policy)
        else:
            sample_images(model, noise[:2], None if labels is None else labels[:2], **{**common, "steps": 1},
                          schedule=sched if policy == "drop" else None)

    early, t_early = _timed(lambda: sample_images(model, noise, labels, **common, schedule=schedule,
                                                  exit_policy=args.exit_policy), device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Ten classes: rows of 5 up to ten images (0-4 over 5-9), rows of 10 beyond; else a square-ish grid.
    n = args.num_images
    nrow = (5 if n <= 10 else 10) if model.num_classes == 10 else max(1, math.ceil(math.sqrt(n)))
    tag = "early exit" if schedule is not None else "full depth"
    print(f"  {tag:<10}: {args.num_images} images in {t_early:.2f} s = {args.num_images / t_early:.2f} images/s")

    if compare:
        full, t_full = _timed(lambda: sample_images(model, noise, labels, **common, schedule=None), device)
        print(f"  {'full depth':<10}: {args.num_images} images in {t_full:.2f} s = {args.num_images / t_full:.2f} images/s")
        print(f"  early exit is {t_full / t_early:.2f}x the full-depth throughput "
              f"(block-FLOP fraction {frac:.3f}, ideal {1 / frac:.2f}x)")
        pix_full = to_pixels(full, args.vae)
        if pix_full is not None:
            save_grid(out_dir / "samples_full_depth.png", pix_full, nrow)

    pixels = to_pixels(early, args.vae)
    if pixels is None:
        torch.save(early.cpu(), out_dir / "latents.pt")
        pixels = early[:, :3] / early[:, :3].abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        print(f"  latent model without --vae: wrote {out_dir / 'latents.pt'}; samples.png previews 3 latent channels")
    save_grid(out_dir / "samples.png", pixels, nrow)
    print(f"  wrote {out_dir / 'samples.png'}")
    return 0
