"""The registered ``torch.ops.eekernels.*`` entries validate like the Python wrappers, and so do their fake
impls (torch.compile, FakeTensorMode); eps and float64 inputs on every path."""
import dataclasses
import math
import re
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import eekernels
from eekernels import _ext
from eekernels.ops import _common as C
from eekernels.ops._triton import HAS_TRITON
from tests.utils import INTERPRET, randn

OPS = ["layer_norm", "modulated_layer_norm", "gated_residual_norm", "linear_act", "group_norm_act", "rms_norm",
       "qk_norm_rope"]
FUSED = ["modulated_layer_norm", "gated_residual_norm", "group_norm_act"]  # the ops with a _C kernel


def _module(op):
    return sys.modules[f"eekernels.ops.{op}"]  # eekernels.ops.<op> is the public function, not the module


def _args(op, dtype=torch.float32, device="cpu"):
    """Valid wrapper arguments (positional, keyword) and the same as torch.ops arguments, every tensor given."""
    def r(*shape):
        if device == "cuda":  # under FakeTensorMode, without a GPU: only the metadata exists
            return torch.empty(*shape, dtype=dtype, device=device)
        return randn(*shape, dtype=dtype, dev=device)

    if op == "layer_norm":
        a = dict(x=r(2, 3, 8), weight=r(8), bias=r(8), eps=1e-6)
        return a, lambda a: ((a["x"], a["weight"], a["bias"], a["eps"]), {}), \
            lambda a: (a["x"], a["weight"], a["bias"], a["eps"])
    if op == "modulated_layer_norm":
        a = dict(x=r(2, 3, 8), shift=r(2, 8), scale=r(2, 8), eps=1e-6)
        return a, lambda a: ((a["x"], a["shift"], a["scale"], a["eps"]), {}), \
            lambda a: (a["x"], a["shift"], a["scale"], a["eps"])
    if op == "gated_residual_norm":
        a = dict(x=r(2, 3, 8), y=r(2, 3, 8), gate=r(2, 8), shift=r(2, 8), scale=r(2, 8), weight=r(8), bias=r(8),
                 eps=1e-6)
        return a, lambda a: ((a["x"], a["y"], a["gate"], a["shift"], a["scale"], a["eps"]),
                             dict(weight=a["weight"], bias=a["bias"])), \
            lambda a: (a["x"], a["y"], a["gate"], a["shift"], a["scale"], a["weight"], a["bias"], a["eps"])
    if op == "linear_act":
        a = dict(x=r(2, 3, 8), weight=r(5, 8), bias=r(5), activation="gelu")
        return a, lambda a: ((a["x"], a["weight"], a["bias"], a["activation"]), {}), \
            lambda a: (a["x"], a["weight"], a["bias"], a["activation"])
    if op == "rms_norm":
        a = dict(x=r(2, 3, 8), weight=r(8), eps=1e-6)
        return a, lambda a: ((a["x"], a["weight"], a["eps"]), {}), lambda a: (a["x"], a["weight"], a["eps"])
    if op == "qk_norm_rope":  # "x" is q; N == H, so the (B, H, N, Dh) outputs have q's shape
        a = dict(x=r(2, 3, 3, 8), k=r(2, 3, 3, 8), q_weight=r(8), k_weight=r(8), cos=r(3, 8), sin=r(3, 8), eps=1e-6)
        args = lambda a: (a["x"], a["k"], a["q_weight"], a["k_weight"], a["cos"], a["sin"], a["eps"])  # noqa: E731
        return a, lambda a: (args(a), {}), args
    a = dict(x=r(2, 8, 3, 3), num_groups=4, weight=r(8), bias=r(8), scale=r(2, 8), shift=r(2, 8), activation="silu",
             eps=1e-5)
    return a, lambda a: ((a["x"], a["num_groups"], a["weight"], a["bias"], a["scale"], a["shift"], a["activation"],
                          a["eps"]), {}), \
        lambda a: (a["x"], a["num_groups"], a["weight"], a["bias"], a["scale"], a["shift"], a["activation"], a["eps"])


# Per op: changes that make the inputs wrong (too-small parameters, wrong ranks) and the message's start.
BAD = {
    "layer_norm": [("weight", lambda a: a["weight"][:5], r"`weight` expected shape \(8,\)"),
                   ("bias", lambda a: a["bias"][None], r"`bias` expected shape \(8,\)")],
    "modulated_layer_norm": [("shift", lambda a: a["shift"][:1], r"`shift` expected shape \(2, 8\)"),
                             ("scale", lambda a: a["scale"][:, :3], r"`scale` expected shape \(2, 8\)"),
                             ("x", lambda a: a["x"][0], r"`x` expected 3 dims")],
    "gated_residual_norm": [("y", lambda a: a["y"][:, :1], r"`y` expected shape \(2, 3, 8\)"),
                            ("gate", lambda a: a["gate"][:1], r"`gate` expected shape \(2, 8\)"),
                            ("weight", lambda a: a["weight"][:2], r"`weight` expected shape \(8,\)")],
    "linear_act": [("weight", lambda a: a["weight"][:, :7], r"`weight` expected shape \(M, 8\)"),
                   ("bias", lambda a: a["bias"][:4], r"`bias` expected shape \(5,\)")],
    "group_norm_act": [("scale", lambda a: a["scale"][:, :4], r"`scale` expected shape \(2, 8\)"),
                       ("weight", lambda a: a["weight"][:7], r"`weight` expected shape \(8,\)"),
                       ("x", lambda a: a["x"][0], r"`x` expected 4 dims")],
    "rms_norm": [("weight", lambda a: a["weight"][:5], r"`weight` expected shape \(8,\)"),
                 ("weight", lambda a: a["weight"][None], r"`weight` expected shape \(8,\)")],
    "qk_norm_rope": [("k", lambda a: a["k"][:, :2], r"`k` expected shape \(2, 3, 3, 8\)"),
                     ("k_weight", lambda a: a["k_weight"][:4], r"`k_weight` expected shape \(8,\)"),
                     ("sin", lambda a: a["sin"][:2], r"`sin` expected shape \(3, 8\)"),
                     ("x", lambda a: a["x"][0], r"`q` expected 4 dims")],
}
CASES = [(op, name, change, match) for op, cases in BAD.items() for name, change, match in cases]
IDS = [f"{op}-{name}" for op, name, _, _ in CASES]


def _message(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.fixture
def no_launch(monkeypatch):
    """Every implementation raises if reached: validation must come before any of them runs."""
    for op in OPS:
        d = _module(op).DISPATCH
        for impl in d.impls:
            fake = dataclasses.replace(impl, fn=lambda *a, _n=impl.name: pytest.fail(f"{_n} ran"))
            monkeypatch.setitem(d.by_name, impl.name, fake)
        monkeypatch.setattr(d, "torch", d.by_name["torch"])


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if INTERPRET else []))
@pytest.mark.parametrize("op, name, change, match", CASES, ids=IDS)
def test_torch_ops_raise_the_wrappers_error_before_any_launch(op, name, change, match, backend, no_launch):
    a, wrapper_args, op_args = _args(op)
    a = {**a, name: change(a)}
    args, kwargs = wrapper_args(a)
    with eekernels.backend(backend):
        want = _message(lambda: getattr(eekernels.ops, op)(*args, **kwargs))
        got = _message(lambda: getattr(torch.ops.eekernels, op)(*op_args(a)))
    assert got == want
    assert f"{op}: " in got and re.search(match, got), got


@pytest.mark.parametrize("op, name, change, match", CASES, ids=IDS)
def test_fake_impls_check_shapes(op, name, change, match):
    a, _, op_args = _args(op)
    with FakeTensorMode() as mode:
        good = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        out = getattr(torch.ops.eekernels, op)(*op_args(good))
        first = out[0] if isinstance(out, tuple) else out
        assert first.shape[:-1] == good["x"].shape[:-1]
        bad = {**good, name: change(good)}
        with pytest.raises(ValueError, match=match):
            getattr(torch.ops.eekernels, op)(*op_args(bad))


def test_fake_impl_takes_symbolic_sizes_without_specializing():
    """torch.compile(dynamic=True): one graph serves several sizes, and a bad one is reported at trace time."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, s, c: eekernels.ops.modulated_layer_norm(x, s, c), backend="aot_eager",
                       fullgraph=True, dynamic=True)
    for B, N, D in [(2, 3, 8), (3, 5, 11)]:
        x, s, c = randn(B, N, D, dtype=torch.float64).requires_grad_(), randn(B, D), randn(B, D)
        ref = _module("modulated_layer_norm").reference(x, s, c)
        torch.testing.assert_close(fn(x, s, c), ref)
    with pytest.raises(Exception, match=r"modulated_layer_norm: `scale` expected shape"):
        fn(randn(3, 5, 11), randn(3, 11), randn(3, 10))


def test_opcheck_with_validation():
    a, _, op_args = _args("layer_norm")
    torch.library.opcheck(torch.ops.eekernels.layer_norm.default, op_args(a))


def test_wrapper_validates_once_on_each_path(monkeypatch):
    m = _module("modulated_layer_norm")
    calls = []
    original = m.validate
    monkeypatch.setattr(m, "validate", lambda *a, **k: (calls.append(k.get("fake", False)), original(*a, **k))[1])
    x, s, c = randn(2, 3, 8), randn(2, 8), randn(2, 8)
    eekernels.ops.modulated_layer_norm(x, s, c)  # eager
    assert calls == [False]
    calls.clear()
    eekernels.ops.modulated_layer_norm(x.requires_grad_(), s, c)  # op path: validated in the registered impl
    assert calls == [False]


@pytest.mark.parametrize("op", [op for op in OPS if op != "linear_act"])
@pytest.mark.parametrize("eps", [math.inf, -math.inf, math.nan, -1e-6, 0.0, 0, True, False, "1e-6", None])
def test_bad_eps(op, eps):
    a, wrapper_args, op_args = _args(op)
    a = {**a, "eps": eps}
    args, kwargs = wrapper_args(a)
    match = r"`eps` expected a positive float \(finite, not a bool\), got " + re.escape(repr(eps))
    with pytest.raises(ValueError, match=match):
        getattr(eekernels.ops, op)(*args, **kwargs)
    grad_args = {**a, "x": a["x"].requires_grad_()}  # the op path: checked before the float schema sees it
    args, kwargs = wrapper_args(grad_args)
    with pytest.raises(ValueError, match=match):
        getattr(eekernels.ops, op)(*args, **kwargs)
    if not isinstance(eps, (bool, str)) and eps is not None:  # the schema turns a bool into 1.0, rejects the rest
        with pytest.raises(ValueError, match=r"`eps` expected a positive float"):
            getattr(torch.ops.eekernels, op)(*op_args(a))


def test_good_eps_forms_are_accepted():
    x = randn(2, 3, 8)
    one = eekernels.ops.layer_norm(x, eps=1)
    assert torch.equal(one, eekernels.ops.layer_norm(x, eps=1.0))


# --------------------------------------------------------------------------------------------------
# float64
# --------------------------------------------------------------------------------------------------
def _ln64(x, eps):
    """LayerNorm written out in float64, independent of the references (which could downcast)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def test_torch_path_computes_float64_in_float64():
    """Within 1e-12 of a float64 formula: a float32 computation anywhere would be ~1e-7 off."""
    x = randn(2, 3, 40, dtype=torch.float64, scale=2.0, offset=0.5)
    y, shift, scale, gate = randn(2, 3, 40, dtype=torch.float64), *(randn(2, 40, dtype=torch.float64) for _ in range(3))
    w, b = randn(40, dtype=torch.float64), randn(40, dtype=torch.float64)
    tight = dict(atol=1e-12, rtol=1e-12)
    with eekernels.backend("torch"):
        ops = eekernels.ops
        torch.testing.assert_close(ops.layer_norm(x, w, b), _ln64(x, 1e-6) * w + b, **tight)
        torch.testing.assert_close(ops.modulated_layer_norm(x, shift, scale),
                                   _ln64(x, 1e-6) * (1 + scale[:, None]) + shift[:, None], **tight)
        x_out, h = ops.gated_residual_norm(x, y, gate, shift, scale)
        torch.testing.assert_close(x_out, x + gate[:, None] * y, **tight)
        torch.testing.assert_close(h, _ln64(x_out, 1e-6) * (1 + scale[:, None]) + shift[:, None], **tight)
        wl = randn(7, 40, dtype=torch.float64)
        torch.testing.assert_close(ops.linear_act(x, wl, None, "silu"), torch.nn.functional.silu(x @ wl.T), **tight)
        xg = randn(2, 8, 3, 3, dtype=torch.float64, offset=0.5)
        g = xg.reshape(2, 4, -1)
        want = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5))
        torch.testing.assert_close(ops.group_norm_act(xg, 4, activation=None), want.reshape(xg.shape), **tight)


def _needs_triton(op) -> bool:
    return not HAS_TRITON and _module(op).AUTO_ORDER[0] == "triton"


@pytest.fixture
def C_built(monkeypatch):
    """Pretend eekernels._C imports, so that the only reason left against the CUDA kernels is the dtype."""
    monkeypatch.setattr(_ext, "_try_import", lambda: (object(), None))


@pytest.mark.parametrize("op", OPS)
def test_auto_takes_torch_for_float64_cuda_inputs_and_says_why(op, C_built, monkeypatch):
    """No GPU needed: fake CUDA tensors carry device and dtype, which is all the selection reads."""
    if _needs_triton(op):
        pytest.skip("needs triton: Triton is this op's fastest kernel, which float32 must get")
    monkeypatch.delenv("EEKERNELS_BACKEND", raising=False)
    m = _module(op)
    with FakeTensorMode():
        a64, _, _ = _args(op, torch.float64, "cuda")
        a32, _, _ = _args(op, torch.float32, "cuda")
    tensors = lambda a: [v for k, v in a.items() if isinstance(v, torch.Tensor) and k != "x"]  # noqa: E731
    name32 = m.DISPATCH.select(a32["x"], *tensors(a32), backend="auto").name
    assert name32 == m.AUTO_ORDER[0]  # float32: the fastest kernel, as before
    name = m.DISPATCH.select(a64["x"], *tensors(a64), backend="auto").name
    why = "; ".join(sum(m.DISPATCH.explain(a64["x"], *tensors(a64)).values(), []))
    impl = m.DISPATCH.select(a64["x"], *tensors(a64))
    if op == "linear_act":  # cuBLAS is torch's own float64 GEMM
        assert (name, impl.name) == ("cublas", "cublas")
        return
    assert (name, impl.name) == ("torch", "torch")
    assert "triton: float64 is not supported by triton" in why
    if op in FUSED:
        assert "cuda: float64 is not supported by cuda" in why


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", FUSED)
def test_explicit_kernel_backend_rejects_float64_naming_the_dtype(op, backend, C_built):
    a, wrapper_args, op_args = _args(op, torch.float64)
    args, kwargs = wrapper_args(a)
    match = rf"{op}: `x` has dtype torch.float64, which backend '{backend}' does not support"
    with eekernels.backend(backend):
        with pytest.raises(ValueError, match=match):
            getattr(eekernels.ops, op)(*args, **kwargs)
        with pytest.raises(ValueError, match=match):
            getattr(torch.ops.eekernels, op)(*op_args(a))


def test_unavailable_backend_lists_the_dtype_reason(monkeypatch):
    pytest.importorskip("triton", reason="needs triton: the reasons checked include the interpreter's")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _module("layer_norm")
    with eekernels.backend("cuda"), pytest.raises(C.BackendUnavailable) as info:
        m.DISPATCH.select(randn(2, 3, 8, dtype=torch.float64))
    msg = str(info.value)
    assert "triton: float64 is not supported by triton; triton: needs CUDA tensors" in msg
    assert "torch: supported" in msg
