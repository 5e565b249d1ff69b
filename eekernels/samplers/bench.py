"""``eekernels bench``: sampling throughput, full depth vs the ASE schedule vs plain torch, in one run.

Every row samples the same noise and labels with the same solver, steps and CFG, and reports images/s
(median over ``--repeats`` timed runs after one warm-up run) and the relative error of its samples against
eekernels at full depth (the fidelity cost of early exit). Rows:

- ``torch eager, full`` / ``torch eager, ASE``: the same DiT written in plain torch (facebookresearch's forward,
  ``blocks[:depth]`` as the ASE reference code), sampled eagerly; with the schedule it picks its depth as the
  ASE code does, from ``t.item()`` at every call;
- ``eekernels eager, full`` / ``eekernels eager, ASE``: the eekernels DiT, depth planned ahead;
- on CUDA also: ``ASE reference style`` (plain torch, fp32 with TF32, ``t.item()`` per step), ``torch.compile,
  ASE`` (the plain-torch model compiled), ``eekernels graphs, full`` / ``eekernels graphs, ASE``;
- with ``--cache-k k``: ``eekernels, cache policy`` (``ExitSchedule.periodic(k, depth)``, training-free).

Defaults: on CUDA DiT-XL/2 (random weights), bf16, DDIM-50, CFG 1.5, 32 images, the ASE reference schedule;
on CPU a small DiT (12 blocks, width 128) that runs in seconds, with the "ase-demo" schedule (mean depth about
0.71 of full). Prints a table and writes JSON (``--json``); a progress bar on stderr (``--no-progress``: none).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# A small DiT for CPU runs: 16 tokens of width 128, 12 blocks.
CPU_MODEL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=12, num_heads=4,
                 num_classes=1000)


# ---- the plain-torch reference DiT ------------------------------------------------------------------------------

class TorchDiT(nn.Module):
    """An eekernels DiT's weights run by a plain-torch facebookresearch-style forward (the baseline).

    ``depth``: run ``blocks[:depth]`` then the final layer (ASE). With ``schedule``, the model picks its own depth
    from ``t.item()`` at every call, as the ASE reference code does (one host sync per step).
    """

    def __init__(self, model, schedule=None):
        super().__init__()
        self.m, self.schedule = model, schedule
        for a in ("num_classes", "null_class", "in_channels", "num_blocks", "learn_sigma", "input_size"):
            setattr(self, a, getattr(model, a))

    def forward(self, x, t, y=None, depth=None):
        from eekernels.models._layers import timestep_embedding

        m, D, p = self.m, self.m.hidden_size, self.m.patch_size
        if self.schedule is not None:
            depth = int(self.schedule.depth(t[:1].float()).item())  # the ASE reference code's per-step sync
        depth = m.num_blocks if depth is None else depth
        h = F.conv2d(x, m.x_embedder.proj.weight, m.x_embedder.proj.bias, stride=p)
        h = h.flatten(2).transpose(1, 2) + m.pos_embed.to(x.dtype)
        freq = timestep_embedding(t, m.t_embedder.frequency_embedding_size, freq_shift=m.t_embedder.freq_shift)
        c = m.t_embedder.mlp(freq.to(x.dtype))
        if m.y_embedder is not None:
            c = c + m.y_embedder.embedding_table(y)
        c = F.silu(c)
        B, N, _ = h.shape
        H = m.num_heads
        for i in range(depth):
            blk = m.blocks[i]
            w, b = m.block_adaLN(i)
            s1, c1, g1, s2, c2, g2 = F.linear(c, w, b).chunk(6, dim=1)
            a = F.layer_norm(h, (D,), eps=m.eps) * (1 + c1[:, None]) + s1[:, None]
            qkv = blk.attn.qkv(a).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, D)
            h = h + g1[:, None] * blk.attn.proj(a)
            a = F.layer_norm(h, (D,), eps=m.mlp_norm_eps) * (1 + c2[:, None]) + s2[:, None]
            h = h + g2[:, None] * blk.mlp.fc2(F.gelu(blk.mlp.fc1(a), approximate="tanh"))
        w, b = m.final_adaLN()
        shift, scale = F.linear(c, w, b).chunk(2, dim=1)
        out = m.final_layer.linear(F.layer_norm(h, (D,), eps=m.eps) * (1 + scale[:, None]) + shift[:, None])
        g, C = int(N**0.5), m.out_channels
        return out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


def randomized(model):
    """Random weights everywhere (DiT zero-initializes adaLN and the output layer: gates would be 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


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

def build(args):
    """(eekernels DiT, schedule, noise, labels, device, dtype) for the chosen sizes."""
    from eekernels.schedules import ExitSchedule
    from eekernels.models import DiT

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.manual_seed(args.seed)
    if args.model == "cpu-small" or (args.model is None and device.type != "cuda"):
        model = DiT(**CPU_MODEL)
    else:
        model = DiT.from_config(args.model or "DiT-XL/2", input_size=args.image_size // 8)
    model = randomized(model).to(device=device, dtype=dtype)
    if args.schedule is not None:
        name = args.schedule
    else:
        name = "ase-dit-xl" if model.num_blocks == 28 else "ase-demo"
    schedule = ExitSchedule.preset(name, total_depth=model.num_blocks)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, model.in_channels, model.input_size, model.input_size, generator=g)
    labels = torch.randint(0, model.num_classes, (args.batch,), generator=g)
    return model, schedule, noise.to(device, dtype), labels.to(device), device, dtype


def run_bench(args) -> dict:
    from eekernels.graphs import GraphCache
    from eekernels.samplers import make_solver, sample

    model, schedule, noise, y, device, dtype = build(args)
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


# ---- CLI --------------------------------------------------------------------------------------------------------

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
    result = run_bench(args)
    print(format_table(result))
    if json_path is not None:
        existed = json_path.exists()
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {json_path}" + (" (replaced the file that was there)" if existed else ""))
    return 0
