"""GPU suite: correctness of every op implementation on CUDA, op timings, static analysis, whole-model rows.

    python benchmarks/gpu_suite.py --out gpu_suite.json        # on a CUDA machine
    python benchmarks/gpu_suite.py --dry-run                   # CPU, tiny shapes, host timer: the code paths

Builds nothing: it uses the eekernels (and ``_C``, if built) that this checkout imports. Every failure
(an op or backend missing, a kernel error, a mismatch) is reported in the output, never a crash.

1. Ceilings, once: a device-to-device copy (TB/s, bytes read + written) and an 8192^3 bf16 GEMM.
2. Correctness: each implementation in each op's ``IMPLS`` (torch, triton, cuda, cublas) and ``auto``
   (the public function) against the op's float64 ``reference``, per dtype, at odd and DiT shapes.
3. Timings at DiT-XL/2 sizes in bf16, ``triton.testing.do_bench`` median with 20%/80% quantiles:
   torch eager (the unfused torch a user writes, in bf16), torch.compile of that, and every
   implementation; TB/s (bytes read + written / time) or TFLOP/s, and the ratio to eager (to F.linear
   alone for linear_act: the target is >= 0.95x with the activation included).
   Ops: layer_norm, modulated_layer_norm, gated_residual_norm, group_norm_act, linear_act, rms_norm,
   qk_norm_rope (FLUX sizes) and fp8_linear (E4M3 per-row weights, x per token; against bf16 F.linear).
4. Static analysis (``benchmarks/static_analysis.py --json``: registers, spills, load widths for sm_90),
   started in a subprocess at the beginning (it runs no kernel) and joined after the op timings.
5. Models (issue 6/6): DiT-XL/2 bf16 forward at B=64: plain torch eager, plain torch under torch.compile
   (default and max-autotune-no-cudagraphs), eekernels eager, eekernels under torch.compile(fullgraph=True),
   eekernels after ``to_fp8``; DDIM-50 sampling of 1 image with CFG 1.5 at full depth: plain torch eager,
   plain torch under torch.compile(mode="reduce-overhead"), eekernels eager, eekernels CUDA graphs.
6. Text-to-image: the PixArt-XL/2-512-shaped pipeline rows (``bench_text_pipelines.py``).
7. Calibration (issue 5/6): ``eekernels.calibrate`` on DiT-XL/2-shaped random weights in bf16 (16 noises,
   DPM-Solver++ 20 steps, CFG 1.5, budget 0.7): its cost against one sampling run; then 8 images under the
   calibrated schedule with CUDA graphs against eager, and the synchronizing calls of a replayed run
   (``torch.cuda.set_sync_debug_mode("warn")``; the claim: none per step).

GPU time, by construction: ops <= ``--budget-s`` 220 s, then <= ``--static-wait-s`` 40 s for the static
analysis, then the models <= ``--models-budget-s`` 200 s (a compiled row is only started when its
estimated compile time, COMPILE_COST_S, fits): at most ~7.7 minutes plus ~20 s of start-up.
The op timing table is printed last; ``--out`` writes everything as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # eekernels and tests.utils (the one tolerance table) from this checkout

# Targets from issue 1/5 (H100, (64, 256, 1152) bf16).
TARGETS = {"modulated_layer_norm": "≥ 2.4 TB/s", "gated_residual_norm": "≥ 2.4 TB/s",
           "linear_act": "≥ 0.95× F.linear", "fp8_linear": "> 1× F.linear (bf16)"}


# --------------------------------------------------------------------------------------------------
# Cases: inputs, the float64 reference, the unfused eager baseline, bytes / flops moved
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    shape: str
    dtype: object
    args: tuple                      # what every IMPLS fn takes
    public: Callable                 # the public function, on those args
    ref64: Callable                  # float64 reference output(s)
    eager: Callable                  # unfused torch eager, input dtype
    bytes_moved: int = 0
    flops: int = 0
    baseline_name: str = "eager"     # what the ratio is against
    baseline: Callable | None = None  # default: eager


def _randn(shape, dtype, dev, scale=1.0, offset=0.0):
    import torch

    return (torch.randn(*shape, dtype=torch.float32, device=dev) * scale + offset).to(dtype)


def _d(t):
    return None if t is None else t.double()


def case_layer_norm(B, N, D, dtype, dev):
    import torch.nn.functional as F
    from eekernels.ops import layer_norm
    from eekernels.ops.layer_norm import reference

    x, w, b = _randn((B, N, D), dtype, dev, 2.0, 0.5), _randn((D,), dtype, dev, 1.0, 1.0), _randn((D,), dtype, dev)
    return Case("layer_norm", f"({B}, {N}, {D})", dtype, (x, w, b, 1e-6),
                public=lambda: layer_norm(x, w, b), ref64=lambda: reference(x.double(), w.double(), b.double()),
                eager=lambda: F.layer_norm(x, (D,), w, b, eps=1e-6), bytes_moved=2 * x.numel() * x.element_size())


def case_modulated_layer_norm(B, N, D, dtype, dev):
    import torch.nn.functional as F
    from eekernels.ops import modulated_layer_norm
    from eekernels.ops.modulated_layer_norm import reference

    x = _randn((B, N, D), dtype, dev, 2.0, 0.5)
    shift, scale = _randn((B, D), dtype, dev), _randn((B, D), dtype, dev, 0.5)
    return Case("modulated_layer_norm", f"({B}, {N}, {D})", dtype, (x, shift, scale, 1e-6),
                public=lambda: modulated_layer_norm(x, shift, scale),
                ref64=lambda: reference(x.double(), shift.double(), scale.double()),
                eager=lambda: F.layer_norm(x, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
                bytes_moved=2 * x.numel() * x.element_size())


def case_gated_residual_norm(B, N, D, dtype, dev):
    import torch.nn.functional as F
    from eekernels.ops import gated_residual_norm
    from eekernels.ops.gated_residual_norm import reference

    x, y = _randn((B, N, D), dtype, dev, 2.0, 0.5), _randn((B, N, D), dtype, dev)
    gate, shift, scale = _randn((B, D), dtype, dev), _randn((B, D), dtype, dev), _randn((B, D), dtype, dev, 0.5)

    def eager():
        x_out = x + gate[:, None] * y
        return x_out, F.layer_norm(x_out, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    return Case("gated_residual_norm", f"({B}, {N}, {D})", dtype, (x, y, gate, shift, scale, None, None, 1e-6),
                public=lambda: gated_residual_norm(x, y, gate, shift, scale),
                ref64=lambda: reference(x.double(), y.double(), gate.double(), shift.double(), scale.double()),
                eager=eager, bytes_moved=4 * x.numel() * x.element_size())


def case_group_norm_act(B, C, H, W, G, dtype, dev):
    import torch.nn.functional as F
    from eekernels.ops import group_norm_act
    from eekernels.ops.group_norm_act import reference

    x = _randn((B, C, H, W), dtype, dev, 2.0, 0.5)
    w, b = _randn((C,), dtype, dev, 1.0, 1.0), _randn((C,), dtype, dev)
    return Case("group_norm_act", f"({B}, {C}, {H}, {W}) G={G}", dtype, (x, G, w, b, None, None, "silu", 1e-5),
                public=lambda: group_norm_act(x, G, w, b, activation="silu"),
                ref64=lambda: reference(x.double(), G, w.double(), b.double(), None, None, "silu"),
                eager=lambda: F.silu(F.group_norm(x, G, w, b, eps=1e-5)),
                bytes_moved=2 * x.numel() * x.element_size())


def case_linear_act(M, K, N, dtype, dev):
    import torch.nn.functional as F
    from eekernels.ops import linear_act
    from eekernels.ops.linear_act import reference

    x, w, b = _randn((M, K), dtype, dev), _randn((N, K), dtype, dev, K ** -0.5), _randn((N,), dtype, dev)
    return Case("linear_act", f"{M}×{K} @ {K}×{N} gelu_tanh", dtype, (x, w, b, "gelu_tanh"),
                public=lambda: linear_act(x, w, b, "gelu_tanh"),
                ref64=lambda: reference(x.double(), w.double(), b.double(), "gelu_tanh"),
                eager=lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
                flops=2 * M * N * K, baseline_name="F.linear", baseline=lambda: F.linear(x, w, b))


def case_rms_norm(B, N, D, dtype, dev):
    import torch
    from eekernels.ops import rms_norm
    from eekernels.ops.rms_norm import reference

    x, w = _randn((B, N, D), dtype, dev, 2.0, 0.5), _randn((D,), dtype, dev, 1.0, 1.0)

    def eager():  # the unfused torch of diffusers' RMSNorm
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w

    return Case("rms_norm", f"({B}, {N}, {D})", dtype, (x, w, 1e-6), public=lambda: rms_norm(x, w),
                ref64=lambda: reference(x.double(), w.double()), eager=eager,
                bytes_moved=2 * x.numel() * x.element_size())


def case_qk_norm_rope(B, N, H, Dh, dtype, dev):
    """q, k as views of one (B, N, 3, H, Dh) QKV GEMM output (FLUX's layout); cos/sin float32 (N, Dh)."""
    import torch
    from eekernels.ops import qk_norm_rope
    from eekernels.ops.qk_norm_rope import reference

    qkv = _randn((B, N, 3, H, Dh), dtype, dev, 2.0, 0.5)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    qw, kw = _randn((Dh,), dtype, dev, 1.0, 1.0), _randn((Dh,), dtype, dev, 1.0, 1.0)
    angle = torch.rand(N, Dh // 2, device=dev).repeat_interleave(2, dim=-1) * 6.2832
    cos, sin = angle.cos(), angle.sin()

    def eager():  # diffusers' FLUX: RMSNorm per head, apply_rotary_emb (interleaved pairs), transpose for SDPA
        outs = []
        for x, w in ((q, qw), (k, kw)):
            h = x.float()
            h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * w
            real, imag = h.reshape(*h.shape[:-1], -1, 2).unbind(-1)
            rot = torch.stack([-imag, real], dim=-1).flatten(3)
            h = (h.float() * cos[:, None] + rot.float() * sin[:, None]).to(dtype)
            outs.append(h.transpose(1, 2).contiguous())
        return tuple(outs)

    args = (q, k, qw, kw, cos, sin, 1e-6)
    return Case("qk_norm_rope", f"({B}, {N}, {H}, {Dh})", dtype, args, public=lambda: qk_norm_rope(*args),
                ref64=lambda: reference(*(a.double() for a in args[:6]), 1e-6), eager=eager,
                bytes_moved=4 * q.numel() * q.element_size())


def case_fp8_linear(M, K, N, dtype, dev, per="row"):
    """E4M3 weights (per output row) and x quantized per token on the fly; baseline F.linear in x's dtype.
    Correct against the float64 GEMM of the dequantized operands (the op's spec), not the unquantized one."""
    import torch
    import torch.nn.functional as F
    from eekernels.ops.fp8_linear import dequantize_fp8, fp8_linear, quantize_fp8
    from eekernels.ops.linear_act import apply_activation

    x, w, b = _randn((M, K), dtype, dev), _randn((N, K), dtype, dev, K ** -0.5), _randn((N,), dtype, dev)
    wq, ws = quantize_fp8(w, per=per)

    def ref64():
        xq, xs = quantize_fp8(x, per=per)
        w_scale = ws.reshape(-1, 1) if per == "row" else ws
        h = F.linear(dequantize_fp8(xq, xs, torch.float64), dequantize_fp8(wq, w_scale, torch.float64), b.double())
        return apply_activation(h, "gelu_tanh")

    return Case("fp8_linear", f"{M}×{K} @ {K}×{N} gelu_tanh, per-{per}", dtype, (x, wq, ws, b, "gelu_tanh", None),
                public=lambda: fp8_linear(x, wq, ws, b, "gelu_tanh"), ref64=ref64,
                eager=lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
                flops=2 * M * N * K, baseline_name="F.linear", baseline=lambda: F.linear(x, w, b))


def case_fp8_linear_tensor(M, K, N, dtype, dev):
    """fp8_linear with one weight scale and one amax scale for x (the per-tensor _scaled_mm, >= sm_89)."""
    return case_fp8_linear(M, K, N, dtype, dev, per="tensor")


def correctness_cases(dev, dtypes, tiny):
    """(builder, args) per op; odd sizes and the DiT size, every dtype."""
    rows = [(2, 5, 72)] if tiny else [(3, 257, 1151), (2, 256, 1152)]
    planes = [(2, 8, 3, 5, 4)] if tiny else [(3, 72, 7, 9, 8), (4, 256, 32, 32, 32)]
    gemms = [(7, 24, 40)] if tiny else [(257, 1151, 1000), (512, 1152, 4608)]
    heads = [(1, 5, 3, 8)] if tiny else [(1, 257, 3, 126), (1, 4608, 24, 128)]
    for dtype in dtypes:
        for shape in rows:
            yield case_layer_norm, (*shape, dtype, dev)
            yield case_modulated_layer_norm, (*shape, dtype, dev)
            yield case_gated_residual_norm, (*shape, dtype, dev)
        for shape in planes:
            yield case_group_norm_act, (*shape, dtype, dev)
        for shape in gemms:
            yield case_linear_act, (*shape, dtype, dev)
            yield case_fp8_linear, (*shape, dtype, dev)
            yield case_fp8_linear_tensor, (*shape, dtype, dev)
        for shape in rows:
            yield case_rms_norm, (*shape, dtype, dev)
        for shape in heads:
            yield case_qk_norm_rope, (*shape, dtype, dev)


def timing_cases(dev, dtype, tiny):
    if tiny:
        return [(case_layer_norm, (2, 8, 64, dtype, dev)), (case_modulated_layer_norm, (2, 8, 64, dtype, dev)),
                (case_gated_residual_norm, (2, 8, 64, dtype, dev)), (case_group_norm_act, (2, 8, 4, 4, 4, dtype, dev)),
                (case_linear_act, (16, 32, 48, dtype, dev)), (case_rms_norm, (2, 8, 64, dtype, dev)),
                (case_qk_norm_rope, (1, 8, 2, 16, dtype, dev)), (case_fp8_linear, (16, 32, 48, dtype, dev))]
    return [(case_modulated_layer_norm, (64, 256, 1152, dtype, dev)),
            (case_gated_residual_norm, (64, 256, 1152, dtype, dev)),
            (case_layer_norm, (64, 256, 1152, dtype, dev)),
            (case_group_norm_act, (64, 256, 32, 32, 32, dtype, dev)),
            (case_linear_act, (16384, 1152, 4608, dtype, dev)),
            (case_rms_norm, (64, 256, 1152, dtype, dev)),
            (case_qk_norm_rope, (1, 4608, 24, 128, dtype, dev)),  # FLUX: 4096 image + 512 text tokens
            (case_fp8_linear, (16384, 1152, 4608, dtype, dev))]


# --------------------------------------------------------------------------------------------------
# Comparison and timing
# --------------------------------------------------------------------------------------------------
def compare(out, ref, dtype) -> dict:
    """Within the per-dtype tolerance table of tests/utils.py, elementwise; also the relative 2-norm error."""
    import torch
    from tests.utils import TOLERANCES

    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    tol = TOLERANCES[dtype]
    worst_rel, bad, total, finite = 0.0, 0, 0, True
    for o, r in zip(outs, refs):
        o, r = o.detach().double(), r.detach().double()
        finite = finite and bool(torch.isfinite(o).all())
        err = (o - r).abs()
        bad += int((err > tol["atol"] + tol["rtol"] * r.abs()).sum())
        total += o.numel()
        worst_rel = max(worst_rel, float((o - r).norm() / r.norm().clamp_min(1e-30)))
    return {"ok": finite and bad == 0, "rel_err": worst_rel, "bad": bad, "total": total, "finite": finite}


def timer(dry: bool):
    """(fn) -> (median, p20, p80) in ms: do_bench on CUDA, a host timer in --dry-run."""
    if dry:
        def host(fn):
            for _ in range(2):
                fn()
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            q = statistics.quantiles(times, n=10)
            return statistics.median(times), q[1], q[7]
        return host
    import triton.testing

    def device(fn):
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    return device


def ceilings(dev, dry) -> dict:
    import torch

    out = {}
    bench = timer(dry)
    try:
        n = (1 << 20) if dry else (1 << 29)  # 1 GiB of bf16 on the GPU
        a = torch.randn(n, device=dev).to(torch.bfloat16)
        b = torch.empty_like(a)
        med, _, _ = bench(lambda: b.copy_(a))
        out["copy_TBps"] = 2 * a.numel() * a.element_size() / (med * 1e-3) / 1e12
        del a, b
    except Exception as exc:  # report, keep going
        out["copy_error"] = repr(exc)
    try:
        n = 256 if dry else 8192
        a = torch.randn(n, n, device=dev).to(torch.bfloat16)
        b = torch.randn(n, n, device=dev).to(torch.bfloat16)
        med, _, _ = bench(lambda: a @ b)
        out["gemm_bf16_TFLOPs"] = 2 * n ** 3 / (med * 1e-3) / 1e12
        out["gemm_n"] = n
    except Exception as exc:
        out["gemm_error"] = repr(exc)
    return out


def _impls(op: str):
    import importlib

    module = importlib.import_module(f"eekernels.ops.{op}")
    return list(getattr(module, "IMPLS", ()))


def run_correctness(dev, dtypes, tiny, deadline) -> list[dict]:
    import torch
    import eekernels

    results = []
    for build, args in correctness_cases(dev, dtypes, tiny):
        if time.time() > deadline:
            results.append({"op": build.__name__[5:], "status": "skipped: time budget spent"})
            continue
        try:
            case = build(*args)
            ref = case.ref64()
        except Exception as exc:
            results.append({"op": build.__name__[5:], "dtype": str(args[-2]), "status": f"setup failed: {exc!r}"})
            continue
        impls = [(impl.name, impl) for impl in _impls(case.op)] + [("auto", None)]
        for name, impl in impls:
            row = {"op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""), "impl": name}
            try:
                with torch.no_grad():
                    if impl is None:
                        with eekernels.backend("auto"):
                            out = case.public()
                    else:
                        why = impl.why_not(*case.args)
                        if why:
                            row["status"] = "unavailable: " + "; ".join(why)
                            results.append(row)
                            continue
                        out = impl.fn(*case.args)
                if dev == "cuda":
                    torch.cuda.synchronize()
                row.update(compare(out, ref, case.dtype))
                row["status"] = "ok" if row["ok"] else "MISMATCH"
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            results.append(row)
    return results


def run_timings(dev, dtype, tiny, dry, compile_, deadline) -> list[dict]:
    import torch
    import eekernels

    bench = timer(dry)
    rows = []
    for build, args in timing_cases(dev, dtype, tiny):
        try:
            case = build(*args)
        except Exception as exc:
            rows.append({"op": build.__name__[5:], "provider": "-", "status": f"setup failed: {exc!r}"})
            continue
        providers: list[tuple[str, Callable | None, str]] = [("eager", case.eager, "")]
        if case.baseline is not None:
            providers.insert(0, (case.baseline_name, case.baseline, ""))
        if compile_:
            providers.append(("torch.compile", "compile", ""))
        for impl in _impls(case.op):
            why = impl.why_not(*case.args)
            providers.append((impl.name, (lambda f=impl.fn: f(*case.args)) if not why else None, "; ".join(why)))

        def public_auto():
            with eekernels.backend("auto"):
                return case.public()

        providers.append(("auto", public_auto, ""))
        base_ms = None
        for name, fn, why in providers:
            row = {"op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""), "provider": name}
            if fn is None:
                row["status"] = f"unavailable: {why}"
                rows.append(row)
                continue
            if time.time() > deadline:
                row["status"] = "skipped: time budget spent"
                rows.append(row)
                continue
            try:
                if fn == "compile":
                    t0 = time.time()
                    compiled = torch.compile(case.eager)
                    with torch.no_grad():
                        compiled()
                    row["compile_s"] = time.time() - t0
                    fn = compiled
                with torch.no_grad():
                    med, p20, p80 = bench(fn)
                row.update(ms=med, ms_p20=p20, ms_p80=p80, status="ok")
                if case.bytes_moved:
                    row["TBps"] = case.bytes_moved / (med * 1e-3) / 1e12
                if case.flops:
                    row["TFLOPs"] = case.flops / (med * 1e-3) / 1e12
                if base_ms is None:
                    base_ms = med  # the first provider is the baseline (eager, or F.linear)
                row["vs_baseline"] = base_ms / med
                row["baseline"] = case.baseline_name
            except Exception as exc:
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Static analysis (benchmarks/static_analysis.py): no kernel runs, so it overlaps the op section on the CPU
# --------------------------------------------------------------------------------------------------
def static_analysis_start(dry: bool):
    """Start ``static_analysis.py --json`` in a subprocess; (process, json path, start time) or an error dict.
    --dry-run: the Triton report for one op (about 5 s on a 2-core CPU); on CUDA: both reports, every op."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="gpu_suite_static_")) / "static.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "static_analysis.py"), "--json", str(path)]
    if dry:
        cmd += ["--only", "triton", "--ops", "rms_norm"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles for sm_90, runs nothing
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except Exception as exc:
        return {"status": f"error: {exc!r}"}
    return proc, path, time.time(), cmd


def static_analysis_finish(started, timeout_s: float) -> dict:
    """Wait at most ``timeout_s`` for the static analysis; its JSON report, or why there is none."""
    if isinstance(started, dict):
        return started
    proc, path, t0, cmd = started
    out = {"command": " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}
    try:
        _, err = proc.communicate(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {**out, "status": f"skipped: still running after the {timeout_s:.0f} s left for it (killed)"}
    out["seconds"] = round(time.time() - t0, 1)
    if proc.returncode != 0 or not path.is_file():
        tail = (err or "").strip().splitlines()[-1:] or [""]
        return {**out, "status": f"error: exit {proc.returncode}: {tail[0]}"}
    out["report"] = json.loads(path.read_text())
    out["status"] = "ok"
    return out


def static_table(static: dict) -> str:
    """One line per Triton kernel: registers, spills, 16-byte global loads; CUDA C++: instantiations."""
    if static.get("status") != "ok":
        return f"static analysis: {static.get('status')}"
    lines = ["| op | kernel | registers | spills (B) | global loads (16 B) |", "| --- | --- | --- | --- | --- |"]
    for r in static["report"].get("triton", []):
        if not isinstance(r, dict):
            continue
        loads = f"{r.get('global_loads', '')} ({r.get('global_loads_16B', '')})"
        lines.append(f"| {r.get('op', '')} | {r.get('kernel', r.get('error', r.get('skipped', '')))} | "
                     f"{r.get('registers', '')} | {r.get('local_bytes (spills)', '')} | {loads} |")
    cuda = static["report"].get("cuda")
    if cuda is not None:
        lines.append(f"\nCUDA C++: {len(cuda)} kernel instantiation rows (see the JSON)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Whole models (issue 6/6): DiT forward under eager, torch.compile, eekernels and fp8; sampling with
# torch.compile(mode="reduce-overhead") against eekernels' CUDA graphs
# --------------------------------------------------------------------------------------------------
# Compile time to allow before starting a compiled row (DiT-XL/2 on an H100-class GPU; estimates, the JSON
# records each row's measured compile_s): a row that cannot finish inside the budget is skipped, not started.
COMPILE_COST_S = {"default": 60.0, "max-autotune-no-cudagraphs": 150.0, "fullgraph": 60.0, "reduce-overhead": 60.0}


def _model_setup(dev, dry):
    import torch
    from eekernels.eval.baselines import TorchDiT, randomized
    from eekernels.models import DiT

    torch.manual_seed(0)
    if dry:
        model, dtype, B = randomized(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                                         num_heads=4, num_classes=10)), torch.float32, 2
    else:
        with torch.device(dev):
            model = randomized(DiT.from_config("DiT-XL/2"))
        dtype, B = torch.bfloat16, 64
    size = model.input_size
    x = torch.randn(B, model.in_channels, size, size, device=dev)
    t = torch.rand(B, device=dev) * 999
    y = torch.randint(0, model.num_classes, (B,), device=dev)
    with torch.no_grad():
        want = TorchDiT(model)(x, t, y).float()  # float32 weights and inputs: the error baseline
    model = model.to(dtype)
    return model, TorchDiT(model), x.to(dtype), t, y, want


def _elapsed_call(fn, dev):
    import torch

    t0 = time.time()
    with torch.no_grad():
        out = fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.time() - t0, out


def run_models(dev, dry, compile_, deadline) -> list[dict]:
    """DiT-XL/2 bf16 forward at B=64, and DDIM-50 sampling of 1 image with CFG 1.5 (batch 2, the host-bound
    case where graphs matter) at full depth; --dry-run: a 2-block DiT, float32, 3 steps, no torch.compile."""
    import torch
    import eekernels
    from eekernels.models.fp8 import to_fp8
    from eekernels.samplers import sample

    bench = timer(dry)
    rows = []
    try:
        model, plain, x, t, y, want = _model_setup(dev, dry)
    except Exception as exc:
        return [{"section": "forward", "system": "-", "status": f"setup failed: {type(exc).__name__}: {exc}"}]
    B = x.shape[0]
    no_compile = "skipped: no torch.compile in --dry-run" if dry else "skipped: --no-compile"

    def compiled(target, key, **kw):
        def build():
            torch._dynamo.reset()
            return torch.compile(target, **kw)
        return ("compile", key, build)

    forward = [
        ("plain torch eager", lambda: plain(x, t, y)),
        ("plain torch, torch.compile default", compiled(plain, "default")),
        ("plain torch, torch.compile max-autotune-no-cudagraphs",
         compiled(plain, "max-autotune-no-cudagraphs", mode="max-autotune-no-cudagraphs")),
        ("eekernels eager", lambda: model(x, t, y)),
        ("eekernels, torch.compile fullgraph=True", compiled(model, "fullgraph", fullgraph=True)),
        ("eekernels + to_fp8 (per row), eager", "fp8"),
    ]
    base_ms = None
    for name, fn in forward:
        row = {"section": "forward", "system": name, "batch": B, "dtype": str(x.dtype).replace("torch.", "")}
        rows.append(row)
        try:
            if isinstance(fn, tuple):
                _, key, build = fn
                if not compile_:
                    row["status"] = no_compile
                    continue
                if time.time() + COMPILE_COST_S[key] > deadline:
                    row["status"] = f"skipped: time budget (needs ~{COMPILE_COST_S[key]:.0f} s to compile)"
                    continue
                module = build()
                row["compile_s"], _ = _elapsed_call(lambda: module(x, t, y), dev)
                fn = lambda m=module: m(x, t, y)  # noqa: E731
            elif fn == "fp8":
                fp8_model = to_fp8(model)
                fn = lambda: fp8_model(x, t, y)  # noqa: E731
            if time.time() > deadline:
                row["status"] = "skipped: time budget spent"
                continue
            with torch.no_grad(), eekernels.backend("auto"):
                out = fn()
                med, p20, p80 = bench(fn)
            row.update(ms=med, ms_p20=p20, ms_p80=p80, status="ok")
            row["rel_err_vs_fp32"] = float((out.float() - want).norm() / want.norm())
            base_ms = base_ms or med  # plain torch eager
            row["vs_plain_eager"] = base_ms / med
        except Exception as exc:
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    # Sampling: one image, CFG 1.5 (the model sees batch 2), DDIM at full depth.
    from eekernels.graphs import GraphCache

    steps = 3 if dry else 50
    g = torch.Generator(device=dev).manual_seed(1)
    noise = torch.randn(1, model.in_channels, model.input_size, model.input_size, device=dev, generator=g)
    label = torch.randint(0, model.num_classes, (1,), device=dev, generator=g)
    opts = dict(sampler="ddim", steps=steps, cfg_scale=1.5)
    systems = [
        ("plain torch eager", lambda: sample(plain, noise, label, graphs=False, **opts)),
        ("plain torch, torch.compile reduce-overhead", ("compile", "reduce-overhead")),
        ("eekernels eager", lambda: sample(model, noise, label, graphs=False, **opts)),
        ("eekernels CUDA graphs", "graphs"),
    ]
    reference = None
    base_ms = None
    for name, fn in systems:
        row = {"section": "sampling", "system": name, "images": 1, "steps": steps, "cfg": 1.5}
        rows.append(row)
        try:
            if isinstance(fn, tuple):
                if not compile_:
                    row["status"] = no_compile
                    continue
                if time.time() + COMPILE_COST_S["reduce-overhead"] > deadline:
                    row["status"] = "skipped: time budget (needs ~60 s to compile)"
                    continue
                torch._dynamo.reset()
                module = torch.compile(plain, mode="reduce-overhead", dynamic=False)
                fn = lambda m=module: sample(m, noise, label, graphs=False, **opts)  # noqa: E731
                row["compile_s"], _ = _elapsed_call(fn, dev)  # the first trajectory compiles
            elif fn == "graphs":
                if dev != "cuda":
                    row["status"] = "unavailable: CUDA graphs need a CUDA device"
                    continue
                cache = GraphCache()
                fn = lambda: sample(model, noise, label, graphs=True, graph_cache=cache, **opts)  # noqa: E731
            if time.time() > deadline:
                row["status"] = "skipped: time budget spent"
                continue
            _elapsed_call(fn, dev)  # warm-up (captures the graphs, autotunes)
            times = []
            for _ in range(3 if dry else 5):
                dt, out = _elapsed_call(fn, dev)
                times.append(dt * 1e3)
            med = statistics.median(times)
            row.update(ms=med, ms_min=min(times), images_per_s=1e3 / med, status="ok")
            reference = out.float() if reference is None else reference
            row["rel_err_vs_plain_eager"] = float((out.float() - reference).norm() / reference.norm())
            base_ms = base_ms or med
            row["vs_plain_eager"] = base_ms / med
        except Exception as exc:
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return rows


def models_table(rows: list[dict]) -> str:
    lines = ["| section | system | median ms | compile s | vs plain eager | rel err | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ms = f"{r['ms']:.2f}" if "ms" in r else ""
        comp = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        ratio = f"{r['vs_plain_eager']:.2f}×" if "vs_plain_eager" in r else ""
        err = r.get("rel_err_vs_fp32", r.get("rel_err_vs_plain_eager"))
        err = f"{err:.2e}" if err is not None else ""
        lines.append(f"| {r['section']} | {r['system']} | {ms} | {comp} | {ratio} | {err} | {r['status']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def correctness_table(results: list[dict]) -> str:
    lines = ["| op | shape | dtype | impl | status | rel err |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rel = f"{r['rel_err']:.2e}" if "rel_err" in r else ""
        lines.append(f"| {r.get('op', '')} | {r.get('shape', '')} | {r.get('dtype', '')} | {r.get('impl', '')} | "
                     f"{r['status']} | {rel} |")
    return "\n".join(lines)


def timing_table(rows: list[dict], ceil: dict) -> str:
    lines = ["| op | shape | provider | median µs | p20–p80 µs | TB/s | TFLOP/s | vs baseline | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['op']} | {r.get('shape', '')} | {r['provider']} | {r.get('status', '')} | | | | | |")
            continue
        tbps = f"{r['TBps']:.2f}" if "TBps" in r else ""
        tflops = f"{r['TFLOPs']:.0f}" if "TFLOPs" in r else ""
        ratio = f"{r['vs_baseline']:.2f}× {r['baseline']}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['ms_p20'] * 1e3:.1f}–{r['ms_p80'] * 1e3:.1f} | {tbps} | {tflops} | {ratio} | "
                     f"{TARGETS.get(r['op'], '')} |")
    ceiling = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ceil.items())
    lines.append("")
    lines.append(f"Ceilings: {ceiling}")
    return "\n".join(lines)


def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"unavailable: {exc!r}"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except Exception:
        env["commit"] = "unknown"
    from eekernels import _ext

    env["_C"] = _ext.load().build_info() if _ext.available() else _ext.unavailable_reason()
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, host timer, no torch.compile: exercise the suite without a GPU")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--budget-s", type=float, default=220.0,
                   help="ops section: stop starting new correctness checks and timings after this many seconds")
    p.add_argument("--models-budget-s", type=float, default=200.0,
                   help="models section (DiT forward, sampling): its own budget, started after the ops")
    p.add_argument("--static-wait-s", type=float, default=40.0,
                   help="after the ops section, wait at most this long for the static analysis to finish")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-timings", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-static", action="store_true")
    p.add_argument("--skip-text", action="store_true", help="leave out the PixArt-XL/2-512-shaped pipeline rows")
    p.add_argument("--skip-calibration", action="store_true", help="leave out the DiT-XL/2 calibration check")
    return p.parse_args(argv)


#: issue 3/6's GPU row: PixArt-XL/2-512-shaped random weights, bf16, 20 DPM-Solver steps, CFG 4.5, 8 images
TEXT_ARGS = ["--families", "pixart", "--dtype", "bfloat16", "--size", "64", "--blocks", "28", "--heads", "16",
             "--head-dim", "72", "--caption-dim", "4096", "--tokens", "120", "--steps", "20", "--batch", "8"]
TEXT_ARGS_DRY = ["--families", "pixart", "--size", "8", "--blocks", "2", "--steps", "2", "--tokens", "5"]


def run_text_pipelines(dev, dry) -> list[dict]:
    """diffusers' PixArtAlphaPipeline against ``accelerate(pipe)`` at full depth and under the ASE schedule, in this
    process (benchmarks/bench_text_pipelines.py); rows as it gives them, or one error row."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import bench_text_pipelines

        argv = (TEXT_ARGS_DRY if dry else TEXT_ARGS) + ["--device", dev, "--repeats", "1" if dry else "3"]
        return bench_text_pipelines.main(argv)["rows"]
    except Exception as e:  # noqa: BLE001 - one failing section must not lose the report
        return [{"family": "pixart", "system": "all", "note": f"error: {type(e).__name__}: {str(e)[:300]}"}]


def run_calibration(dev, dry) -> dict:
    """Section 7: calibrate DiT-XL/2-shaped random weights, report the cost, and replay the calibrated schedule as
    CUDA graphs (equal to eager; synchronizing calls counted). ``--dry-run``: a tiny DiT on the CPU, no graphs."""
    import warnings

    import torch
    from eekernels.calibration import calibrate
    from eekernels.eval.baselines import randomized
    from eekernels.models import DiT
    from eekernels.samplers import sample

    try:
        torch.manual_seed(0)
        if dry:
            model, dtype, n, steps = randomized(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4,
                                                    num_heads=4, num_classes=10)), torch.float32, 4, 4
        else:
            with torch.device(dev):
                model = randomized(DiT.from_config("DiT-XL/2"))
            dtype, n, steps = torch.bfloat16, 16, 20
        model = model.to(dtype)
        g = torch.Generator().manual_seed(0)
        size = model.input_size
        noise = torch.randn(n, model.in_channels, size, size, generator=g).to(dev)
        labels = (torch.arange(n) % model.num_classes).to(dev)
        kw = dict(sampler="dpmsolver++", steps=steps, cfg_scale=1.5)
        sched = calibrate(model, budget=0.7, noises=noise, conditions=labels, time_reference=True, **kw)
        rep = sched.calibration
        row = {"model": "tiny DiT (dry run)" if dry else "DiT-XL/2 random weights, bf16", "samples": n,
               "steps": steps, "measure": rep.measure, "model_calls": rep.model_calls,
               "calibration_s": rep.seconds, "one_sampling_run_s": rep.reference_seconds,
               "plan": rep.plan, "block_flop_fraction": round(rep.block_flop_fraction, 4)}
        if not dry:
            x, y = noise[:8], labels[:8]
            eager = sample(model, x, y, schedule=sched, graphs=False, **kw)
            graphed = sample(model, x, y, schedule=sched, graphs=True, **kw)  # captures one graph per depth
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    t0 = time.perf_counter()
                    again = sample(model, x, y, schedule=sched, graphs=True, **kw)
                    host_s = time.perf_counter() - t0
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            row.update({"graphs_vs_eager_max_abs": float((graphed.float() - eager.float()).abs().max()),
                        "replay_equal": bool(torch.equal(again, graphed)),
                        "syncs_in_replayed_run": len(rec), "replayed_run_host_s": round(host_s, 4),
                        "sync_messages": sorted({str(w.message)[:120] for w in rec})[:3]})
        return row
    except Exception as e:  # noqa: BLE001 - one failing section must not lose the report
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before eekernels' @triton.jit run
    import torch

    if not dry and not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU is visible; run with --dry-run to exercise it on the CPU", file=sys.stderr)
        return 2
    dev = "cpu" if dry else "cuda"
    start = time.time()
    deadline = start + args.budget_s
    report = {"environment": environment(), "mode": "dry-run (CPU)" if dry else "cuda"}
    static = None if args.skip_static else static_analysis_start(dry)  # CPU only: overlaps the op section
    report["ceilings"] = ceilings(dev, dry)
    dtypes = (torch.bfloat16, torch.float16, torch.float32)  # the sampling dtype first
    # Correctness gets at most half the budget, so that the timings always run.
    report["correctness"] = [] if args.skip_correctness else run_correctness(
        dev, dtypes, dry, min(deadline, start + 0.5 * args.budget_s))
    timing_dtype = torch.float32 if dry else torch.bfloat16
    report["timings"] = [] if args.skip_timings else run_timings(
        dev, timing_dtype, dry, dry, compile_=not (dry or args.no_compile), deadline=deadline)
    # Joined before the models: the batch-2 sampling rows are host-bound and must not share the CPU with it.
    report["static_analysis"] = {"status": "skipped: --skip-static"} if static is None else \
        static_analysis_finish(static, args.static_wait_s)
    report["models"] = [] if args.skip_models else run_models(
        dev, dry, compile_=not (dry or args.no_compile), deadline=time.time() + args.models_budget_s)
    report["text_pipelines"] = [] if args.skip_text else run_text_pipelines(dev, dry)
    report["calibration"] = {"status": "skipped"} if args.skip_calibration else run_calibration(dev, dry)
    report["wall_s"] = round(time.time() - start, 1)

    failures = [r for r in report["correctness"] if r["status"] in ("MISMATCH",) or r["status"].startswith("error")]
    print(json.dumps(report["environment"], indent=1, default=str))
    print("\n## Correctness\n")
    print(correctness_table(report["correctness"]))
    print(f"\n{len(failures)} failure(s) of {len(report['correctness'])} checks")
    print("\n## Static analysis (sm_90)\n")
    print(static_table(report["static_analysis"]))
    print("\n## Models (DiT forward; sampling 1 image, CFG 1.5, DDIM at full depth)\n")
    print(models_table(report["models"]))
    if report["text_pipelines"]:
        import bench_text_pipelines

        print("\n## Text-to-image (PixArt-XL/2-512-shaped in the GPU run; tiny in --dry-run)\n")
        print(bench_text_pipelines.format_table({"rows": report["text_pipelines"]}))
    print("\n## Calibration (issue 5/6)\n")
    print(json.dumps(report["calibration"], indent=1))
    print(f"\nwall time {report['wall_s']:.0f} s")
    print("\n## Timings\n")
    print(timing_table(report["timings"], report["ceilings"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:  # report, don't crash silently: the traceback is the report
        traceback.print_exc()
        sys.exit(3)
