"""``eekernels bench``: sampling throughput, full depth vs the ASE schedule vs plain torch, in one run.

The options and their checks; the benchmark itself (its rows, defaults and JSON) is :mod:`eekernels.eval.bench`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


# ---- options --------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a DiT config name (e.g. DiT-XL/2) or 'cpu-small' (None: DiT-XL/2 on CUDA, cpu-small "
                             "elsewhere)")
    parser.add_argument("--image-size", type=int, default=256, help="image size (latent = size / 8), DiT configs")
    parser.add_argument("--batch", type=int, default=None, help="images per run (None: 32 on CUDA, 4 on CPU)")
    parser.add_argument("--sampler", default="ddim", help="ddpm, ddim, dpmsolver++, euler or heun")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (None: 50 on CUDA, 10 on CPU)")
    parser.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale")
    parser.add_argument("--schedule", default=None,
                        help="ExitSchedule preset (None: ase-dit-xl for 28 blocks, else ase-demo)")
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
    parser.add_argument("--json", default="bench_sampling.json",
                        help="where to write the results as JSON (a path; relative to the working directory; '' "
                             "writes none); a file already there is replaced and the output says so")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")


def run(args) -> int:
    if args.device is not None:
        try:
            kind = torch.device(args.device).type
        except (RuntimeError, TypeError):
            raise ValueError(f"--device: expected cpu, cuda, cuda:N, ..., got {args.device!r}") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: {args.device!r} asked for, but CUDA is not available here")
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.batch is None:
        args.batch = 32 if cuda else 4
    if args.steps is None:
        args.steps = 50 if cuda else 10
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    if args.cache_k < 0:
        raise ValueError(f"--cache-k: expected an integer >= 0, got {args.cache_k}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected an integer >= 1, got {args.threads}")
    json_path = Path(args.json).resolve() if args.json else None
    if json_path is not None and json_path.is_dir():
        raise ValueError(f"--json: expected a file path, got the folder {args.json!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from eekernels.eval.bench import format_table, run_bench

    result = run_bench(args)
    print(format_table(result))
    if json_path is not None:
        existed = json_path.exists()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {json_path}" + (" (replaced the file that was there)" if existed else ""))
    return 0
