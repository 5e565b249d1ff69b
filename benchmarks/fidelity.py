"""Fidelity benchmark: does ASE early exit keep image quality? (issue 4/5; results in benchmarks/RESULTS.md)

    python benchmarks/fidelity.py                     # the shipped models and judge: 3 seeds x 500 samples per variant
    python benchmarks/fidelity.py --quick             # CI: 1 seed x 40 samples, 8 solver steps, CPU, under a minute
    python benchmarks/fidelity.py --full --device cuda --minutes 5 --out DIR
                                                      # retrain everything first (python/train_glyphs.py)
    python benchmarks/fidelity.py --extra distilled=RUN/model.pt --skip cache
                                                      # also a model fine-tuned by `eekernels finetune`, under
                                                      # its own schedule (and the base naive under it)

Variants (same noise, labels, solver, steps and CFG): the base glyph DiT at full depth; the base model
under the ASE schedule without fine-tuning (naive truncation); the ASE fine-tuned model under that
schedule; and the base model with ``exit_policy="cache"`` under a periodic schedule. Reported: judge
accuracy, Fréchet distance in the judge's penultimate features against fresh real glyphs, block-FLOP
fraction and sampling wall time; every figure with its bootstrap interval over samples and seeds, and each
gap to full depth stated as "within noise" or "worse/better by X [lo, hi]". ``--json PATH`` writes the rows; ``--grid PATH`` a PNG of the samples.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI mode: few samples and steps")
    p.add_argument("--full", action="store_true", help="train the models and the judge first (python/train_glyphs.py)")
    p.add_argument("--samples", type=int, default=None, help="samples per variant (default 2000; --quick 40)")
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 20; --quick 8)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=2024, help="first seed (--seeds N: seeds SEED .. SEED+N-1)")
    p.add_argument("--seeds", type=int, default=None, help="independent seeds of noise, labels and real set "
                   "(default 3; --quick 1)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap replicates per interval (default 200; "
                   "--quick 50; 0: no intervals)")
    p.add_argument("--frechet", choices=["plain", "debiased"], default="plain",
                   help="Fréchet estimate: plain, or debiased (FD-infinity, extrapolated to infinite samples)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--base", default="glyph-dit", help="base model: shipped name or file")
    p.add_argument("--finetuned", default="glyph-dit-ase", help="ASE fine-tuned model: shipped name or file")
    p.add_argument("--judge", default="glyph-judge", help="judge: shipped name or file")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FILE",
                   help="another fine-tuned model (e.g. an `eekernels finetune` model.pt), evaluated as row NAME "
                        "under the schedule it was trained with, plus the base model's naive truncation under that "
                        "schedule (row naive@NAME); repeatable")
    p.add_argument("--skip", default="", help="comma-separated default rows to leave out (ase-naive, cache, ...)")
    p.add_argument("--json", default=None, help="write the result rows here")
    p.add_argument("--grid", default=None, help="write a PNG here: the first 10 samples of each variant, a row each")
    p.add_argument("--out", default=None, help="--full: output folder")
    p.add_argument("--minutes", type=float, default=5.0, help="--full: training time budget")
    args, rest = p.parse_known_args(argv)
    return args, rest


def _load(spec: str, device):
    from eekernels.models.pretrained import PRETRAINED, load_model_file, load_pretrained

    return load_pretrained(spec, device) if spec in PRETRAINED else load_model_file(spec, device)


def _trained_schedule(model, num_blocks: int):
    """The t-indexed schedule a fine-tuned model records it was trained under (``pretrained_meta``), or None."""
    from eekernels.schedules import ExitSchedule

    meta = (getattr(model, "pretrained_meta", None) or {}).get("schedule") or {}
    if not meta.get("table"):
        return None
    sched = ExitSchedule(meta["table"], num_blocks, uncond=meta.get("uncond"))
    name = meta.get("preset") or "piecewise"
    sched.name = name if "(" in name else f"{name}({num_blocks})"
    return sched


def main(argv=None) -> dict:
    args, rest = parse_args(argv)
    if args.full:  # everything from scratch, then this benchmark over the new files (inside train_glyphs)
        sys.path.insert(0, str(ROOT / "python"))
        import train_glyphs

        if not args.out:
            raise SystemExit("--full needs --out DIR")
        extra = ["--out", args.out, "--minutes", str(args.minutes)]
        if args.device:
            extra += ["--device", args.device]
        if args.samples:
            extra += ["--samples", str(args.samples)]
        return train_glyphs.main(extra + rest)
    if rest:
        raise SystemExit(f"unknown arguments: {rest}")

    from eekernels.eval import fidelity

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = args.samples or (40 if args.quick else 500)
    n_seeds = args.seeds or (1 if args.quick else 3)
    boot = (50 if args.quick else 200) if args.bootstrap is None else args.bootstrap
    steps = args.steps or (8 if args.quick else 20)
    models = {"base": _load(args.base, device), "finetuned": _load(args.finetuned, device)}
    judge = _load(args.judge, device)
    L = models["base"].num_blocks
    variants = fidelity.default_variants(L)
    tuned = _trained_schedule(models["finetuned"], L)
    if tuned is not None:  # evaluate under the schedule the model was tuned with
        variants[1].schedule = variants[2].schedule = tuned
    skip = {v for v in args.skip.split(",") if v}
    unknown = skip - {v.name for v in variants}
    if unknown:
        raise SystemExit(f"--skip: expected names of default rows {[v.name for v in variants]}, got {sorted(unknown)}")
    variants = [v for v in variants if v.name not in skip]
    for spec in args.extra:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in models:
            raise SystemExit(f"--extra: expected NAME=FILE with a new NAME, got {spec!r}")
        models[name] = _load(path, device)
        sched = _trained_schedule(models[name], L)
        if sched is None:
            raise SystemExit(f"--extra {name}: {path} records no exit schedule it was trained under")
        variants += [fidelity.Variant(f"naive@{name}", "base", sched), fidelity.Variant(name, name, sched)]
    result = fidelity.evaluate(models, judge, variants=variants, num_samples=samples, sampler=args.sampler,
                               steps=steps, cfg_scale=args.cfg_scale, seed=args.seed,
                               seeds=[args.seed + i for i in range(n_seeds)], bootstrap=boot, frechet_mode=args.frechet,
                               batch_size=min(args.batch_size, samples), device=device, log=print,
                               keep_samples=10 if args.grid else 0)
    print()
    print(fidelity.markdown_table(result))
    for line in fidelity.verdict(result):
        print("-", line)
    if args.json:
        Path(args.json).write_text(json.dumps(fidelity.json_rows(result), indent=1))
    if args.grid:
        fidelity.save_grid(args.grid, result["samples"])
    return result


if __name__ == "__main__":
    main()
