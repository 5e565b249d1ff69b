"""The in-place tier on the CPU (issue 21): throughput and final-latent difference, five pipelines, ONE process.

    python benchmarks/bench_inplace.py              # full mode: benchmarks/results/bench_inplace.json, RESULTS.md
    python benchmarks/bench_inplace.py --quick      # CI size (tests/test_bench_inplace.py): tiny models, seconds

For each of DiTPipeline, DDIMPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline and FluxPipeline, one random
pipeline (every parameter randomized as the tests do; one config scale for all families, printed with the table)
and one call (same seed, batch, steps), run by every row below. Each row is its own deep copy of the pipeline.

| row | what runs |
| --- | --- |
| plain | the diffusers pipeline as built |
| in place full | ``eekernels.accelerate(pipe)``: the same model object with exit hooks, schedule None |
| in place ~0.7 | ``accelerate(pipe, schedule)``: the ASE shape (full depth near the data, shallower toward noise) scaled until the blocks counted over the run are nearest ``--target`` |
| native ~0.7 | ``accelerate(pipe, schedule, native=True)``: eekernels' fused model of the family, same schedule |
| FirstBlockCache | diffusers' ``FirstBlockCacheConfig(threshold)`` on the transformer (``enable_cache``; ``apply_first_block_cache`` for classes without CacheMixin), the threshold searched until its counted blocks are nearest the in-place row's |
| DeepCache (U-Net) | diffusers has no cache for ``UNet2DModel`` (no CacheMixin; its caches hook transformer blocks, FirstBlockCache needs ``TransformerBlockRegistry`` classes); the peer is the DeepCache package's ``DeepCacheSDHelper(interval, branch)``, the setting nearest in FLOPs |

Counting. Transformer blocks run are counted by forward hooks on each block's first attention module (a skipped
block never calls it: eekernels' hooks and FirstBlockCache's both bypass the block's forward); the native tier's
by the depth its model receives per call. U-Net: "blocks" are resolution levels of unequal cost, so its fraction
counts FLOPs (``torch.utils.flop_counter``, the whole run), not levels. Every row also reports the FLOPs of its
whole run over plain's (GEMMs, convolutions and, through a mapping added here, the CPU attention kernel): the
ideal time ratio if time scaled with FLOPs.

Timing: ``--rounds`` rounds after a warm-up; each round runs every row once (the order rotated per round), so load
from other processes falls on all rows alike. Per row: median and min-max of the wall time, and the median of its
per-round ratio to plain's time in the same round (and the process CPU time's median, less sensitive to other
load). ``torch.set_num_threads(--threads)``, float32, ``torch.no_grad()``.

Final latents: the last scheduler step's ``prev_sample`` (the denoised latents before decoding; DiT and DDIM have
no latent output type), relative difference ``||x - x_plain|| / ||x_plain||`` in float64 against plain full depth.
Random weights: the differences say how far each method moves the result, not image quality.

Hook overhead (``hook_overhead``): microseconds per call of the model's hook and of a block's hook at full depth,
timed with the modules' own compute swapped for a no-op (a difference of a few microseconds cannot be read off
seconds-long runs on a shared machine), and their share of a plain run's CPU time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

FAMILIES = ("dit", "ddim", "pixart", "sd3", "flux")
PIPELINES = {"dit": "DiTPipeline", "ddim": "DDIMPipeline", "pixart": "PixArtAlphaPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
ROWS = ("plain", "in place full", "in place ~0.7", "native ~0.7", "peer")
RESULT = ROOT / "benchmarks" / "results" / "bench_inplace.json"


@dataclass(frozen=True)
class Shapes:
    """One config scale for every family: width (heads x head_dim), blocks (FLUX: ``double`` of them double-stream),
    latent side (patch 2, or FLUX's 2x2 packing: (latent / 2)^2 image tokens), caption tokens, images per call.
    The U-Net (pixel space) has its own channels per level, at ``unet_sample`` pixels."""

    heads: int
    head_dim: int
    blocks: int
    double: int
    latent: int
    tokens: int
    batch: int
    steps: int
    unet_channels: tuple
    unet_layers: int
    unet_sample: int
    unet_groups: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


FULL = Shapes(heads=4, head_dim=64, blocks=8, double=3, latent=16, tokens=16, batch=2, steps=16,
              unet_channels=(64, 128, 256, 256), unet_layers=2, unet_sample=32, unet_groups=32)
QUICK = Shapes(heads=2, head_dim=16, blocks=4, double=2, latent=8, tokens=7, batch=2, steps=4,
               unet_channels=(8, 16, 16), unet_layers=1, unet_sample=16, unet_groups=4)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    family: str
    pipe: object
    kwargs: dict
    denoiser: str  # the pipeline's attribute


def build(family: str, s: Shapes) -> Case:
    """The family's random pipeline and its call (everything but the generator)."""
    import diffusers
    from bench_text_pipelines import _randomize
    from bench_text_pipelines import build as build_text

    if family in ("pixart", "sd3", "flux"):
        ns = SimpleNamespace(heads=s.heads, head_dim=s.head_dim, caption_dim=s.width, pooled_dim=s.width,
                             blocks=s.blocks, double=s.double, size=s.latent, qk_norm=False, dual_layers=0,
                             dtype="float32", device="cpu", batch=s.batch, tokens=s.tokens, steps=s.steps)
        pipe, kw = build_text(family, ns)
        kw["output_type"] = "latent"
        return Case(family, pipe, kw, "transformer")
    if family == "dit":
        tr = _randomize(diffusers.DiTTransformer2DModel(
            num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=4, out_channels=8,
            num_layers=s.blocks, sample_size=s.latent, patch_size=2, num_embeds_ada_norm=1000), 0)
        emb = tr.transformer_blocks[0].norm1.emb.state_dict()
        for blk in tr.transformer_blocks[1:]:  # one embedder in every block, as converted DiT checkpoints have
            blk.norm1.emb.load_state_dict(emb)
        vae = _randomize(diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=4,
            norm_num_groups=4, sample_size=s.latent), 1)
        pipe = diffusers.DiTPipeline(tr, vae, diffusers.DDIMScheduler(), id2label={i: str(i) for i in range(8)})
        kw = dict(class_labels=list(range(s.batch)), num_inference_steps=s.steps, output_type="pt")
        denoiser = "transformer"
    else:
        L = len(s.unet_channels)
        down = ["DownBlock2D"] * L
        down[1] = "AttnDownBlock2D"  # attention at half resolution, as DDPM's CIFAR U-Net
        up = [b.replace("Down", "Up") for b in reversed(down)]
        unet = _randomize(diffusers.UNet2DModel(
            sample_size=s.unet_sample, in_channels=3, out_channels=3, block_out_channels=s.unet_channels,
            layers_per_block=s.unet_layers, down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=s.unet_groups, attention_head_dim=s.unet_channels[1] // 2), 0)
        pipe = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler())
        kw = dict(batch_size=s.batch, num_inference_steps=s.steps, output_type="pt")
        denoiser = "unet"
    pipe.set_progress_bar_config(disable=True)
    return Case(family, pipe, kw, denoiser)


def describe(family: str, case: Case, s: Shapes) -> str:
    model = getattr(case.pipe, case.denoiser)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if family == "ddim":
        return (f"UNet2DModel {s.unet_sample}x{s.unet_sample}x3, channels {list(s.unet_channels)}, "
                f"{s.unet_layers} resnets per level, attention at level 1; batch {s.batch}, {s.steps} DDIM steps; "
                f"{params:.1f}M parameters")
    tokens = (s.latent // 2) ** 2
    blocks = f"{s.double} double + {s.blocks - s.double} single" if family == "flux" else f"{s.blocks}"
    cfg = "guidance embedding, no CFG batch" if family == "flux" else "CFG (model batch x2)"
    text = "" if family == "dit" else f", {s.tokens} caption tokens of {s.width}"
    return (f"width {s.width} ({s.heads} heads x {s.head_dim}), {blocks} blocks, latents {s.latent}x{s.latent} "
            f"({tokens} image tokens){text}; batch {s.batch}, {cfg}, {s.steps} steps "
            f"({type(case.pipe.scheduler).__name__}); {params:.1f}M parameters")


def call(pipe, case: Case, seed: int = 0):
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), **case.kwargs)


# --------------------------------------------------------------------------------------------------
# What a run did: final latents, blocks run, model calls, FLOPs
# --------------------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """torch's FlopCounterMode, counting the CPU attention kernel too (torch counts only the CUDA ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def block_modules(model, family):
    """The model's blocks in execution order (the family table's block lists), or [] (U-Net: levels)."""
    from eekernels.families import PrefixExit

    rule = family.exit
    if not isinstance(rule, PrefixExit):
        return []
    return [b for name in rule.blocks for b in getattr(model, name)]


@contextlib.contextmanager
def observe(pipe, case: Case, family):
    """Record a run of ``pipe``: ``seen["latents"]`` (the last scheduler step's prev_sample), ``seen["calls"]``
    (denoiser calls), ``seen["blocks"]`` (blocks run; for the native tier the depth each call received) and
    ``seen["flops"]``."""
    from eekernels._accelerate import _Accelerated

    seen = {"calls": 0, "blocks": 0, "native_depths": []}
    denoiser = getattr(pipe, case.denoiser)
    handles = []
    if isinstance(denoiser, _Accelerated):  # the native tier: count the depth its model runs per call
        full = int(denoiser.model.num_blocks)

        def depth_in(mod, args, kwargs):
            d = kwargs.get("depth")
            seen["native_depths"].append(full if d is None else int(d))
            seen["blocks"] += full if d is None else int(d)

        handles.append(denoiser.model.register_forward_pre_hook(depth_in, with_kwargs=True))
    else:
        from bench_text_pipelines import first_attention

        for blk in block_modules(denoiser, family):
            handles.append(first_attention(blk).register_forward_hook(
                lambda *a: seen.__setitem__("blocks", seen["blocks"] + 1)))
    handles.append(denoiser.register_forward_pre_hook(lambda *a: seen.__setitem__("calls", seen["calls"] + 1)))
    sched = pipe.scheduler
    orig = sched.step

    def step(*args, **kwargs):
        out = orig(*args, **kwargs)
        seen["latents"] = (out.prev_sample if hasattr(out, "prev_sample") else out[0]).detach().clone()
        return out

    sched.step = step
    counter = flop_counter()
    try:
        with counter:
            yield seen
    finally:
        del sched.step
        for h in handles:
            h.remove()
    seen["flops"] = counter.get_total_flops()


def inspect_run(pipe, case: Case, family) -> dict:
    with observe(pipe, case, family) as seen:
        call(pipe, case)
    return seen


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# The ~0.7 schedule, FirstBlockCache's threshold, DeepCache's setting
# --------------------------------------------------------------------------------------------------
def near_schedule(total: int, min_depth: int, cost: dict, timesteps: torch.Tensor, target: float):
    """The ExitSchedule of the ASE shape (``ASE_DIT_XL``: full depth at small t, shallower toward noise) scaled by a
    factor a (each bin moves a times as far from full depth), a chosen so that the run's mean cost (``cost[d]``:
    a call at depth d over a full call) is nearest ``target``. Returns (schedule, fraction)."""
    from eekernels.schedules import ASE_DIT_XL, ExitSchedule

    shape = [d / max(ASE_DIT_XL) for d in ASE_DIT_XL]
    best = None
    for i in range(0, 401):
        a = i / 100
        table = [min(total, max(min_depth, round(total * (1 - a * (1 - v))))) for v in shape]
        sched = ExitSchedule.piecewise(table, total_depth=total)
        plan = sched.plan(timesteps).tolist()
        frac = sum(cost[d] for d in plan) / len(plan)
        if best is None or abs(frac - target) < abs(best[1] - target) - 1e-12:
            best = (sched, frac)
    return best


def fbc_pipe(pipe, threshold: float):
    """A shallow copy of ``pipe`` whose transformer is a deep copy under diffusers' FirstBlockCache."""
    from bench_text_pipelines import enable_first_block_cache

    new = copy.copy(pipe)
    new.transformer = enable_first_block_cache(copy.deepcopy(pipe.transformer), threshold)
    return new


def search_fbc(case: Case, family, target: float, calls: int, evaluations: int, log):
    """The FirstBlockCache threshold whose blocks run over the run are nearest ``target`` (a fraction of
    ``calls`` full calls): a log grid, then bisection between the two grid points around the target. Returns
    (threshold, fraction, tried)."""
    total = len(block_modules(case.pipe.transformer, family))
    tried = {}

    def fraction(th):
        if th not in tried:
            tried[th] = inspect_run(fbc_pipe(case.pipe, th), case, family)["blocks"] / (calls * total)
        return tried[th]

    grid = [10 ** (k / 2) for k in range(-6, 3)]  # 0.001 .. 10
    fr = [fraction(th) for th in grid]
    lo, hi = grid[0], grid[-1]
    for th, f, nxt, fn in zip(grid, fr, grid[1:], fr[1:]):
        if f >= target >= fn:
            lo, hi = th, nxt
            break
    for _ in range(max(0, evaluations - len(grid))):
        mid = math.sqrt(lo * hi)
        if fraction(mid) >= target:
            lo = mid
        else:
            hi = mid
    th = min(tried, key=lambda t: (abs(tried[t] - target), t))
    log(f"bench_inplace: {case.family}: FirstBlockCache threshold {th:.4g} runs {tried[th]:.3f} of the blocks "
        f"({len(tried)} thresholds tried)")
    return th, tried[th], {f"{k:.4g}": round(v, 4) for k, v in sorted(tried.items())}


def deepcache_pipe(pipe, interval: int, branch: int):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return pipe


def search_deepcache(case: Case, family, target: float, full_flops: int, log):
    """The DeepCache (interval, branch) whose FLOPs over the run are nearest ``target`` of plain's. One run per
    branch with an interval longer than the run (step 0 full, every later step that branch only) gives the branch's
    cost; an interval i runs steps 0, i, 2i, ... in full. Returns ((interval, branch), predicted fraction)."""
    steps = case.kwargs["num_inference_steps"]
    levels = len(case.pipe.unet.down_blocks)
    per_call_full = full_flops / steps
    options = []
    for branch in range(3 * levels):
        flops = inspect_run(deepcache_pipe(copy.deepcopy(case.pipe), steps + 1, branch), case, family)["flops"]
        per_call = (flops - per_call_full) / (steps - 1)
        for interval in range(2, 9):
            n_full = len(range(0, steps, interval))
            frac = (n_full * per_call_full + (steps - n_full) * per_call) / full_flops
            options.append((abs(frac - target), interval, branch, frac))
    _, interval, branch, frac = min(options)
    log(f"bench_inplace: {case.family}: DeepCache interval {interval}, branch {branch}: {frac:.3f} of the FLOPs")
    return (interval, branch), frac


# --------------------------------------------------------------------------------------------------
# Hook overhead: model calls, plain vs in place at full depth
# --------------------------------------------------------------------------------------------------
def hook_overhead(case: Case, reps: int) -> dict:
    """Microseconds the in-place hooks add per call at full depth, without the modules' own compute: in an
    accelerated copy of the model, the forward that a hook calls to run its module (diffusers' hook chain keeps it as
    ``fn_ref.original_forward``) is swapped for a no-op, and the module's call is timed against a plain module with
    the same no-op forward and the same arguments (captured from a real call); best of 5 repeats of ``reps``
    calls, process CPU time. Measured for the model's hook (the depth of the call, the CUDA-graph runner's check)
    and for the first block's (U-Net: the first down block's); ``per_run_us`` is a pipeline run's share:
    calls x (model hook + block hooks x block hook)."""
    import timeit

    import eekernels
    from eekernels import inplace

    pipe = eekernels.accelerate(copy.deepcopy(case.pipe))
    model = getattr(pipe, case.denoiser)
    ctl = inplace.controller(model)
    block = ctl.attached[0][0]  # hooks are attached blocks first, in execution order, then the model
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, k, key=key: seen.setdefault(key, (a, k)), with_kwargs=True)
               for key, m in (("model", model), ("block", block))]
    call(pipe, case)
    for h in handles:
        h.remove()

    class Noop(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return None

    noop = Noop()
    out = {"hooks_per_call": len(ctl.attached), "calls_per_repeat": reps}
    for key, module in (("model", model), ("block", block)):
        for hook in module._diffusers_hook.hooks.values():
            hook.fn_ref.original_forward = noop.forward
        args, kwargs = seen[key]
        best = {}
        with torch.no_grad():
            for name, fn in (("hooked", lambda: module(*args, **kwargs)), ("plain", lambda: noop(*args, **kwargs))):
                best[name] = min(timeit.repeat(fn, number=reps, repeat=5, timer=time.process_time)) / reps * 1e6
        out[f"{key}_hook_us"] = round(best["hooked"] - best["plain"], 2)
    blocks = len(ctl.attached) - 1
    out["per_call_us"] = round(out["model_hook_us"] + blocks * out["block_hook_us"], 1)
    return out


def timed_interleaved(fns: dict, rounds: int, warmup: int = 0):
    """Wall and process CPU seconds of each callable, ``rounds`` times, interleaved: round r runs every callable
    once, starting at callable r (mod n), after ``warmup`` untimed rounds. Returns ({name: [wall]}, {name: [cpu]})."""
    names = list(fns)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    with torch.no_grad():
        for r in range(-warmup, rounds):
            k = r % len(names)
            for n in (names[k:] + names[:k] if r >= 0 else names):
                t0, c0 = time.perf_counter(), time.process_time()
                fns[n]()
                t1, c1 = time.perf_counter(), time.process_time()
                if r >= 0:
                    wall[n].append(t1 - t0)
                    cpu[n].append(c1 - c0)
    return wall, cpu


# --------------------------------------------------------------------------------------------------
# One family
# --------------------------------------------------------------------------------------------------
def bench_family(family: str, s: Shapes, args, log) -> dict:
    import eekernels
    from eekernels import families, inplace

    case = build(family, s)
    fam, _ = families.family_of_pipeline(case.pipe)
    plain = case.pipe
    log(f"bench_inplace: {family}: {describe(family, case, s)}")
    ref = inspect_run(plain, case, fam)
    steps = case.kwargs["num_inference_steps"]
    timesteps = plain.scheduler.timesteps.detach().to("cpu", torch.float64).clone()
    calls = ref["calls"]
    per_step = calls // len(timesteps)

    full_pipe = eekernels.accelerate(copy.deepcopy(plain))
    ctl = inplace.controller(full_pipe)
    L, min_depth = ctl.num_blocks, ctl.min_depth
    unit = "blocks" if fam.exit.kind == "prefix" else "FLOPs"
    if unit == "blocks":
        cost = {d: d / L for d in range(1, L + 1)}
        depth_flops = None
    else:  # U-Net: the FLOPs of one call at each depth (levels 0..d-1), on the run's own first-call input
        captured = {}
        model = getattr(full_pipe, case.denoiser)
        h = model.register_forward_pre_hook(lambda m, a, k: captured.setdefault("in", (a, k)), with_kwargs=True)
        call(full_pipe, case)
        h.remove()
        depth_flops = {}
        for d in range(1, L + 1):
            counter = flop_counter()
            with torch.no_grad(), inplace.at_depth(model, d), counter:
                model(*captured["in"][0], **captured["in"][1])
            depth_flops[d] = counter.get_total_flops()
        cost = {d: depth_flops[d] / depth_flops[L] for d in depth_flops}
    schedule, fraction = near_schedule(L, min_depth, cost, timesteps, args.target)
    plan = schedule.plan(timesteps).tolist()
    declared = (sum(plan) * per_step if unit == "blocks"
                else sum(depth_flops[d] for d in plan) * per_step)
    log(f"bench_inplace: {family}: schedule {list(schedule.table)} runs {fraction:.3f} of the {unit}")

    pipes = {"plain": plain, "in place full": full_pipe,
             "in place ~0.7": eekernels.accelerate(copy.deepcopy(plain), schedule),
             "native ~0.7": eekernels.accelerate(copy.deepcopy(plain), schedule, native=True)}
    if family == "ddim":
        (interval, branch), predicted = search_deepcache(case, fam, fraction, ref["flops"], log)
        pipes["peer"] = deepcache_pipe(copy.deepcopy(plain), interval, branch)
        peer = {"name": f"DeepCache (interval {interval}, branch {branch})", "interval": interval, "branch": branch,
                "predicted_fraction": round(predicted, 4),
                "why": "diffusers has no cache for UNet2DModel (no CacheMixin; FirstBlockCache needs "
                       "TransformerBlockRegistry blocks): DeepCache package, the setting nearest in FLOPs"}
    else:
        th, _, tried = search_fbc(case, fam, fraction, calls, args.fbc_evaluations, log)
        pipes["peer"] = fbc_pipe(plain, th)
        peer = {"name": f"FirstBlockCache (threshold {th:.4g})", "threshold": th, "tried": tried}

    rows = {}
    for name, pipe in pipes.items():
        seen = ref if name == "plain" else inspect_run(pipe, case, fam)
        counted = seen["blocks"] if unit == "blocks" else seen["flops"]
        rows[name] = {"row": peer["name"] if name == "peer" else name, "calls": seen["calls"], "counted": counted,
                      "fraction": round(counted / (calls * L if unit == "blocks" else ref["flops"]), 4),
                      "run_flop_fraction": round(seen["flops"] / ref["flops"], 4),
                      "rel_diff": rel_diff(seen["latents"], ref["latents"]),
                      "latents": seen["latents"]}
        if name == "native ~0.7":
            rows[name]["native_depths"] = seen["native_depths"]
    native = rows["native ~0.7"]
    checks = {
        "in_place_full_bit_identical": bool(torch.equal(rows["in place full"]["latents"], ref["latents"])),
        "in_place_07_vs_native_07": rel_diff(rows["in place ~0.7"]["latents"], native["latents"]),
        "in_place_07_counted": rows["in place ~0.7"]["counted"], "declared": declared,
        "native_depths_match_plan": native["native_depths"] == [d for d in plan for _ in range(per_step)],
        "in_place_full_counted": rows["in place full"]["counted"],
        "full_counted": calls * L if unit == "blocks" else ref["flops"],
    }
    for r in rows.values():
        del r["latents"]
    native.pop("native_depths")

    names = list(pipes)
    wall, cpu = timed_interleaved({n: (lambda p=pipes[n]: call(p, case)) for n in names}, args.rounds, args.warmup)
    for n in names:
        ratios = [w / p for w, p in zip(wall[n], wall["plain"])]
        cpu_ratios = [c / p for c, p in zip(cpu[n], cpu["plain"])]
        rows[n].update(seconds=round(statistics.median(wall[n]), 4), seconds_min=round(min(wall[n]), 4),
                       seconds_max=round(max(wall[n]), 4), ratio=round(statistics.median(ratios), 4),
                       ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4),
                       cpu_seconds=round(statistics.median(cpu[n]), 4),
                       cpu_ratio=round(statistics.median(cpu_ratios), 4),
                       cpu_ratio_min=round(min(cpu_ratios), 4), cpu_ratio_max=round(max(cpu_ratios), 4))
    overhead = hook_overhead(case, args.overhead_reps)
    overhead["per_run_us"] = round(overhead["per_call_us"] * calls, 1)
    overhead["per_run_fraction_of_plain_cpu"] = round(overhead["per_run_us"] * 1e-6 / rows["plain"]["cpu_seconds"], 6)
    blocks_per_run = checks["in_place_full_counted"] if unit == "blocks" else None
    return {"family": family, "pipeline": PIPELINES[family], "shapes": describe(family, case, s), "unit": unit,
            "total_depth": L, "steps": steps, "calls": calls, "timesteps": [round(t, 3) for t in timesteps.tolist()],
            "schedule": {"table": list(schedule.table), "fraction": round(fraction, 4), "plan": plan},
            "depth_flops": depth_flops, "peer": peer, "rows": [rows[n] for n in names], "checks": checks,
            "hook_overhead": overhead, "block_calls_per_run": blocks_per_run}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """The markdown table: CPU time first (this process's own, the robust figure on a shared machine), then wall."""
    lines = ["| pipeline | row | blocks run | FLOPs of the run | CPU s | CPU / plain [min-max] | wall s [min-max] | "
             "wall / plain | final latents vs plain |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fam in result["families"]:
        for r in fam["rows"]:
            frac = f"{r['fraction']:.3f}" + (" (FLOPs)" if fam["unit"] == "FLOPs" else "")
            diff = "0 (bit-identical)" if r["rel_diff"] == 0 else f"{r['rel_diff']:.2e}"
            lines.append(f"| {fam['pipeline']} | {r['row']} | {frac} | {r['run_flop_fraction']:.3f} | "
                         f"{r['cpu_seconds']:.3f} | {r['cpu_ratio']:.3f} [{r['cpu_ratio_min']:.3f}-"
                         f"{r['cpu_ratio_max']:.3f}] | {r['seconds']:.2f} [{r['seconds_min']:.2f}-"
                         f"{r['seconds_max']:.2f}] | {r['ratio']:.3f} | {diff} |")
    return "\n".join(lines)


def format_notes(result: dict) -> list[str]:
    out = []
    for f in result["families"]:
        o = f["hook_overhead"]
        out.append(f"{f['pipeline']}: {f['shapes']}. ~0.7: ExitSchedule.piecewise({f['schedule']['table']}), "
                   f"{f['schedule']['fraction']:.3f} of the {f['unit']}. Hooks at full depth (CPU time): model "
                   f"{o['model_hook_us']} us, block {o['block_hook_us']} us, {o['per_call_us']} us per call "
                   f"({o['hooks_per_call']} hooks), {o['per_run_us'] / 1e3:.2f} ms per run = "
                   f"{100 * o['per_run_fraction_of_plain_cpu']:.3f}% of plain's CPU time.")
    return out


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: tiny models, 2 rounds, 4 steps")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; --quick 0)")
    p.add_argument("--target", type=float, default=0.7, help="fraction of the blocks for the early-exit rows")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--fbc-evaluations", type=int, default=None,
                   help="FirstBlockCache runs in the threshold search (default 14; --quick 10)")
    p.add_argument("--overhead-reps", type=int, default=None, help="calls per repeat in the hook-overhead "
                   "timing (default 5000; --quick 200)")
    p.add_argument("--table", default=None, help="print the tables of a saved result (JSON) and exit")
    p.add_argument("--json", default=None, help=f"write the result here (default, full mode: {RESULT})")
    args = p.parse_args(argv)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad or not fams:
        p.error(f"--families: expected some of {', '.join(FAMILIES)}, got {args.families!r}")
    args.families = fams
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    args.fbc_evaluations = args.fbc_evaluations or (10 if args.quick else 14)
    args.overhead_reps = args.overhead_reps or (200 if args.quick else 5000)
    for name in ("rounds", "threads", "fbc_evaluations", "overhead_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if not 0 < args.target < 1:
        p.error(f"--target: expected a fraction in (0, 1), got {args.target}")
    if args.json is None and not args.quick and not args.table:
        args.json = str(RESULT)
    return args


def main(argv=None, log=print) -> dict:
    args = parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        log(format_table(result))
        log("")
        for line in format_notes(result):
            log(line)
        return result
    import diffusers

    torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    fams = [bench_family(f, shapes, args, log) for f in args.families]
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": "float32",
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "date": datetime.datetime.now().isoformat(timespec="minutes"), "commit": _commit(),
            "command": "python benchmarks/bench_inplace.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "mode": "quick" if args.quick else "full", "rounds": args.rounds, "warmup": args.warmup,
            "target": args.target, "shapes": asdict(shapes), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)}
    result = {"info": info, "families": fams}
    log(format_table(result))
    log("")
    for line in format_notes(result):
        log(line)
    log(f"load average {load_before[0]:.1f} before, {info['load_average_after'][0]:.1f} after; "
        f"{info['threads']} torch thread(s); {info['seconds']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
