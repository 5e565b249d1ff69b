"""Property test of every op on the torch and Triton paths: shapes, dtypes (float64 included) and strides.

Each example either matches the float64 reference within the dtype's tolerance (tests/utils.py's table) or
raises a named ValueError (float64 on Triton: the kernels would compute it in float32). No crash, no silent
mismatch. Triton runs on CPU through its interpreter (TRITON_INTERPRET=1, tests/conftest.py).
"""
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import gated_residual_norm, group_norm_act, layer_norm, linear_act, modulated_layer_norm
from eekernels.ops import qk_norm_rope, rms_norm
from tests.utils import INTERPRET, TOLERANCES, backends_here, randn

GRN = sys.modules["eekernels.ops.gated_residual_norm"]  # eekernels.ops.<op> is the public function
GNA = sys.modules["eekernels.ops.group_norm_act"]
LN = sys.modules["eekernels.ops.layer_norm"]
LIN = sys.modules["eekernels.ops.linear_act"]
MLN = sys.modules["eekernels.ops.modulated_layer_norm"]
RMS = sys.modules["eekernels.ops.rms_norm"]
QKR = sys.modules["eekernels.ops.qk_norm_rope"]

# The interpreter's sigmoid warns when exp overflows for very negative inputs; the result (0) is exact.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "transposed", "sliced")
ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu")
BACKENDS = [b for b in backends_here() if b in ("torch", "triton")]
# float64 against the float64 reference: only the order of operations differs.
TOL64 = dict(atol=1e-9, rtol=1e-9)
# Triton's CPU interpreter casts float32 -> bfloat16 by truncation, where GPUs round to nearest: up to one more
# ulp of bf16 on every stored value, i.e. 2^-8 more relative error. tests/utils.py patches the interpreter to
# round to nearest, so this only matters without that patch; it applies to the interpreter's bf16 alone.
INTERPRETER_BF16_RTOL = 2.0 ** -8

SETTINGS = settings(max_examples=25, deadline=None)


def _tol(dtype, backend):
    if dtype == torch.float64:
        return TOL64
    tol = dict(TOLERANCES[dtype])
    if dtype == torch.bfloat16 and backend == "triton" and INTERPRET:
        tol["rtol"] += INTERPRETER_BF16_RTOL
    return tol


def _close(out, ref64, dtype, backend, what):
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    o, r = out.double().cpu(), ref64.double().cpu()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    tol = _tol(dtype, backend)
    err = (o - r).abs()
    bad = err > tol["atol"] + tol["rtol"] * r.abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements outside {tol} ({dtype}, {backend}); "
                           f"max abs err {err.max().item():.3g}")


def _layout(t, layout):
    """The same values with another stride along the last dim: transposed (stride > 1) or sliced (stride 2)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _d(t):
    return None if t is None else t.double()


def _run(backend, dtype, fn, check):
    """Call ``fn`` on ``backend``: float64 on Triton must raise the named ValueError, else ``check`` the result."""
    with eekernels.backend(backend):
        if backend != "torch" and dtype == torch.float64:
            with pytest.raises(ValueError, match=rf"`x` has dtype torch.float64, which backend '{backend}'"):
                fn()
            return
        out = fn()
    check(out)


common = dict(dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 3), N=st.integers(1, 5), D=st.integers(1, 300), affine=st.booleans(), **common)
def test_layer_norm(backend, B, N, D, affine, dtype, layout, seed):
    torch.manual_seed(seed)
    x = _layout(randn(B, N, D, dtype=dtype, scale=2.0, offset=0.5), layout)
    w, b = (randn(D, dtype=dtype, offset=1.0), randn(D, dtype=dtype)) if affine else (None, None)
    _run(backend, dtype, lambda: layer_norm(x, w, b),
         lambda out: _close(out, LN.reference(x.double(), _d(w), _d(b)), dtype, backend, "out"))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 3), N=st.integers(1, 5), D=st.integers(1, 300), **common)
def test_modulated_layer_norm(backend, B, N, D, dtype, layout, seed):
    torch.manual_seed(seed)
    x = _layout(randn(B, N, D, dtype=dtype, scale=2.0, offset=0.5), layout)
    shift, scale = _layout(randn(B, D, dtype=dtype), layout), randn(B, D, dtype=dtype, scale=0.5)
    _run(backend, dtype, lambda: modulated_layer_norm(x, shift, scale),
         lambda out: _close(out, MLN.reference(x.double(), shift.double(), scale.double()), dtype, backend, "out"))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 3), N=st.integers(1, 5), D=st.integers(1, 300), gated=st.booleans(),
       mode=st.sampled_from(["modulated", "affine", "plain"]), **common)
def test_gated_residual_norm(backend, B, N, D, gated, mode, dtype, layout, seed):
    torch.manual_seed(seed)
    x = _layout(randn(B, N, D, dtype=dtype, scale=2.0, offset=0.5), layout)
    y = _layout(randn(B, N, D, dtype=dtype), layout)
    gate = _layout(randn(B, D, dtype=dtype), layout) if gated else None
    modulated, affine = mode == "modulated", mode == "affine"
    shift, scale = (randn(B, D, dtype=dtype), randn(B, D, dtype=dtype, scale=0.5)) if modulated else (None,) * 2
    weight, bias = (randn(D, dtype=dtype, offset=1.0), randn(D, dtype=dtype)) if affine else (None,) * 2

    def check(outs):
        x_out, h = outs
        _close(x_out, GRN.reference(x.double(), y.double(), _d(gate), None, None)[0], dtype, backend, "x_out")
        # h is the LayerNorm of x_out as stored (rounded to x's dtype): its reference starts from our x_out.
        ref_h = GRN.reference(x_out.double(), torch.zeros_like(y).double(), None, _d(shift), _d(scale),
                              weight=_d(weight), bias=_d(bias))[1]
        _close(h, ref_h, dtype, backend, "h")

    _run(backend, dtype, lambda: gated_residual_norm(x, y, gate, shift, scale, weight=weight, bias=bias), check)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(lead=st.sampled_from([(), (1,), (5,), (2, 3)]), K=st.integers(1, 150), M=st.integers(1, 70),
       has_bias=st.booleans(), activation=st.sampled_from(ACTIVATIONS), **common)
def test_linear_act(backend, lead, K, M, has_bias, activation, dtype, layout, seed):
    torch.manual_seed(seed)
    x = _layout(randn(*lead, K, dtype=dtype, offset=0.2), layout)
    w = _layout(randn(M, K, dtype=dtype, scale=K ** -0.5), layout)
    b = randn(M, dtype=dtype, scale=0.5) if has_bias else None
    _run(backend, dtype, lambda: linear_act(x, w, b, activation),
         lambda out: _close(out, LIN.reference(x.double(), w.double(), _d(b), activation), dtype, backend, "out"))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 2), G=st.integers(1, 3), cpg=st.integers(1, 4), H=st.integers(1, 7), W=st.integers(1, 7),
       modulated=st.booleans(), activation=st.sampled_from(ACTIVATIONS), **common)
def test_group_norm_act(backend, B, G, cpg, H, W, modulated, activation, dtype, layout, seed):
    # Groups of at least 3 elements: a one-element group has variance 0 and rstd = eps^-1/2, which
    # test_group_norm_act.py's test_one_element_groups covers with its own tolerance.
    W = max(W, 4 - cpg * H) if cpg * H * W < 3 else W
    torch.manual_seed(seed)
    C = G * cpg
    x = _layout(randn(B, C, H, W, dtype=dtype, scale=2.0, offset=0.5), layout)
    weight, bias = randn(C, dtype=dtype, offset=1.0), randn(C, dtype=dtype)
    scale, shift = (randn(B, C, dtype=dtype, scale=0.5), randn(B, C, dtype=dtype)) if modulated else (None, None)

    def check(out):
        ref = GNA.reference(x.double(), G, weight.double(), bias.double(), _d(scale), _d(shift), activation)
        _close(out, ref, dtype, backend, "out")

    _run(backend, dtype, lambda: group_norm_act(x, G, weight, bias, scale, shift, activation), check)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(lead=st.sampled_from([(1,), (3,), (2, 3)]), D=st.integers(1, 300), affine=st.booleans(), **common)
def test_rms_norm(backend, lead, D, affine, dtype, layout, seed):
    torch.manual_seed(seed)
    x = _layout(randn(*lead, D, dtype=dtype, scale=2.0, offset=0.5), layout)
    w = randn(D, dtype=dtype, offset=1.0) if affine else None
    _run(backend, dtype, lambda: rms_norm(x, w),
         lambda out: _close(out, RMS.reference(x.double(), _d(w)), dtype, backend, "out"))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(B=st.integers(1, 2), N=st.integers(1, 5), H=st.integers(1, 3), half=st.integers(1, 40),
       mode=st.sampled_from(["norm+rope", "norm", "rope"]), **common)
def test_qk_norm_rope(backend, B, N, H, half, mode, dtype, layout, seed):
    torch.manual_seed(seed)
    Dh = 2 * half
    qkv = _layout(randn(B, N, 3, H, Dh, dtype=dtype, scale=1.5, offset=0.2), layout)  # a QKV GEMM's output
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    w, eps = (randn(Dh, dtype=dtype, offset=1.0), 1e-6) if mode != "rope" else (None, None)
    cos, sin = (randn(N, Dh), randn(N, Dh)) if mode != "norm" else (None, None)

    def check(outs):
        refs = QKR.reference(q.double(), k.double(), _d(w), _d(w), _d(cos), _d(sin), eps)
        for out, ref, name in zip(outs, refs, "qk"):
            _close(out, ref, dtype, backend, name)

    _run(backend, dtype, lambda: qk_norm_rope(q, k, w, w, cos, sin, eps), check)
