"""Training-free early exit on a U-Net against the DeepCache package, at equal measured FLOPs (issue 5/6).

    python benchmarks/training_free_unet.py --json training_free_unet.json
    python benchmarks/training_free_unet.py --quick     # CI-sized: 4 images, 10 steps, one DeepCache setting

One diffusers ``UNet2DModel`` (``benchmarks/bench_unet.py``'s DDPM-CIFAR-shaped config, random weights: no trained
U-Net ships, so quality is the final image's difference from the full-depth one, not a judge score) in one
diffusers ``DDIMPipeline``, 50 steps, the same generator for every row. For each DeepCache setting
(``DeepCacheSDHelper.set_params(cache_interval, cache_branch_id)``), eekernels rows at the same FLOP fraction:

| row | what runs |
| --- | --- |
| ``deepcache(i, b)`` | the DeepCache package on the pipeline: every i-th step full, else only the branch above b |
| ``periodic-cache`` | ``accelerate(pipe, ExitSchedule.periodic(k, d), exit_policy="cache")``, (k, d) nearest that FLOP fraction |
| ``calibrated-cache`` / ``calibrated-drop`` | ``accelerate(pipe, calibrate(..., depth_costs="flops", budget=that fraction))`` |

FLOPs are counted by ``torch.utils.flop_counter`` over a whole pipeline run at batch 1 (every model call, as the
pipeline makes them), for every row alike; the fraction is over the full-depth run's count. Quality: PSNR of each
image against the full-depth image (pipeline output in [0, 1]), mean over images, with the standard error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
              layers_per_block=1, norm_num_groups=16, attention_head_dim=32,
              down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
CALIB_SEED = 9000
WEIGHTS = ROOT / "benchmarks" / "results" / "glyph-unet.safetensors"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images, 10 steps, DeepCache (3, 0) only")
    p.add_argument("--images", type=int, default=None, help="images per row (default 16)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration noises (default 8)")
    p.add_argument("--deepcache", default=None,
                   help="DeepCache settings 'interval:branch,...' (default 2:0,3:0,5:0; --quick 3:0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select", default="proxy", choices=("proxy", "closed-loop"),
                   help="how the calibrated rows choose their plan (eekernels.calibrate's select)")
    p.add_argument("--policies", default="cache,drop", help="calibrated rows to run: cache, drop or both")
    p.add_argument("--weights", default=str(WEIGHTS), help="the glyph U-Net (safetensors) to use")
    p.add_argument("--train-steps", type=int, default=0, help="train the glyph U-Net here first (e.g. 800)")
    p.add_argument("--save", default=None, help="with --train-steps: write the trained weights here")
    p.add_argument("--train-only", action="store_true", help="with --train-steps: stop after training")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("images", "steps", "calib_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    return args


def build_unet(seed: int = 0):
    """The benchmark's UNet2DModel (4 levels, attention at 16x16) with diffusers' own seeded initialization."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**CONFIG).eval()


def train_unet(steps: int, *, batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print):
    """A glyph U-Net trained here: eps-prediction MSE on the procedural glyphs (``eekernels.data.glyphs``),
    diffusers' DDPM noise schedule (1000 steps, linear betas), AdamW, linear warm-up over 50 steps; EMA 0.99
    weights are returned. Deterministic on the CPU for a given seed. A random-weight U-Net is no use here:
    its sampling trajectories are chaotic, so every approximation lands near 7 dB."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from eekernels.data.glyphs import generator_for, glyph_batch

    model = build_unet(seed).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    noise_sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    t0, losses = time.perf_counter(), []
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / 50)
        x0, _ = glyph_batch(batch, generator_for(seed, i), "cpu")
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(model(noise_sched.add_noise(x0, eps, t), t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(0.99).add_(v.detach(), alpha=0.01) if v.is_floating_point() else ema[k].copy_(v)
        losses.append(float(loss))
        if log and (i + 1) % 50 == 0:
            log(f"train_unet: step {i + 1}/{steps} loss {sum(losses[-50:]) / 50:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.load_state_dict(ema)
    return model.eval(), {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "ema": 0.99,
                          "final_loss_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
                          "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}


def load_or_train(args, log=print):
    """The glyph U-Net: trained here with ``--train-steps N`` (and saved with ``--save``), else the saved file."""
    from safetensors.torch import load_file, save_file

    if args.train_steps:
        model, record = train_unet(args.train_steps, seed=args.seed, log=log)
        if args.save:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save,
                      metadata={"record": json.dumps(record), "config": json.dumps(CONFIG)})
        return model, record
    path = Path(args.weights)
    if not path.is_file():
        raise SystemExit(f"--weights: no such file {str(path)!r}; train one with --train-steps 800 --save {path}")
    model = build_unet(args.seed)
    model.load_state_dict(load_file(str(path)))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        record = json.loads((f.metadata() or {}).get("record", "{}"))
    return model.eval(), {**record, "weights": str(path)}


def psnr(a, b) -> tuple[float, float]:
    """Mean PSNR (dB) of images ``a`` against ``b`` (N, H, W, C in [0, 1]) and its standard error."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-12)
    v = 10 * torch.log10(1.0 / mse)
    return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffusers import DDIMPipeline, DDIMScheduler
    from DeepCache import DeepCacheSDHelper
    from torch.utils.flop_counter import FlopCounterMode

    import eekernels
    from eekernels.calibration import calibrate, depth_flops
    from eekernels.eval.images import seeded_noise
    from eekernels.models import UNet
    from eekernels.samplers import make_solver
    from eekernels.schedules import ExitSchedule

    n_img = args.images or (4 if args.quick else 16)
    steps = args.steps or (10 if args.quick else 50)
    n_cal = args.calib_samples or (2 if args.quick else 8)
    settings = [tuple(int(v) for v in s.split(":")) for s in
                (args.deepcache or ("3:0" if args.quick else "2:0,3:0,5:0")).split(",")]
    ref, record = load_or_train(args)
    if args.train_only:
        return {"train": record}
    pipe = DDIMPipeline(ref, DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    ours = UNet.from_diffusers(ref).eval()
    L = ours.num_blocks
    pipe.scheduler.set_timesteps(steps)
    solver_t = make_solver("ddim", steps).timesteps
    if not torch.equal(pipe.scheduler.timesteps.to(solver_t.dtype), solver_t):
        raise SystemExit("training_free_unet: eekernels' DDIM timesteps differ from the pipeline's; the calibrated "
                         "plans would not line up with the pipeline's calls")

    def run(p, batch, count=False):
        counter = FlopCounterMode(display=False) if count else None
        t0 = time.perf_counter()
        with torch.no_grad(), (counter if count else contextlib.nullcontext()):
            out = p(batch_size=batch, generator=torch.Generator().manual_seed(args.seed), num_inference_steps=steps,
                    output_type="np").images
        return out, time.perf_counter() - t0, (counter.get_total_flops() if count else None)

    full, full_s, _ = run(pipe, n_img)
    _, _, full_flops = run(pipe, 1, count=True)
    per_depth = depth_flops(ours, torch.randn(1, 3, 32, 32))
    cal_noise = seeded_noise(range(n_cal), (3, 32, 32), CALIB_SEED)
    rows = [{"row": "full (diffusers DDIMPipeline)", "flop_fraction": 1.0, "psnr_db": None, "seconds": round(full_s, 2)}]

    def add(name, p, extra, helper=None):
        if helper is not None:
            helper.enable()
        try:
            imgs, secs, _ = run(p, n_img)
            _, _, flops = run(p, 1, count=True)
        finally:
            if helper is not None:
                helper.disable()
        mean, se = psnr(imgs, full)
        row = {"row": name, "flop_fraction": round(flops / full_flops, 4), "psnr_db": round(mean, 2),
               "psnr_se": round(se, 2), "seconds": round(secs, 2), **extra}
        rows.append(row)
        print(f"training_free_unet: {name}: FLOP fraction {row['flop_fraction']:.3f}, PSNR {mean:.2f} ± {se:.2f} dB "
              f"vs full, {secs:.1f}s")
        return row

    for interval, branch in settings:
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        dc = add(f"deepcache({interval}, {branch})", pipe, {"cache_interval": interval, "cache_branch_id": branch},
                 helper)
        target = dc["flop_fraction"]
        def periodic_fraction(k, d):  # full depth at calls 0, k, 2k, ..., depth d at the others
            full_calls = len(range(0, steps, k))
            return (full_calls * per_depth[L] + (steps - full_calls) * per_depth[d]) / (steps * per_depth[L])

        _, k, d = min((abs(periodic_fraction(k, d) - target), k, d) for k in range(2, 8) for d in range(1, L))
        add(f"periodic-cache(k={k}, d={d}) @ {target:.2f}",
            eekernels.accelerate(pipe, ExitSchedule.periodic(k, d, L), exit_policy="cache", native=True),
            {"target": target, "schedule": f"periodic({k}, {d})"})
        for policy in [v for v in ("cache", "drop") if v in args.policies.split(",")]:
            t0 = time.perf_counter()
            try:
                sched = calibrate(ours, sampler="ddim", steps=steps, exit_policy=policy, budget=min(1.0, target),
                                  noises=cal_noise, depth_costs="flops", validate_plans=0, select=args.select,
                                  max_reuse=max(4, 2 * interval))  # DeepCache reuses interval - 1 calls
            except ValueError as e:  # e.g. a cache plan cannot fit a budget this small
                rows.append({"row": f"calibrated-{policy} @ {target:.2f}", "error": str(e)})
                print(f"training_free_unet: calibrated-{policy} @ {target:.2f}: {e}")
                continue
            rep = sched.calibration
            add(f"calibrated-{policy} @ {target:.2f}", eekernels.accelerate(pipe, sched, exit_policy=policy, native=True),
                {"target": target, "plan": rep.plan, "planned_flop_fraction": round(rep.cost_fraction, 4),
                 "calibration_seconds": round(time.perf_counter() - t0, 2)})

    doc = {"rows": rows, "settings": {"images": n_img, "steps": steps, "calibration_samples": n_cal,
                                      "calibration_seed": CALIB_SEED, "seed": args.seed, "config": CONFIG,
                                      "select": args.select,
                                      "unet": record, "flops_per_depth": per_depth,
                                      "full_flops_batch1": full_flops, "torch": torch.__version__}}
    print()
    print("| row | FLOP fraction (counted) | PSNR vs full (dB) | wall (s) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | — | failed: {r['error']} | — |")
        else:
            p = "—" if r["psnr_db"] is None else f"{r['psnr_db']:.2f} ± {r['psnr_se']:.2f}"
            print(f"| {r['row']} | {r['flop_fraction']:.3f} | {p} | {r['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
