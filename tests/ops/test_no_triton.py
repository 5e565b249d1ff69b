"""Without Triton (macOS, Windows): the package imports, the ops run, and the Triton backend says why not.

Each test runs a fresh interpreter with ``import triton`` blocked (``sys.modules["triton"] = None``) before
``import eekernels``; TRITON_INTERPRET=1 is set so that only the missing module can stop the Triton backend.
"""
import json
import os
import subprocess
import sys
import textwrap

PRELUDE = """
import json, sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
import torch
import eekernels
from eekernels.ops import _common, _triton
"""


def _run(body: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("EEKERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ops_run_on_torch_and_triton_backend_says_not_installed():
    out = _run("""
        mods = {op: sys.modules[f"eekernels.ops.{op}"] for op in eekernels.ops.__all__}
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)
        args = {
            "layer_norm": (r(2, 3, 8), r(8), r(8)),
            "modulated_layer_norm": (r(2, 3, 8), r(2, 8), r(2, 8)),
            "gated_residual_norm": (r(2, 3, 8), r(2, 3, 8), r(2, 8), r(2, 8), r(2, 8)),
            "linear_act": (r(2, 3, 8), r(5, 8), r(5), "gelu"),
            "group_norm_act": (r(2, 8, 3, 3), 4, r(8), r(8), r(2, 8), r(2, 8), "silu"),
            "cfg_step": (r(2, 3, 4, 5), r(4, 6, 4, 5), r(1)[0], r(1)[0], r(1)[0]),
        }
        res = {"has_triton": _triton.HAS_TRITON, "same": {}, "auto": {}, "explicit": {}, "reasons": {}}
        for op, a in args.items():
            fn = getattr(eekernels.ops, op)
            with eekernels.backend("torch"):
                want = fn(*a)
            got = fn(*a)  # auto
            pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
            res["same"][op] = all(torch.equal(p, q) for p, q in pairs)
            res["auto"][op] = mods[op].DISPATCH.select(a[0], backend="auto").name
            res["reasons"][op] = mods[op].DISPATCH.explain(a[0])["triton"]
            try:
                with eekernels.backend("triton"):
                    fn(*a)
                res["explicit"][op] = "ran"
            except _common.BackendUnavailable as exc:
                res["explicit"][op] = str(exc)
        try:
            mods["layer_norm"]._triton(r(2, 8), None, None, 1e-6)  # the stand-in kernel itself
            res["launch"] = "ran"
        except RuntimeError as exc:
            res["launch"] = str(exc)
        print(json.dumps(res))
    """)
    assert out["has_triton"] is False
    for op, same in out["same"].items():
        assert same, op
        assert out["auto"][op] == "torch", op
        assert out["reasons"][op] == ["triton: triton is not installed (pip install triton; Linux only)"], op
        assert f"{op}: backend 'triton' cannot run these inputs" in out["explicit"][op], op
        assert "triton: triton is not installed" in out["explicit"][op], op
    assert "_layer_norm_kernel: triton is not installed" in out["launch"]


def test_auto_on_cuda_inputs_skips_triton_for_cuda():
    """No GPU needed: fake CUDA tensors carry the device, which is all the selection reads."""
    out = _run("""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from eekernels import _ext
        _ext._try_import = lambda: (object(), None)  # pretend _C is built
        with FakeTensorMode():
            x = torch.empty(2, 3, 8, device="cuda")
            picks = {op: sys.modules[f"eekernels.ops.{op}"].DISPATCH.select(x, backend="auto").name
                     for op in ("layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act")}
            xg = torch.empty(2, 8, 3, 3, device="cuda")
            picks["group_norm_act"] = sys.modules["eekernels.ops.group_norm_act"].DISPATCH.select(
                xg, backend="auto").name
        print(json.dumps(picks))
    """)
    # Triton is first in auto order for gated_residual_norm and group_norm_act: the _C kernel takes over.
    assert out == {"layer_norm": "torch", "modulated_layer_norm": "cuda", "gated_residual_norm": "cuda",
                   "linear_act": "cublas", "group_norm_act": "cuda"}


def test_info_reports_triton_not_installed():
    out = _run("""
        import contextlib, io
        from eekernels import info
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = info.run()
        print(json.dumps({"rc": rc, "text": buf.getvalue()}))
    """)
    assert out["rc"] == 0
    lines = out["text"].splitlines()
    assert any(line.strip().startswith("triton: not installed") for line in lines), out["text"]
    for op in ("layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act", "group_norm_act"):
        line = next(line for line in lines if line.strip().startswith(f"{op}:"))
        assert line.strip().startswith(f"{op}: torch"), line
        assert "triton: triton is not installed" in line, line

