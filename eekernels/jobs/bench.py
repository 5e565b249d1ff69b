"""``eekernels bench``: sampling throughput, full depth vs the ASE schedule vs plain torch, in one run.

The options and their checks (all made before the benchmark builds anything); the benchmark itself (its rows,
defaults and JSON) is :mod:`eekernels.eval.bench`.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from eekernels.jobs import options


# ---- options --------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a shipped diffusion model (glyph-dit-ase, glyph-dit: their trained weights), a DiT "
                             "config name (e.g. DiT-XL/2, random weights) or 'cpu-small' (None: "
                             "DiT-XL/2 on CUDA, cpu-small elsewhere)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image size (latent = size / 8), DiT configs only")
    parser.add_argument("--batch", type=int, default=None, help="images per run (None: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--sampler", default="ddim", help="ddpm, ddim, dpmsolver++, euler or heun")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (None: 50 on CUDA, 10 on CPU)")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale")
    parser.add_argument("--schedule", default=None,
                        help="an exit schedule as `eekernels sample --schedule` takes it, not 'full' (None: the "
                             "schedule a shipped model records, e.g. glyph-dit-ase's; else ase-dit-xl for 28 blocks, "
                             "ase-demo otherwise)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model and noise dtype (None: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (None: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system (after one warm-up run)")
    parser.add_argument("--cache-k", type=int, default=0,
                        help="also run exit_policy='cache' with periodic(k, ...) (0: no such row)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row on CUDA")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (None: torch's); 1 is fastest for small CPU sizes on busy hosts")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, noise and labels")
    parser.add_argument("--json", default=None,
                        help="also write the results as JSON to this file (None: none); a file already there is "
                             "replaced and the output says so")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")


def check_args(args) -> None:
    """Every check that needs no model, in place (the CPU/CUDA defaults filled in); ValueError naming the option."""
    from eekernels.eval.bench import CPU_MODEL_NAME
    from eekernels.models import DIT_CONFIGS
    from eekernels.models.pretrained import PRETRAINED
    from eekernels.samplers.solvers import SOLVERS

    if args.device is not None:
        options.parse_device(args.device, "--device")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.batch is None:
        args.batch = 32 if cuda else 4
    if args.steps is None:
        args.steps = 50 if cuda else 10
    options.positive(args, "batch", "steps", "repeats", "threads")
    options.positive(args, "cache_k", minimum=0)
    if args.sampler not in SOLVERS:
        raise ValueError(f"--sampler: expected one of {sorted(SOLVERS)}, got {args.sampler!r}")
    if not math.isfinite(args.cfg):
        raise ValueError(f"--cfg: expected a finite number, got {args.cfg}")
    options.seed_range(args.seed, 1)
    known = [CPU_MODEL_NAME, *sorted(PRETRAINED), *DIT_CONFIGS]
    if args.model is not None and args.model not in known:
        raise ValueError(f"--model: expected one of {known}, got {args.model!r}")
    if args.model in DIT_CONFIGS or (args.model is None and cuda):
        patch = DIT_CONFIGS[args.model or "DiT-XL/2"]["patch_size"]
        if args.image_size < 8 or args.image_size % (8 * patch):
            raise ValueError(f"--image-size: expected a positive multiple of {8 * patch} (the latent, size / 8, in "
                             f"patches of {patch}), got {args.image_size}")
    if args.schedule is not None and args.schedule.strip() in ("full", "none"):
        raise ValueError(f"--schedule: expected an exit schedule (bench compares it with full depth), got "
                         f"{args.schedule!r}")
    if args.json:
        options.output_file(args.json, "--json")


def run(args) -> int:
    check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from eekernels.eval.bench import build, format_table, run_bench

    result = run_bench(args, build(args))  # build checks the model and the schedule, then the timing starts
    print(format_table(result))
    if args.json:
        path = options.output_file(args.json, "--json")
        existed = path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}" + (" (replaced the file that was there)" if existed else ""))
    return 0
