"""Fidelity of early exit, measured: class accuracy by a judge and Fréchet distance in its features.

Every variant samples the same seeded noise and labels (:mod:`eekernels.eval.images`) with the same
solver, steps and CFG scale:

| variant | model | exit |
| --- | --- | --- |
| ``full`` | base | all blocks |
| ``ase-naive`` | base (not fine-tuned) | the ASE schedule, skipped blocks dropped |
| ``ase-finetuned`` | ASE fine-tuned | the ASE schedule |
| ``cache`` | base (not fine-tuned) | ``exit_policy="cache"`` with a periodic schedule |

Reported per variant: judge accuracy (against the requested labels), Fréchet distance between the
judge's penultimate features of the samples and of fresh real glyphs, block-FLOP fraction
(:meth:`ExitSchedule.block_flop_fraction` over the solver's calls), and sampling wall time. A ``real``
row gives the floor: fresh real glyphs scored the same way (accuracy of the judge; Fréchet distance
between two independent real sets).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Variant:
    name: str
    model: str  # "base" | "finetuned"
    schedule: object | None  # an ExitSchedule or None
    exit_policy: str = "drop"


def default_variants(num_blocks: int, cache_period: int = 2, cache_depth: int | None = None) -> list[Variant]:
    """The four variants of the benchmark for a model of ``num_blocks`` blocks.

    The cache variant re-runs full depth every ``cache_period`` calls and otherwise exits at
    ``cache_depth`` (default: the depth that gives about the ASE schedule's block-FLOP fraction).
    """
    from eekernels.schedules import ExitSchedule

    ase = ExitSchedule.preset("ase-demo", num_blocks)
    if cache_depth is None:  # (L + (k - 1) d) / (k L) ~ 0.71
        cache_depth = max(1, round((0.71 * cache_period * num_blocks - num_blocks) / (cache_period - 1)))
    periodic = ExitSchedule.periodic(cache_period, cache_depth, num_blocks)
    return [
        Variant("full", "base", None),
        Variant("ase-naive", "base", ase),
        Variant("ase-finetuned", "finetuned", ase),
        Variant("cache", "base", periodic, "cache"),
    ]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sample_variant(model, variant: Variant, noise, labels, *, sampler: str, steps: int, cfg_scale: float,
                   batch_size: int, device, graphs: bool | None = None) -> tuple[torch.Tensor, float]:
    """All samples of one variant (on the CPU) and the sampling wall time in seconds (after an untimed warm-up)."""
    from eekernels.samplers import sample

    def run(i):
        x = noise[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device)
        return sample(model, x, y, sampler=sampler, steps=steps, cfg_scale=cfg_scale, schedule=variant.schedule,
                      exit_policy=variant.exit_policy, graphs=graphs)

    if torch.device(device).type == "cuda":
        run(0)  # warm-up, untimed: CUDA graph capture and kernel compilation
    else:  # first-call costs (imports, allocator) on two images and two steps
        sample(model, noise[:2].to(device), labels[:2].to(device), sampler=sampler, steps=2, cfg_scale=cfg_scale,
               schedule=variant.schedule if variant.exit_policy == "drop" else None)
    _sync(device)
    t0 = time.perf_counter()
    outs = [run(i) for i in range(0, noise.shape[0], batch_size)]
    _sync(device)
    return torch.cat(outs).float().cpu(), time.perf_counter() - t0


@torch.no_grad()
def backend_agrees(model, device, rtol: float = 2e-2) -> tuple[bool, float]:
    """Does the model on the ``auto`` backend (fused kernels on CUDA) match the torch reference ops here?

    One forward on random inputs at full depth and at a truncated depth; returns (agrees, max relative error).
    A kernel that is wrong on this device must not silently decide the fidelity table.
    """
    from eekernels._backend import backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    t = torch.tensor([10.0, 300.0, 650.0, 990.0], device=device)
    y = None if model.num_classes is None else torch.arange(4, device=device) % model.num_classes
    worst = 0.0
    for depth in (None, max(1, model.num_blocks // 2)):
        with backend("torch"):
            ref = model(x, t, y, depth=depth).float()
        out = model(x, t, y, depth=depth).float()
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
    return worst <= rtol, worst


def evaluate(models: dict, judge, *, variants: list[Variant], num_samples: int = 1000, sampler: str = "dpmsolver++",
             steps: int = 20, cfg_scale: float = 1.5, seed: int = 0, batch_size: int = 500, device="cpu",
             real_seed: int = 424242, log=print, keep_samples: int = 0) -> dict:
    """Run every variant and score it; returns ``{"rows": [...], "settings": {...}, "samples": {name: (k, C, H, W)}}``.

    ``models``: ``{"base": DiT, "finetuned": DiT}`` (a variant whose model is missing is skipped with a note).
    """
    from eekernels._backend import backend
    from eekernels.data.glyphs import generator_for, glyph_batch
    from eekernels.eval.images import seeded_inputs
    from eekernels.eval.judge import feature_stats, frechet_distance
    from eekernels.samplers import make_solver

    judge = judge.to(device).eval()
    base = models["base"]
    shape = (base.in_channels, base.input_size, base.input_size)
    noise, labels = seeded_inputs(num_samples, seed, base.num_classes, shape)
    timesteps = make_solver(sampler, steps).timesteps  # one per model call

    # Real data: two independent sets of the same size give the floor of the distance at this sample size.
    real_a, real_y = glyph_batch(num_samples, generator_for(real_seed, 0), device)
    real_b, _ = glyph_batch(num_samples, generator_for(real_seed, 1), device)
    pred_a, feat_a = judge.score(real_a)
    _, feat_b = judge.score(real_b)
    stats_real = feature_stats(feat_a)
    rows = [{"variant": "real", "accuracy": float((pred_a == real_y).float().mean()),
             "frechet": frechet_distance(stats_real, feature_stats(feat_b)), "block_flop_fraction": None,
             "wall_s": None, "images_per_s": None, "note": "fresh real glyphs vs another fresh set"}]
    ops_backend = "auto"
    try:
        ok, err = backend_agrees(base.to(device).eval(), device)
    except Exception as e:  # a kernel that cannot run here: the reference ops run everything
        ok, err = False, float("nan")
        log(f"fidelity: the 'auto' backend failed on {device} ({type(e).__name__}: {str(e)[:200]})")
    if not ok:
        ops_backend = "torch"
        log(f"fidelity: the 'auto' backend disagrees with the torch reference on {device} (max rel error "
            f"{err:.2e}); sampling with the torch reference ops")
    kept = {}
    for v in variants:
        model = models.get(v.model)
        if model is None:
            log(f"fidelity: skipping {v.name}: no {v.model!r} model")
            continue
        model = model.to(device).eval()
        note = "" if ops_backend == "auto" else "torch reference ops"
        opts = dict(sampler=sampler, steps=steps, cfg_scale=cfg_scale, batch_size=batch_size, device=device)
        try:
            with backend(ops_backend):
                x, wall = sample_variant(model, v, noise, labels, **opts)
        except Exception as e:  # a failing kernel or graph must not lose the other rows: eager torch ops instead
            note = f"'{ops_backend}' failed ({type(e).__name__}: {str(e)[:200]}); eager torch reference ops"
            log(f"fidelity: {v.name}: {note}")
            try:
                with backend("torch"):
                    x, wall = sample_variant(model, v, noise, labels, graphs=False, **opts)
            except Exception as e2:
                log(f"fidelity: {v.name}: failed again ({type(e2).__name__}: {e2}); row skipped")
                rows.append({"variant": v.name, "error": f"{type(e2).__name__}: {e2}"})
                continue
        x = x.clamp(-1, 1)
        pred, feats = judge.score(x.to(device))
        row = {
            "variant": v.name,
            "accuracy": float((pred.cpu() == labels).float().mean()),
            "frechet": frechet_distance(feature_stats(feats), stats_real),
            "block_flop_fraction": round(1.0 if v.schedule is None else v.schedule.block_flop_fraction(timesteps), 4),
            "wall_s": round(wall, 3),
            "images_per_s": round(num_samples / wall, 2),
            "schedule": None if v.schedule is None else getattr(v.schedule, "name", repr(v.schedule)),
            "exit_policy": v.exit_policy,
            "note": note,
        }
        rows.append(row)
        if keep_samples:
            kept[v.name] = x[:keep_samples]
        if log is not None:
            log(f"fidelity: {v.name}: accuracy {row['accuracy']:.4f} frechet {row['frechet']:.3f} "
                f"block FLOPs {row['block_flop_fraction']:.3f} wall {row['wall_s']:.2f}s")
    settings = {"num_samples": num_samples, "sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "seed": seed,
                "real_seed": real_seed, "batch_size": batch_size, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
                "torch": torch.__version__, "ops_backend": ops_backend, "backend_check_rel_error": err}
    return {"rows": rows, "settings": settings, "samples": kept}


def markdown_table(result: dict) -> str:
    """The rows as a markdown table (figures rounded for reading; the JSON keeps full precision)."""
    s = result["settings"]
    head = (f"{s['num_samples']} samples per variant, {s['sampler']} {s['steps']} steps, CFG {s['cfg_scale']}, "
            f"seed {s['seed']}, {s['device_name']}\n\n")
    lines = ["| variant | judge accuracy | Fréchet distance (judge features) | block-FLOP fraction | wall time (s) | images/s |",
             "| --- | --- | --- | --- | --- | --- |"]

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['variant']} | {fmt(r['accuracy'] * 100, '.2f')}% | {fmt(r['frechet'], '.3f')} | "
                     f"{fmt(r['block_flop_fraction'], '.3f')} | {fmt(r['wall_s'], '.2f')} | {fmt(r['images_per_s'], '.1f')} |")
    return head + "\n".join(lines) + "\n"


def verdict(result: dict) -> list[str]:
    """The issue's expectations checked against the rows, stated plainly (holds / does not hold)."""
    rows = {r["variant"]: r for r in result["rows"] if "error" not in r}
    out = []
    full, ft, naive = rows.get("full"), rows.get("ase-finetuned"), rows.get("ase-naive")
    if full and ft:
        d_acc = (full["accuracy"] - ft["accuracy"]) * 100
        d_fd = (ft["frechet"] - full["frechet"]) / max(full["frechet"], 1e-12) * 100
        saved = (1 - ft["block_flop_fraction"]) * 100
        ok = d_acc <= 1.0 and d_fd <= 10.0
        out.append(f"fine-tuned ASE vs full: accuracy {-d_acc:+.2f} points, Fréchet {d_fd:+.1f}%, "
                   f"{saved:.0f}% fewer block FLOPs -> {'holds' if ok else 'does NOT hold'} "
                   "(target: within 1 point and 10%)")
    if naive and ft:
        # "clearly worse": more than 10% higher distance or more than 1 point lower accuracy
        worse = naive["frechet"] > 1.1 * ft["frechet"] or naive["accuracy"] < ft["accuracy"] - 0.01
        out.append(f"naive truncation: accuracy {naive['accuracy'] * 100:.2f}%, Fréchet {naive['frechet']:.3f} -> "
                   f"{'clearly worse than fine-tuned' if worse else 'NOT clearly worse than fine-tuned'}")
    return out


def save_grid(path, samples: dict, labels_per_row: int = 10) -> None:
    """One PNG: a row of ``labels_per_row`` samples per variant (same noise and labels in every row), 2x size."""
    from eekernels.eval.images import save_grid as grid, to_uint8

    x = torch.cat([x[:labels_per_row] for x in samples.values()])
    grid(path, to_uint8(x.clamp(-1, 1)), nrow=labels_per_row, pad=0, min_size=2 * max(x.shape[-2:]))
