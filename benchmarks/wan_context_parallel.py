"""Wan in place under diffusers' context parallelism (``enable_parallelism`` with a ``ContextParallelConfig``).

Run with torchrun, one process per device (tests/families/test_wan.py runs the first line on two CPU processes):

    torchrun --standalone --nproc_per_node=2 benchmarks/wan_context_parallel.py --out cp.json   # CPU, gloo, tiny Wan
    torchrun --standalone --nproc_per_node=2 benchmarks/wan_context_parallel.py --device cuda --shape 1.3b \\
        --height 480 --width 832 --frames 33 --steps 4 --time --out cp_gpu.json                  # 2 GPUs, Ulysses
    torchrun --standalone --nproc_per_node=2 benchmarks/wan_context_parallel.py --device cuda --shape 1.3b \\
        --height 480 --width 832 --frames 33 --steps 4 --attention ring --dtype bfloat16 \\
        --backend _native_cudnn --out cp_gpu_ring.json                                           # 2 GPUs, ring

Every rank builds the same model (same seed) and first computes, alone, the single-process references. Then, per
attention mode (``ulysses``: all-to-all over the heads; ``ring``: K/V passed around the ranks), the video tokens
are split across the ranks (diffusers' ``_cp_plan`` for Wan: at ``blocks.0``, gathered at ``proj_out``) and:
- ``plain``: plain CP equals the single process;
- ``full``: CP + ``eekernels.accelerate`` in place (after ``enable_parallelism``) at full depth equals plain CP
  bit for bit; ``depth_d``: at depth d it equals the single-process model in place at d; ``cache``: so does
  ``exit_policy="cache"`` (each rank caches the residual of its own tokens);
- ``graphs``: the CUDA-graph runner runs eagerly under CP (collectives inside the forward) and says why;
- ``pipeline``: a WanPipeline under the "ase-wan" schedule, its transformer accelerated BEFORE
  ``enable_parallelism`` (the other order): every rank runs the same depth at every model call (counted by
  pre-hooks on the blocks, gathered from every rank), which is the schedule's, and the latents equal the
  single-process run.
Comparisons with the single process allow float32 rounding (the split changes the summation order; on the CPU
they come out equal); bfloat16 allows bfloat16 rounding. ``--time``: seconds per pipeline call for plain CP, in
place at full depth and in place under "ase-wan" (about 0.7 of the blocks). Rank 0 writes ``--out`` (JSON) and
prints a summary. Exit status 1 when a check fails or a mode is refused (``--allow-refused``: record it only).

On a CPU-only torch, diffusers 0.42's ``ModelMixin._resolve_parallel_config`` computes the device index as
``rank % torch.accelerator.device_count()``, which is 0 there: ZeroDivisionError. That line is all that stops
it: this script lets ``enable_parallelism`` see one device (``torch.device("cpu", 0)``), and the rest runs on
gloo. Ring attention still refuses on the CPU: the only CPU backend that diffusers lets run context parallel,
``native`` (SDPA), does not return the log-sum-exp ring needs ("Native attention does not support
return_lse=True"); the CUDA backends that do (``flash``, ``_native_cudnn``, ``_native_flash``) take bfloat16 or
float16 only, hence ``--dtype bfloat16 --backend ...`` for ring.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from unittest import mock

import torch
import torch.distributed as dist

SHAPES = {
    # 3 blocks, 2 heads of 8: the CPU test's model
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                 text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32),
    # Wan 2.1 T2V-1.3B's config (random weights)
    "1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 rope_max_seq_len=1024),
}
DEFAULTS = {"tiny": dict(height=64, width=64, frames=5, text_tokens=5), "1.3b": dict(height=480, width=832,
                                                                                     frames=33, text_tokens=512)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--text-tokens", type=int)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--attention", default="ulysses", help="comma-separated: ulysses, ring")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backend", default=None, help="diffusers attention backend (set_attention_backend)")
    p.add_argument("--time", action="store_true", help="time pipeline calls (plain CP, in place full, ase-wan)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--allow-refused", action="store_true", help="record a refused mode instead of failing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.attention.split(",") if m.strip()]
    if not modes or any(m not in ("ulysses", "ring") for m in modes):
        p.error(f"--attention expected a comma-separated list of ulysses, ring; got {args.attention!r}")
    args.modes = modes
    for k, v in DEFAULTS[args.shape].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats expected >= 1")
    return args


# --------------------------------------------------------------------------------------------------
# The model, its inputs, the pipeline
# --------------------------------------------------------------------------------------------------
def make_model(args, device, dtype):
    import diffusers

    torch.manual_seed(0)  # the same weights on every rank
    m = diffusers.WanTransformer3DModel(**SHAPES[args.shape]).eval().to(device)
    if dtype != torch.float32:  # as from_pretrained(torch_dtype=...) does: some modules stay float32
        m.to(dtype)
        for name, module in m.named_modules():
            if name.rpartition(".")[2] in m._keep_in_fp32_modules:
                module.float()
        for name, p in m.named_parameters():
            if name.rpartition(".")[2] in m._keep_in_fp32_modules:
                p.data = p.data.float()
    if args.backend:
        m.set_attention_backend(args.backend)
    return m


def model_inputs(args, device, dtype):
    cfg = SHAPES[args.shape]
    g = torch.Generator().manual_seed(1)
    f = (args.frames - 1) // 4 + 1
    x = torch.randn(1, cfg["in_channels"], f, args.height // 8, args.width // 8, generator=g)
    text = torch.randn(1, args.text_tokens, cfg["text_dim"], generator=g)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.tensor([700.0]),  # host timestep: depth on host
                encoder_hidden_states=text.to(device, dtype), return_dict=False)


def make_pipeline(model):
    import diffusers

    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(args, pipe, device, dtype):
    cfg = SHAPES[args.shape]
    g = torch.Generator().manual_seed(2)
    pe = torch.randn(1, args.text_tokens, cfg["text_dim"], generator=g).to(device, dtype)
    ne = torch.randn(1, args.text_tokens, cfg["text_dim"], generator=g).to(device, dtype)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=args.height, width=args.width,
                num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator(device).manual_seed(3)).frames


def depths_checked(args, total):
    return list(range(1, total + 1)) if total <= 4 else sorted({1, total // 3, 2 * total // 3, total})


class BlocksRan:
    """The number of blocks that ran in each call of ``model`` (pre-hooks on each block's first attention)."""

    def __init__(self, model):
        self.calls = []
        self.handles = [model.register_forward_pre_hook(lambda *a: self.calls.append(0))]
        for block in model.blocks:
            self.handles.append(block.attn1.register_forward_pre_hook(self._ran))

    def _ran(self, *_):
        self.calls[-1] += 1

    def done(self):
        for h in self.handles:
            h.remove()
        return self.calls


# --------------------------------------------------------------------------------------------------
# Context parallelism
# --------------------------------------------------------------------------------------------------
CPU_DEVICE_INDEX = {}  # what diffusers' enable_parallelism raised on a CPU-only torch, before the one-device view


def enable_cp(model, mode, world_size, device):
    """``model.enable_parallelism`` with a ``ContextParallelConfig`` of ``mode`` over every rank. On a CPU-only
    torch, where diffusers divides by the device count (see the module docstring), it is tried as is first (it
    raises before changing the model), then with one device seen."""
    from diffusers import ContextParallelConfig

    def config():
        return ContextParallelConfig(**{f"{mode}_degree": world_size})

    if device.type == "cpu" and torch.accelerator.device_count() == 0:
        try:
            model.enable_parallelism(config=config())
            return
        except ZeroDivisionError as e:
            CPU_DEVICE_INDEX["error"] = f"{type(e).__name__}: {e}"
        with mock.patch.object(torch.accelerator, "device_count", return_value=1):
            model.enable_parallelism(config=config())
        return
    model.enable_parallelism(config=config())


class _EagerGraph:  # a stand-in capture: the runner's own code path without CUDA
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def run_mode(args, mode, world, device, dtype, single) -> dict:
    import eekernels
    from eekernels import ExitSchedule, inplace
    from eekernels.graphs import GraphCache

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    checks = {}

    def close(name, got, want, exact=False):
        diff = (got.float() - want.float()).abs().max().item()
        scale = max(1.0, want.float().abs().max().item())
        checks[name] = {"ok": bool(torch.equal(got, want)) if exact else diff <= tol * scale, "max_abs_diff": diff,
                        "exact": exact}

    kw = model_inputs(args, device, dtype)
    model = make_model(args, device, dtype)
    total = len(model.blocks)
    enable_cp(model, mode, world, device)
    with torch.no_grad():
        plain = model(**kw)[0]
        close("plain", plain, single["plain"])
        eekernels.accelerate(model)
        close("full", model(**kw)[0], plain, exact=True)
        for d in depths_checked(args, total):
            with inplace.at_depth(model, d):
                close(f"depth_{d}", model(**kw)[0], single[d])
        runner = inplace.controller(model).graphs
        runner.cache = cache = GraphCache(capture=lambda fn, pool, stream: (_EagerGraph(fn), 0))
        model(**kw)
        checks["graphs"] = {"ok": cache.stats()["captures"] == 0 and "parallelism" in (runner.reason or ""),
                            "reason": runner.reason}
        eekernels.disable(model)
        eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 1, total), exit_policy="cache")
        close("cache", torch.stack([model(**kw)[0], model(**kw)[0]]), single["cache"])
        eekernels.disable(model)

    # the pipeline: accelerated first, then context parallel
    pipe = make_pipeline(make_model(args, device, dtype))
    schedule = ExitSchedule.preset("ase-wan", total_depth=total)
    eekernels.accelerate(pipe, schedule=schedule)
    enable_cp(pipe.transformer, mode, world, device)
    ran = BlocksRan(pipe.transformer)
    latents = run_pipeline(args, pipe, device, dtype)
    mine = ran.done()
    every = [None] * world
    dist.all_gather_object(every, mine)
    want = [d for s in inplace.plan(pipe) for d in (s.depth, s.depth)]  # cond and uncond
    checks["pipeline_depths"] = {"ok": all(r == want for r in every), "per_rank": every, "schedule": want}
    close("pipeline", latents, single["pipeline"])

    timing = None
    if args.time:
        timing = {}
        for label, sched in (("in place ase-wan", schedule), ("in place full", None), ("plain CP", False)):
            eekernels.disable(pipe)
            if sched is not False:
                eekernels.accelerate(pipe, schedule=sched)
            timing[label] = time_calls(args, pipe, device, dtype)
        timing["blocks ase-wan / full"] = sum(want) / (total * len(want))
    return {"checks": checks, "timing": timing}


def time_calls(args, pipe, device, dtype) -> float:
    run_pipeline(args, pipe, device, dtype)  # warm-up
    out = []
    for _ in range(args.repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run_pipeline(args, pipe, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def single_process(args, device, dtype) -> dict:
    """The references, on this rank alone (before any ``enable_parallelism``)."""
    import eekernels
    from eekernels import ExitSchedule, inplace

    kw = model_inputs(args, device, dtype)
    model = make_model(args, device, dtype)
    total = len(model.blocks)
    out = {}
    with torch.no_grad():
        out["plain"] = model(**kw)[0]
        eekernels.accelerate(model)
        for d in depths_checked(args, total):
            with inplace.at_depth(model, d):
                out[d] = model(**kw)[0]
        eekernels.disable(model)
        eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 1, total), exit_policy="cache")
        out["cache"] = torch.stack([model(**kw)[0], model(**kw)[0]])
        eekernels.disable(model)
    pipe = make_pipeline(model)
    eekernels.accelerate(pipe, schedule=ExitSchedule.preset("ase-wan", total_depth=total))
    out["pipeline"] = run_pipeline(args, pipe, device, dtype)
    eekernels.disable(pipe)
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    result = {"device": str(device.type), "world_size": world, "shape": args.shape, "dtype": args.dtype,
              "size": [args.frames, args.height, args.width], "steps": args.steps, "modes": {}}
    failed = False
    try:
        single = single_process(args, device, dtype)
        for mode in args.modes:
            try:
                result["modes"][mode] = run_mode(args, mode, world, device, dtype, single)
            except Exception as e:  # noqa: BLE001 - a refused mode is reported (every rank refuses at the same op)
                result["modes"][mode] = {"refused": f"{type(e).__name__}: {e}"}
                failed |= not args.allow_refused
                continue
            failed |= not all(c["ok"] for c in result["modes"][mode]["checks"].values())
    finally:
        result["cpu_enable_parallelism"] = CPU_DEVICE_INDEX.get("error")
        if rank == 0:
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
            summary(result)
        dist.destroy_process_group()
    return 1 if failed else 0


def summary(result) -> None:
    print(f"Wan in place under context parallelism: {result['world_size']} ranks on {result['device']}, "
          f"{result['shape']} {result['dtype']}, frames x H x W = {result['size']}")
    if result["cpu_enable_parallelism"]:
        print(f"  diffusers' enable_parallelism on this CPU-only torch raised {result['cpu_enable_parallelism']} "
              "(rank % torch.accelerator.device_count()); run with one device seen")
    for mode, r in result["modes"].items():
        if "refused" in r:
            print(f"  {mode}: refused: {r['refused']}")
            continue
        bad = [k for k, c in r["checks"].items() if not c["ok"]]
        diffs = {k: c["max_abs_diff"] for k, c in r["checks"].items() if "max_abs_diff" in c}
        print(f"  {mode}: {'all checks pass' if not bad else 'FAILED: ' + ', '.join(bad)}; max |diff| {diffs}")
        if r["timing"]:
            print(f"  {mode} timing (s per pipeline call): {r['timing']}")


if __name__ == "__main__":
    sys.exit(main())
