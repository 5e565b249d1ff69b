"""What the compilers say about the kernels, with no GPU: registers, spills, shared memory and load widths.

Two reports, both for Hopper (sm_90):

- **Triton**: each op's launcher runs on CPU tensors of the DiT-XL/2 shapes with the kernel launch intercepted;
  the captured arguments are turned into the signature and specialization Triton would use on a GPU
  (16-byte-aligned pointers and integers divisible by 16 get ``tt.divisibility`` 16, integers equal to 1
  become constants), then ``triton.compile`` builds for ``GPUTarget("cuda", 90, 32)``. From the result: the
  registers, spills (local memory) and shared memory of the cubin (``cuobjdump --dump-resource-usage``), and
  how many of the PTX's global loads and stores are 16-byte vectors (``.v4`` of 32-bit lanes).
- **CUDA C++**: every ``csrc/*.cu`` compiled with ``nvcc -arch=sm_90a -Xptxas -v``: per kernel instantiation,
  registers, spill stores/loads, stack and shared memory.

    python benchmarks/static_analysis.py --json static.json          # both reports
    python benchmarks/static_analysis.py --only triton --ops layer_norm

Nothing here runs a kernel. Registers decide occupancy (65536 per SM on Hopper: at 64 registers per thread,
8 warps per block, 4 blocks fit), and scalar loads where 16-byte vectors were possible are a common reason
for a norm kernel to stay short of the copy ceiling (docs/design.md).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Shapes: DiT-XL/2 at B=64 (the 6/6 targets), and a diffusers U-Net level for group_norm_act.
B, N, D = 64, 256, 1152


def _cases():
    """(op, make_args) with make_args() -> the arguments of the op module's ``_triton`` launcher."""
    import torch

    bf = torch.bfloat16
    r = lambda *s, dtype=bf: torch.randn(*s, dtype=dtype)  # noqa: E731
    cases = {
        "modulated_layer_norm": lambda: (r(B, N, D), r(B, D), r(B, D), 1e-6),
        "gated_residual_norm": lambda: (r(B, N, D), r(B, N, D), r(B, D), r(B, D), r(B, D), None, None, 1e-6),
        "layer_norm": lambda: (r(B, N, D), r(D), r(D), 1e-6),
        "group_norm_act": lambda: (r(8, 256, 32, 32), 32, r(256), r(256), None, None, "silu", 1e-5),
        "linear_act": lambda: (r(B * N, D), r(4 * D, D), r(4 * D), "gelu_tanh"),
    }
    # The flow families' ops (FLUX shapes: 24 heads x 128, 4096 + 512 tokens).
    cases["rms_norm"] = lambda: (r(B, N, D), r(D), 1e-6)
    cases["qk_norm_rope"] = lambda: (r(1, 4608, 3, 24, 128)[:, :, 0], r(1, 4608, 3, 24, 128)[:, :, 1], r(128), r(128),
                                     r(4608, 128, dtype=torch.float32), r(4608, 128, dtype=torch.float32), 1e-6)
    return cases


_TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
          "torch.int64": "i64", "torch.int32": "i32", "torch.uint8": "u8", "torch.bool": "i1"}


def _capture(module, args):
    """Run ``module._triton(*args)`` with ``JITFunction.run`` intercepted: [(kernel, args, kwargs)]."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    calls = []
    originals = JITFunction.run, Autotuner.run

    def run(self, *a, grid, warmup, **kw):
        calls.append((self, a, kw))

    def tuned(self, *a, **kw):  # an autotuned kernel: every config it may pick
        kw.pop("grid", None), kw.pop("warmup", None)
        for config in self.configs:
            calls.append((self.fn, a, {**kw, **config.all_kwargs()}))

    JITFunction.run, Autotuner.run = run, tuned
    try:
        module._triton(*args)
    finally:
        JITFunction.run, Autotuner.run = originals
    return calls


def _signature(kernel, args, kwargs):
    """The signature, constexprs and divisibility attributes Triton would specialize these arguments to."""
    import torch

    sig, constexprs, attrs = {}, {}, {}
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    for i, name in enumerate(kernel.arg_names):
        if i in kernel.constexprs:
            sig[name] = "constexpr"
            constexprs[name] = kwargs[name] if name in kwargs else args[i]
            continue
        v = args[i] if i < len(args) else kwargs[name]
        if v is None:
            sig[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[str(v.dtype)]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {name!r} of type {type(v).__name__} is not handled")
    return sig, constexprs, attrs, options


def _tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.is_file() else shutil.which(name)


def _resources(cubin: bytes) -> dict:
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return {}
    regs, stack, shared, local = map(int, m.groups())
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": shared, "local_bytes (spills)": local}


def _ptx_widths(ptx: str) -> dict:
    loads = re.findall(r"ld\.global(\S*)", ptx)
    stores = re.findall(r"st\.global(\S*)", ptx)
    vec = lambda ops: sum(1 for o in ops if ".v4" in o and (".b32" in o or ".f32" in o or ".u32" in o))  # noqa: E731
    # sm_90 GEMM tiles move through cp.async (global -> shared) rather than ld.global: count those 16-byte copies.
    cp_async = re.findall(r"cp\.async\.\S+\.shared\.global(?:\.\S+)?\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-fA-F]+|\d+)", ptx)
    return {"global_loads": len(loads), "global_loads_16B": vec(loads),
            "global_stores": len(stores), "global_stores_16B": vec(stores),
            "cp_async": len(cp_async), "cp_async_16B": sum(1 for n in cp_async if int(n, 0) == 16),
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx))}


def triton_report(ops=None) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    import eekernels.ops  # noqa: F401 (loads every op module)

    rows = []
    for op, make in _cases().items():
        if ops and op not in ops:
            continue
        module = importlib.import_module(f"eekernels.ops.{op}")
        calls = _capture(module, make())
        if not calls:  # triton.jit made interpreted functions (TRITON_INTERPRET=1 at import): nothing compiles
            rows.append({"op": op, "skipped": "the kernels were imported under TRITON_INTERPRET=1 (interpreted)"})
            continue
        for kernel, args, kwargs in calls:
            sig, constexprs, attrs, options = _signature(kernel, args, kwargs)
            src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            row = {"op": op, "kernel": kernel.fn.__name__, "target": "sm_90",
                   "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                   "constexprs": {k: v for k, v in constexprs.items() if k.isupper()}}
            row.update(_resources(compiled.asm["cubin"]))
            row.update(_ptx_widths(compiled.asm["ptx"]))
            rows.append(row)
    return rows


_PTXAS_FUNC = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> list[dict]:
    """Per kernel: ``ptxas -v`` lines -> {kernel, arch, registers, stack, spill stores/loads, smem}."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = {"kernel": _demangle(m.group(1)), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        if (m := _PTXAS_SPILL.search(line)):
            cur.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if (m := _PTXAS_USED.search(line)):
            cur["registers"] = int(m.group(1))
            if (s := _PTXAS_SMEM.search(line)):
                cur["smem_bytes"] = int(s.group(1))
    return rows


def _demangle(name: str) -> str:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return name
    out = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip()
    return out or name


def cuda_report(arch: str = "sm_90a") -> list[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [{"skipped": "nvcc not on PATH"}]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cu in sorted((ROOT / "csrc").glob("*.cu")):
            proc = subprocess.run([nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v", "-c", str(cu),
                                   "-I", str(ROOT / "csrc"), "-o", os.path.join(d, cu.stem + ".o")],
                                  capture_output=True, text=True)
            if proc.returncode:
                rows.append({"file": cu.name, "error": proc.stderr[-2000:]})
                continue
            rows += [{"file": cu.name, **r} for r in parse_ptxas(proc.stderr)]
    return rows


# The instantiation a (64, 256, 1152) bf16 row takes: 16-byte vectors of 8 bf16, 1152 / 8 / 32 lanes -> 5 per lane.
_DIT_BF16 = "<__nv_bfloat16, __nv_bfloat16, 8, 5>"


def cuda_summary(rows: list[dict]) -> list[dict]:
    """One line per kernel template: how many instantiations, their register range, which spill, and the
    registers of the DiT-XL/2 bf16 instantiation (the full list is in the JSON)."""
    groups: dict = {}
    for r in rows:
        if "kernel" not in r:
            groups[(r.get("file"), "?")] = [r]
            continue
        name = re.sub(r"<.*", "", r["kernel"]).split("::")[-1]
        groups.setdefault((r["file"], name), []).append(r)
    out = []
    for (file, name), rs in groups.items():
        regs = [r["registers"] for r in rs if "registers" in r]
        spills = [r for r in rs if r.get("spill_stores") or r.get("spill_loads")]
        dit = [r["registers"] for r in rs if _DIT_BF16 in r.get("kernel", "")]
        out.append({"file": file, "kernel": name, "instantiations": len(rs),
                    "registers (min-max)": f"{min(regs)}-{max(regs)}" if regs else rs[0].get("error", "")[:80],
                    "with spills": "; ".join(re.sub(r"^.*?<", "<", r["kernel"]).split(">")[0] + f">: {r['spill_stores']} B"
                                             for r in spills) or "none",
                    "at DiT-XL/2 bf16": dit[0] if dit else ""})
    return out


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("triton", "cuda"), help="one report (default: both)")
    p.add_argument("--ops", nargs="*", help="Triton: only these ops")
    p.add_argument("--json", help="write the reports here")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    out = {}
    if args.only in (None, "triton"):
        out["triton"] = triton_report(args.ops)
        print(table(out["triton"], ["op", "kernel", "num_warps", "num_stages", "registers", "local_bytes (spills)",
                                    "global_loads", "global_loads_16B", "global_stores", "global_stores_16B",
                                    "cp_async", "cp_async_16B", "wgmma"]))
    if args.only in (None, "cuda"):
        out["cuda"] = cuda_report()
        print(table(cuda_summary(out["cuda"]), ["file", "kernel", "instantiations", "registers (min-max)",
                                                "with spills", "at DiT-XL/2 bf16"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
