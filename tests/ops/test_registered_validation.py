"""The registered ``torch.ops.eekernels.*`` entries validate like the Python wrappers, and so do their fake
impls (torch.compile, FakeTensorMode); eps and float64 inputs on every path; and a table of every bad argument
of every op tried on every entry point (the Python function eager and on its autograd path, torch.ops, the fake
impl, cfg_step's in-place forms; fp8_linear's function)."""
import dataclasses
import importlib
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
       "qk_norm_rope", "cfg_step"]
EPS_OPS = [op for op in OPS if op not in ("linear_act", "cfg_step")]
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
    if op == "cfg_step":  # scale, a, b: 0-d; out: [cond; uncond] with learned-sigma channels (2B, 2C, ...)
        a = dict(x=r(2, 4, 3, 3), out=r(4, 8, 3, 3), scale=r(()), a=r(()), b=r(()), cfg_channels=2)
        args = lambda a: (a["x"], a["out"], a["scale"], a["a"], a["b"])  # noqa: E731
        return a, lambda a: (args(a), dict(cfg_channels=a["cfg_channels"])), lambda a: (*args(a), a["cfg_channels"])
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


@pytest.mark.parametrize("op", EPS_OPS)
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
    if not isinstance(eps, str) and eps is not None:  # a Scalar schema passes bools on; a str it refuses itself
        with pytest.raises(ValueError, match=match):
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


# --------------------------------------------------------------------------------------------------
# Every bad argument on every entry point. Each op's arguments have kinds; each kind a list of ways to be wrong.
# Entry points: the Python function (eager, and the autograd path through torch.ops), torch.ops.eekernels.<op>,
# and its fake impl (FakeTensorMode); cfg_step also in place (inplace=True and torch.ops.eekernels.cfg_step_).
# Every one must raise the same ValueError naming the argument before any implementation runs, except where
# the value's Python type is one the op's schema refuses (SCHEMA: a list for a tensor, a string for a number):
# there torch's dispatcher raises a RuntimeError naming the argument before eekernels' code runs.
# --------------------------------------------------------------------------------------------------
SCHEMA = True
_EPS = [("NaN", math.nan), ("Inf", math.inf), ("-Inf", -math.inf), ("negative", -1e-6), ("zero", 0.0),
        ("int zero", 0), ("True", True), ("False", False), ("a string", "1e-6", SCHEMA)]
MUTATIONS = {
    "x": [("a list", lambda t: t.tolist(), SCHEMA), ("int32 dtype", lambda t: t.to(torch.int32))],
    "x_rank": [("one more dim", lambda t: t[None]), ("one dim fewer", lambda t: t[0])],  # a fixed-rank x
    "x_0d": [("0-d", lambda t: t.sum())],  # an x of shape (..., D)
    "x_1d": [("1-d", lambda t: t.reshape(-1))],  # cfg_step's (B, C, ...)
    "tensor": [("a list", lambda t: t.tolist(), SCHEMA), ("a float", lambda t: 3.0, SCHEMA),
               ("one more dim", lambda t: t[None]), ("one dim fewer", lambda t: t[0]),
               ("last dim one short", lambda t: t[..., :-1]), ("int32 dtype", lambda t: t.to(torch.int32)),
               ("on the meta device", lambda t: t.to("meta"))],
    "float16": [("float16 dtype (x is float32)", lambda t: t.half())],  # x's dtype or float32 only
    "first": [("first dim one short", lambda t: t[:-1])],
    "required": [("None", lambda t: None)],  # the dispatcher passes None for a Tensor on: validate names it
    "pair": [("None (its pair given)", lambda t: None)],  # optional alone, not without its partner
    "scalar0d": [("a float", lambda t: 4.0, SCHEMA), ("shape (1,)", lambda t: t.reshape(1)),
                 ("int32 dtype", lambda t: t.to(torch.int32)), ("on the meta device", lambda t: t.to("meta"))],
    "out": [("a list", lambda t: t.tolist(), SCHEMA), ("None", lambda t: None),
            ("rows one short", lambda t: t[:-1]), ("C + 1 channels", lambda t: t[:, :5]),
            ("spatial one short", lambda t: t[..., :-1]), ("one dim fewer", lambda t: t[..., 0]),
            ("int32 dtype", lambda t: t.to(torch.int32)), ("on the meta device", lambda t: t.to("meta"))],
    "eps": [(label, lambda _, v=v: v, *rest) for label, v, *rest in _EPS + [("None", None, SCHEMA)]],
    "eps_optional": [(label, lambda _, v=v: v, *rest) for label, v, *rest in _EPS + [("None (weights given)", None)]],
    "num_groups": [(label, lambda _, v=v: v, *rest) for label, v, *rest in [
        ("True", True), ("False", False), ("zero", 0), ("negative", -4), ("not dividing C = 8", 3),
        ("more than C", 16), ("a float", 4.0), ("a string", "4", SCHEMA), ("None", None, SCHEMA)]],
    "cfg_channels": [(label, lambda _, v=v: v, *rest) for label, v, *rest in [
        ("True", True), ("False", False), ("zero", 0), ("negative", -1), ("C + 1 = 5", 5), ("99", 99),
        ("a float", 2.0), ("a string", "2", SCHEMA)]],
    "activation": [(label, lambda _, v=v: v, *rest) for label, v, *rest in [
        ("unknown", "relu6"), ("capitalized", "SiLU"), ("an int", 3, SCHEMA)]],
}
PARAM = ["tensor", "float16"]  # a parameter in x's dtype or float32, None allowed
SPEC = {
    "layer_norm": dict(x=["x", "x_0d"], weight=PARAM, bias=PARAM, eps=["eps"]),
    "rms_norm": dict(x=["x", "x_0d"], weight=PARAM, eps=["eps"]),
    "modulated_layer_norm": dict(x=["x", "x_rank"], shift=PARAM + ["first", "required"],
                                 scale=PARAM + ["first", "required"], eps=["eps"]),
    "gated_residual_norm": dict(x=["x", "x_rank"], y=PARAM + ["first", "required"], gate=PARAM + ["first"],
                                shift=PARAM + ["first", "pair"], scale=PARAM + ["first", "pair"], weight=PARAM,
                                bias=PARAM, eps=["eps"]),
    "linear_act": dict(x=["x", "x_0d"], weight=PARAM + ["required"], bias=PARAM, activation=["activation"]),
    "group_norm_act": dict(x=["x", "x_rank"], num_groups=["num_groups"], weight=PARAM, bias=PARAM,
                           scale=PARAM + ["first", "pair"], shift=PARAM + ["first", "pair"],
                           activation=["activation"], eps=["eps"]),
    "qk_norm_rope": dict(x=["x", "x_rank"], k=PARAM + ["first", "required"], q_weight=PARAM, k_weight=PARAM,
                         cos=["tensor", "first", "pair"], sin=["tensor", "first", "pair"], eps=["eps_optional"]),
    "cfg_step": dict(x=["x", "x_1d"], out=["out"], scale=["scalar0d"], a=["scalar0d", "required"],
                     b=["scalar0d", "required"], cfg_channels=["cfg_channels"]),
}
ARG_NAME = {("qk_norm_rope", "x"): "q"}  # _args calls q "x"
TABLE = [(op, arg, label, change, bool(rest)) for op, args in SPEC.items() for arg, kinds in args.items()
         for kind in kinds for label, change, *rest in MUTATIONS[kind]]


def _entries(op, a, arg):
    """(label, call) for every entry point of ``op``; ``a``: the (bad) arguments, ``arg``: the one made bad."""
    _, wrapper_args, op_args = _args(op)
    fn, registered = getattr(eekernels.ops, op), getattr(torch.ops.eekernels, op)
    # The autograd path: another tensor argument requires grad (x only if no other: cfg_step_ writes x).
    grad = next(k for k, v in [*a.items(), ("x", a["x"])] if k not in (arg, "x") and isinstance(v, torch.Tensor)
                or k == "x" != arg)
    with_grad = {**a, grad: a[grad].detach().clone().requires_grad_()}

    def call(f, a, **kw):
        args, kwargs = wrapper_args(a)
        return lambda: f(*args, **kwargs, **kw)

    def fake(f):
        def run():
            with FakeTensorMode() as mode:
                f(*op_args({k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}))
        return run

    entries = [("function", call(fn, a), False), ("function, autograd path", call(fn, with_grad), False),
               ("torch.ops", lambda: registered(*op_args(a)), True), ("fake impl", fake(registered), True)]
    if op == "cfg_step":
        entries += [("function, inplace=True", call(fn, a, inplace=True), False),
                    ("function, inplace=True, autograd path", call(fn, with_grad, inplace=True), False),
                    ("torch.ops cfg_step_", lambda: torch.ops.eekernels.cfg_step_(*op_args(a)), True),
                    ("fake impl of cfg_step_", fake(torch.ops.eekernels.cfg_step_), True)]
    return entries


@pytest.mark.parametrize("op, arg, label, change, schema", TABLE, ids=[f"{o}-{a}-{la}" for o, a, la, _, _ in TABLE])
def test_every_bad_argument_on_every_entry_point(op, arg, label, change, schema, no_launch):
    a, _, _ = _args(op)
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    a = {**a, arg: change(a[arg])}
    name = ARG_NAME.get((op, arg), arg)
    messages = {}
    for entry, call, through_schema in _entries(op, a, arg):
        if schema and through_schema:
            with pytest.raises(RuntimeError, match=rf"Expected a value of type .* for argument '{name}'"):
                call()
            continue
        with pytest.raises(ValueError) as info:
            call()
        messages[entry] = str(info.value)
    want = messages["function"]
    assert want.startswith(f"{op}: ") and f"`{name}`" in want, want
    assert all(m == want for m in messages.values()), messages
    assert all(torch.equal(a[k], v) for k, v in before.items() if k != arg), "an input was modified"


def test_qk_norm_rope_odd_head_dim_with_rope_on_every_entry_point(no_launch):
    """RoPE rotates pairs: an odd Dh (every tensor consistent with it) is q's fault, on every entry, fake included."""
    a, _, _ = _args("qk_norm_rope")
    a = {**a, **{k: a[k][..., :7] for k in ("x", "k", "q_weight", "k_weight", "cos", "sin")}}
    messages = set()
    for entry, call, _ in _entries("qk_norm_rope", a, "x"):
        with pytest.raises(ValueError) as info:
            call()
        messages.add(str(info.value))
    assert messages == {"qk_norm_rope: `q` expected an even head dim Dh for RoPE (cos and sin given), got shape "
                        "(2, 3, 3, 7) (B, N, H, Dh)"}


# fp8_linear has no registered op (inference only): its one entry point is the Python function.
def _fp8_args():
    from eekernels.ops.fp8_linear import quantize_fp8

    wq, ws = quantize_fp8(randn(16, 32))  # per tensor: x_scale (a calibrated scale) is allowed
    return dict(x=randn(4, 32), weight_fp8=wq, weight_scale=ws, bias=randn(16), activation="gelu", x_scale=0.01)


def _value(v):
    return lambda _: v


FP8_MUTATIONS = {
    "x": [*MUTATIONS["x"], *MUTATIONS["x_0d"], ("last dim one short (K)", lambda t: t[..., :-1])],
    "weight_fp8": [("float32, not quantized", lambda t: t.float()), *MUTATIONS["x_rank"],
                   ("on the meta device", lambda t: t.to("meta")), ("None", _value(None))],
    "weight_scale": [("float16 dtype", lambda t: t.half()), ("shape (3,)", lambda t: t.expand(3)),
                     ("on the meta device", lambda t: t.to("meta")), ("a float", _value(0.1)), ("None", _value(None))],
    "bias": [m for m in MUTATIONS["tensor"] if m[0] != "a float"],
    "activation": MUTATIONS["activation"],
    "x_scale": [(label, _value(v)) for label, v in [
        ("True", True), ("NaN", math.nan), ("Inf", math.inf), ("negative", -1.0), ("zero", 0.0), ("a string", "0.1"),
        ("a (2,) tensor", torch.full((2,), 0.01)), ("an int tensor", torch.tensor(1)),
        ("a NaN tensor", torch.tensor(math.nan)), ("a tensor on the meta device", torch.tensor(0.01, device="meta"))]],
}
FP8_TABLE = [(arg, label, change) for arg, muts in FP8_MUTATIONS.items() for label, change, *_ in muts]


@pytest.mark.parametrize("arg, label, change", FP8_TABLE, ids=[f"{a}-{la}" for a, la, _ in FP8_TABLE])
def test_fp8_linear_every_bad_argument(arg, label, change, monkeypatch):
    m = importlib.import_module("eekernels.ops.fp8_linear")
    monkeypatch.setattr(m, "IMPLS", tuple(dataclasses.replace(impl, fn=lambda *a, _n=impl.name: pytest.fail(
        f"{_n} ran")) for impl in m.IMPLS))
    a = _fp8_args()
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    a = {**a, arg: change(a[arg])}
    with pytest.raises(ValueError, match=rf"^fp8_linear: `{arg}` expected .*, got "):
        m.fp8_linear(**a)
    assert all(torch.equal(a[k], v) for k, v in before.items() if k != arg), "an input was modified"


# torch.compile(dynamic=True): numbers passed in arrive at the fake impls as SymInt / SymFloat. One graph serves
# several values, and a bad value is reported (a deferred check: no recompilation per value).
def test_compiled_dynamic_numbers_are_checked_without_specializing():
    from eekernels.ops.cfg_step import reference as cfg_reference
    from eekernels.ops.group_norm_act import reference as gn_reference

    torch._dynamo.reset()
    gn = torch.compile(lambda x, g, e: eekernels.ops.group_norm_act(x, g, eps=e), backend="aot_eager",
                       fullgraph=True, dynamic=True)
    for C, G, eps in [(8, 4, 1e-5), (12, 3, 1e-3)]:
        x = randn(2, C, 3, 3, dtype=torch.float64).requires_grad_()
        torch.testing.assert_close(gn(x, G, eps), gn_reference(x, G, eps=eps))
    # At trace time the message shows the symbols (s0, ...) where eager shows numbers.
    for G, match in [(5, "`num_groups` expected to divide the .* channels"), (0, "`num_groups` expected a positive")]:
        with pytest.raises(Exception, match=match):
            gn(randn(2, 12, 3, 3).requires_grad_(), G, 1e-5)
    with pytest.raises(Exception, match=r"`eps` expected a positive float"):
        gn(randn(2, 12, 3, 3).requires_grad_(), 3, -1e-5)

    torch._dynamo.reset()
    step = torch.compile(lambda x, o, s, a, b, k: eekernels.ops.cfg_step(x, o, s, a, b, cfg_channels=k),
                         backend="aot_eager", fullgraph=True, dynamic=True)
    for C, k in [(4, 2), (6, 3)]:
        x, out, s, a, b = randn(2, C, 3, 3), randn(4, C, 3, 3), randn(()), randn(()), randn(())
        torch.testing.assert_close(step(x, out, s, a, b, k), cfg_reference(x, out, s, a, b, k))
    with pytest.raises(Exception, match=r"`cfg_channels` expected None or an int in \[1, .*\]"):
        step(randn(2, 6, 3, 3), randn(4, 6, 3, 3), randn(()), randn(()), randn(()), 7)
