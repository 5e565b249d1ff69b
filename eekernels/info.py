"""``eekernels info``: versions, the ``_C`` build, the device, the backend ``auto`` picks per op, and the in-place
tier's patch rules.

It never fails: every probe is guarded and reports what went wrong instead of raising.
"""
from __future__ import annotations

import importlib
import json
import platform
from importlib import resources


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _guard(fn):
    try:
        return fn()
    except Exception as exc:  # info must never fail
        return f"unavailable ({type(exc).__name__}: {exc})"


def _versions() -> dict:
    import torch

    from eekernels._version import __version__

    out = {"eekernels": __version__, "python": platform.python_version(), "torch": torch.__version__}
    from eekernels.ops._triton import HAS_TRITON, triton

    out["triton"] = triton.__version__ if HAS_TRITON else "not installed (the Triton backend is off)"
    out["torch CUDA runtime"] = torch.version.cuda or "none (CPU build)"
    out["CUDA driver"] = _guard(_driver_version)
    from eekernels import _ext

    if _ext.available():
        out["_C runtime"] = _guard(lambda: dict(_ext.load().runtime_info()))
    return out


def _driver_version() -> str:
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    v = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return "libcuda present, version query failed"
    return f"{v.value // 1000}.{(v.value % 1000) // 10}"


def _build() -> dict:
    from eekernels import _ext

    out = {"_C": "built" if _ext.available() else (_ext.unavailable_reason() or "not built")}
    if _ext.available():
        module = _ext.load()
        out["_C kernels"] = _guard(lambda: ", ".join(module.kernels()))
        out["_C build"] = _guard(lambda: dict(module.build_info()))
    manifest = _guard(lambda: json.loads(resources.files("eekernels").joinpath("BUILD_MANIFEST.json").read_text()))
    out["wheel manifest"] = manifest if isinstance(manifest, dict) else "none (source tree or pure wheel)"
    return out


def _device() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu (no CUDA device visible)", "threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(0)
    return {"device": f"cuda:0 {p.name}", "capability": f"{p.major}.{p.minor}", "SMs": p.multi_processor_count,
            "memory GiB": round(p.total_memory / 2**30, 1)}


def _ops() -> dict:
    """For each op, the implementation ``auto`` would take on this machine's default device, and every
    implementation's reasons against the same input (its ``DISPATCH.explain``)."""
    import torch

    from eekernels import _backend

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"backend in force": _backend.current_backend()}
    for name in __import__("eekernels.ops", fromlist=["__all__"]).__all__:
        module = importlib.import_module(f"eekernels.ops.{name}")
        x = torch.empty(2, 4, 64, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        if name == "group_norm_act":
            x = x.view(2, 4, 8, 8)
        out[name] = _guard(lambda: _auto_line(module.DISPATCH, x))
    return out


def _auto_line(dispatch, x) -> str:
    chosen = dispatch.select(x, backend="auto").name
    why = "; ".join("; ".join(reasons) or f"{impl}: supported"  # each reason starts with its impl's name
                    for impl, reasons in dispatch.explain(x).items())
    rule = "the torch reference off CUDA" if not x.is_cuda else f"first supported of {list(dispatch.auto_order)}"
    return f"{chosen} ({rule}); {why}"


def _graphs() -> dict:
    from eekernels import graphs

    out = {"settings": "EEKERNELS_MAX_GRAPHS, EEKERNELS_MAX_GRAPH_MB or eekernels.graphs.configure()"}
    out.update(graphs.stats())
    return out


def _families() -> dict:
    """The family table: what each family runs in place (its exit rule) and natively, or why it is refused."""
    from eekernels import families

    out = {}
    for name, f in families.families().items():
        if f.refused:
            out[name] = f"refused: {f.refused}"
            continue
        rule = f.exit
        if rule is None:
            where = "native only"
        elif rule.kind == "levels":
            where = "in place: U-Net resolution levels"
        else:
            where = "in place: " + " then ".join(rule.blocks)
        native = f"; native {f.native.partition(':')[2]}" if f.native else ""
        pipes = [p.partition(":")[2] if isinstance(p, str) else p.__qualname__ for p in f.pipelines]
        out[name] = where + native + (f"; pipelines {', '.join(pipes)}" if pipes else "")
    return out


def _patches() -> dict:
    """The in-place tier's patch rules (:mod:`eekernels.patches`): which diffusers classes each replaces, with which
    op. A model's own report says which of its modules were replaced and why the rest were not."""
    from eekernels import patches

    out = {"when": "eekernels.accelerate(obj) in place, kernels=True (the default); fused on CUDA tensors; "
                   "report: print(eekernels.inplace.controller(obj).patches)"}
    for rule in patches.RULES:
        classes = ", ".join(c.partition(":")[2] for c in rule.classes)
        out[rule.name] = f"{classes} -> {' + '.join(rule.ops)}: {rule.fuses}"
    return out


def collect() -> dict:
    sections = {"versions": _versions, "build": _build, "device": _device, "ops (auto)": _ops, "graphs": _graphs,
                "families": _families, "patches (in place)": _patches}
    return {name: (_guard(fn)) for name, fn in sections.items()}


def run(args=None) -> int:
    info = collect()
    if args is not None and getattr(args, "json", False):
        print(json.dumps(info, indent=2, default=str))
        return 0
    for section, values in info.items():
        print(f"[{section}]")
        if isinstance(values, dict):
            for k, v in values.items():
                print(f"  {k}: {v}")
        else:
            print(f"  {values}")
    return 0
