"""Sampling throughput, full depth vs the ASE schedule vs plain torch, in one run (``eekernels bench``, whose
options live in ``eekernels.jobs.bench``).

Every row samples the same noise and labels with the same solver, steps and CFG, and reports images/s
(median over ``--repeats`` timed runs after one warm-up run) and the relative error of its samples against
eekernels at full depth (the fidelity cost of early exit). Rows:

- ``torch eager, full`` / ``torch eager, ASE``: the same DiT in plain torch (``eekernels.eval.baselines``:
  facebookresearch's forward, ``blocks[:depth]`` as the ASE reference code), sampled eagerly; with the
  schedule it picks its depth as the ASE code does, from ``t.item()`` at every call;
- ``eekernels eager, full`` / ``eekernels eager, ASE``: the eekernels DiT, depth planned ahead;
- on CUDA also: ``ASE reference style`` (plain torch, fp32 with TF32, ``t.item()`` per step), ``torch.compile,
  ASE`` (the plain-torch model compiled), ``eekernels graphs, full`` / ``eekernels graphs, ASE``;
- with ``--cache-k k``: ``eekernels, cache policy`` (``ExitSchedule.periodic(k, depth)``, training-free).

Defaults: on CUDA DiT-XL/2 (random weights), bf16, DDIM-50, CFG 1.5, 32 images, the ASE reference schedule;
on CPU a small DiT (12 blocks, width 128) that runs in seconds, with the "ase-demo" schedule (mean depth about
0.71 of full). ``--model`` also takes the shipped diffusion models (``glyph-dit-ase``, ``glyph-dit``: trained
weights; the schedule the model records, else the preset above, as ``glyph-dit`` records none). Prints a table, and writes JSON only when asked (``--json FILE``); a progress bar
on stderr (``--no-progress``: none).
"""
from __future__ import annotations

import platform
import statistics
import sys
import time

import torch

from eekernels.eval.baselines import TorchDiT, randomized

# A small DiT for CPU runs: 16 tokens of width 128, 12 blocks.
CPU_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=12, num_heads=4,
                 num_classes=1000)


# ---- timing -----------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn, repeats: int, device) -> tuple[list[float], torch.Tensor]:
    """Seconds per run (after one untimed warm-up run) and the last run's output."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, out


def time_interleaved(fns: dict, repeats: int, device, progress: bool = False) -> dict:
    """Like ``time_runs`` for several systems, alternating them so that load drifts hit all alike.

    progress: a tqdm bar on stderr, one tick per run (warm-up runs included).
    """
    from tqdm import tqdm

    bar = tqdm(total=len(fns) * (repeats + 1), desc="eekernels bench", unit="run", disable=not progress,
               file=sys.stderr)
    outs = {}
    for name, fn in fns.items():
        bar.set_postfix_str(f"warm-up: {name}")
        outs[name] = fn()
        bar.update()
    _sync(device)
    times = {name: [] for name in fns}
    for r in range(repeats):
        bar.set_postfix_str(f"timed run {r + 1}/{repeats}")
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            outs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            bar.update()
    bar.close()
    return {name: (times[name], outs[name]) for name in fns}


def _relerr(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- the benchmark -------------------------------------------------------------------------------------------------

CPU_MODEL_NAME = "cpu-small"


def build(args):
    """(eekernels DiT, schedule, noise, labels, device, dtype) for the chosen model and sizes.

    ``args.model``: a shipped diffusion model (its trained weights, and the schedule it records unless
    ``--schedule``; ``ase-demo`` / ``ase-dit-xl`` where it records none), a ``DIT_CONFIGS`` name or
    ``cpu-small`` (random weights). The schedule is resolved before any weights are drawn, so a bad one is
    refused at once (``ValueError`` naming ``--schedule``).
    """
    from eekernels.models import DiT
    from eekernels.models.pretrained import PRETRAINED, load_diffusion_model
    from eekernels.schedules import ExitSchedule

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.manual_seed(args.seed)
    shipped = args.model in PRETRAINED
    if shipped:
        model = load_diffusion_model(args.model, "cpu", option="--model")[0]
    elif args.model == CPU_MODEL_NAME or (args.model is None and device.type != "cuda"):
        model = DiT(**CPU_MODEL)
    else:
        model = DiT.from_config(args.model or "DiT-XL/2", input_size=args.image_size // 8)
    # a speed benchmark needs an exit schedule: a model that records none gets a preset (named in the output)
    recorded = ExitSchedule.recorded(model)
    spec = args.schedule or ("auto" if recorded else "ase-dit-xl" if model.num_blocks == 28 else "ase-demo")
    schedule = ExitSchedule.from_spec(spec, model, option="--schedule")
    if schedule is None:
        why = "records full depth" if recorded else "records no exit schedule, so auto is full depth"
        raise ValueError(f"--schedule: expected an exit schedule (bench compares it with full depth), got {spec!r}"
                         + (f" ({args.model} {why})" if spec.strip() == "auto" else ""))
    model = (model.eval() if shipped else randomized(model)).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, model.in_channels, model.input_size, model.input_size, generator=g)
    labels = None if model.num_classes is None else torch.randint(0, model.num_classes, (args.batch,), generator=g)
    return model, schedule, noise.to(device, dtype), None if labels is None else labels.to(device), device, dtype


def run_bench(args, built=None) -> dict:
    """The benchmark's rows and ratios for ``args`` (``built``: :func:`build`'s result, else built here)."""
    from eekernels.graphs import GraphCache
    from eekernels.samplers import make_solver, sample

    model, schedule, noise, y, device, dtype = built if built is not None else build(args)
    cuda = device.type == "cuda"
    solver = make_solver(args.sampler, args.steps)
    frac = schedule.block_flop_fraction(solver.timesteps)
    common = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg)
    gen = lambda: torch.Generator(device).manual_seed(args.seed)  # noqa: E731

    def eek(sched=None, graphs=False, cache=None, **kw):
        return lambda: sample(model, noise, y, schedule=sched, graphs=graphs, graph_cache=cache, generator=gen(),
                              **common, **kw)

    ref, ref_ase = TorchDiT(model), TorchDiT(model, schedule)
    systems = {
        "torch eager, full": lambda: sample(ref, noise, y, graphs=False, generator=gen(), **common),
        "torch eager, ASE": lambda: sample(ref_ase, noise, y, graphs=False, generator=gen(), **common),
        "eekernels eager, full": eek(),
        "eekernels eager, ASE": eek(schedule),
    }
    if cuda:
        model32 = TorchDiT(_copy_as(model, torch.float32), schedule)
        noise32 = noise.float()

        def ase_reference_style():
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return sample(model32, noise32, y, graphs=False, generator=gen(), **common)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev

        systems = {"ASE reference style (fp32/TF32, t.item())": ase_reference_style, **systems}
        if not args.no_compile:
            compiled = torch.compile(TorchDiT(model), dynamic=False)  # one graph per depth
            systems["torch.compile, ASE"] = lambda: sample(compiled, noise, y, schedule=schedule, graphs=False,
                                                           generator=gen(), **common)
        cache = GraphCache()
        systems["eekernels graphs, full"] = eek(graphs=True, cache=cache)
        systems["eekernels graphs, ASE"] = eek(schedule, graphs=True, cache=cache)
    if args.cache_k:
        from eekernels.schedules import ExitSchedule

        depth = max(1, round(model.num_blocks * frac))
        periodic = ExitSchedule.periodic(args.cache_k, depth, model.num_blocks)
        systems[f"eekernels, cache policy (periodic k={args.cache_k}, depth {depth})"] = eek(
            periodic, graphs=cuda, cache=GraphCache() if cuda else None, exit_policy="cache")

    results = time_interleaved(systems, args.repeats, device, progress=not getattr(args, "no_progress", True))
    full_out = results["eekernels eager, full"][1]
    rows = []
    for name, (times, out) in results.items():
        med = statistics.median(times)
        rows.append(dict(system=name, images_per_s=args.batch / med, s_per_run=med,
                         s_min=min(times), s_max=max(times), rel_err_vs_full=_relerr(out.float(), full_out.float())))
    by = {r["system"]: r for r in rows}
    ratios = {
        "ase_over_full_eekernels_eager": by["eekernels eager, ASE"]["images_per_s"]
        / by["eekernels eager, full"]["images_per_s"],
        "ase_over_full_torch_eager": by["torch eager, ASE"]["images_per_s"] / by["torch eager, full"]["images_per_s"],
        "eekernels_over_torch_ase_eager": by["eekernels eager, ASE"]["images_per_s"]
        / by["torch eager, ASE"]["images_per_s"],
    }
    if cuda:
        ratios["ase_over_full_graphs"] = (by["eekernels graphs, ASE"]["images_per_s"]
                                          / by["eekernels graphs, full"]["images_per_s"])
    info = dict(
        device=torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        torch=torch.__version__, dtype=str(dtype).replace("torch.", ""), batch=args.batch, sampler=args.sampler,
        steps=args.steps, cfg_scale=args.cfg, model=dict(blocks=model.num_blocks, hidden=model.hidden_size,
                                                         tokens=(model.input_size // model.patch_size) ** 2),
        schedule=repr(schedule), block_flop_fraction=frac, repeats=args.repeats,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if cuda:
        info["graph_cache"] = cache.stats()
    return dict(info=info, rows=rows, ratios=ratios)


def _copy_as(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def format_table(result: dict) -> str:
    info, rows = result["info"], result["rows"]
    lines = [f"# {info['device']}, torch {info['torch']}, {info['dtype']}; {info['sampler']}-{info['steps']}, "
             f"CFG {info['cfg_scale']}, batch {info['batch']}; DiT {info['model']}; schedule {info['schedule']} "
             f"(block FLOPs {info['block_flop_fraction']:.3f} of full)",
             "| system | images/s | s/run (min..max) | rel. err vs full depth |", "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['images_per_s']:.2f} | {r['s_per_run']:.3f} ({r['s_min']:.3f}.."
                     f"{r['s_max']:.3f}) | {r['rel_err_vs_full']:.2e} |")
    lines.append("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)
