"""Compare sampling outputs of two eekernels trees bit for bit (float32, CPU).

    python python/check_bit_identical.py record --out before.pt           # in (or with PYTHONPATH=) the old tree
    python python/check_bit_identical.py record --out after.pt            # in the new tree
    python python/check_bit_identical.py compare before.pt after.pt       # exit 1 on any difference

or in one go, the old tree as a git revision (a temporary worktree; nothing is installed):

    python python/check_bit_identical.py against main

It samples every model family (DiT, U-ViT, U-Net), every solver, and every exit policy (full depth, ``drop``
under a piecewise schedule, ``cache`` under a periodic one), plus a direct forward with per-sample depths. The
models have fixed random weights; every run uses the same seeded noise and labels. Only API that both trees
have is used, so a redesign can be checked against the tree it replaces.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOLVERS = ("ddpm", "ddim", "dpmsolver++", "euler", "heun")


def _models():
    import torch
    from eekernels.models import DiT, UViT
    from eekernels.models.unet import UNet

    def seeded(build, seed):
        torch.manual_seed(seed)
        m = build()
        with torch.no_grad():  # every parameter random (zero-init layers would hide differences)
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        return m.eval()

    yield "dit", seeded(lambda: DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=6, num_heads=3,
                                    num_classes=7, learn_sigma=True), 1)
    yield "uvit", seeded(lambda: UViT(input_size=8, patch_size=2, in_channels=3, embed_dim=48, depth=7, num_heads=3,
                                      num_classes=7), 2)
    yield "unet", seeded(lambda: UNet(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 24, 32),
                                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                      layers_per_block=1, norm_num_groups=8, attention_head_dim=8), 3)


def record(out: str) -> None:
    import torch
    import eekernels
    from eekernels import ExitSchedule

    torch.set_num_threads(1)
    results = {}
    for family, model in _models():
        L = model.num_blocks
        lo = int(getattr(model, "min_depth", 1) or 1)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(3, model.in_channels, model.input_size, model.input_size, generator=g)
        y = None if model.num_classes is None else torch.tensor([0, 3, 6]) % model.num_classes
        cfg = 1.5 if y is not None and model.null_class is not None else 1.0
        drop = ExitSchedule.piecewise([L, L, max(lo, L - 1), max(lo, L - 2), max(lo, L - 3)], total_depth=L)
        cache = ExitSchedule.periodic(2, max(lo, L - 2), L)
        for solver in SOLVERS:
            for policy, sched in (("full", None), ("drop", drop), ("cache", cache)):
                key = f"{family}/{solver}/{policy}"
                kw = dict(sampler=solver, steps=4, cfg_scale=cfg, schedule=sched, graphs=False,
                          generator=torch.Generator().manual_seed(1))
                if policy == "cache":
                    kw["exit_policy"] = "cache"
                with torch.no_grad():
                    results[key] = eekernels.sample(model, noise, y, **kw)
        t = torch.tensor([999.0, 500.0, 3.0])
        depth = torch.tensor([L, lo, max(lo, L - 1)])
        with torch.no_grad():
            results[f"{family}/forward/per-sample-depth"] = model(noise, t, y, depth=depth)
            results[f"{family}/forward/full"] = model(noise, t, y)
    torch.save(results, out)
    print(f"recorded {len(results)} outputs with eekernels from {Path(eekernels.__file__).parent} into {out}")


def compare(a: str, b: str) -> int:
    import torch

    ra, rb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    bad = [k for k in sorted(set(ra) | set(rb)) if k not in ra or k not in rb or not torch.equal(ra[k], rb[k])]
    for k in bad:
        if k in ra and k in rb:
            d = (ra[k].double() - rb[k].double()).abs().max().item()
            print(f"DIFFERENT {k}: max |a - b| = {d:.3e}")
        else:
            print(f"MISSING {k} in {'b' if k in ra else 'a'}")
    print(f"{len(ra)} outputs compared: {len(ra) - len(bad)} bit-identical, {len(bad)} different")
    return 1 if bad else 0


def against(rev: str) -> int:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        tree = Path(d) / "old"
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            me = str(Path(__file__).resolve())
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run([sys.executable, me, "record", "--out", f"{d}/a.pt"], check=True, env=env, cwd=d)
            env = {**os.environ, "PYTHONPATH": str(root)}
            subprocess.run([sys.executable, me, "record", "--out", f"{d}/b.pt"], check=True, env=env, cwd=d)
            return compare(f"{d}/a.pt", f"{d}/b.pt")
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="sample every configuration and save the outputs")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare", help="compare two recorded files bit for bit")
    c.add_argument("a")
    c.add_argument("b")
    g = sub.add_parser("against", help="record this tree and a git revision, then compare")
    g.add_argument("rev", help="e.g. main, HEAD~1, a commit")
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(args.out)
        return 0
    if args.cmd == "compare":
        return compare(args.a, args.b)
    return against(args.rev)


if __name__ == "__main__":
    sys.exit(main())
