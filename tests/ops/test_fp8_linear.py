"""fp8 (E4M3) quantization and fp8_linear against float64, and a tiny DiT under to_fp8.

The bounds: E4M3 keeps 3 mantissa bits, so a normal value rounds with relative error <= 2**-4; below
2**-6 (the smallest normal) the spacing is 2**-9, an absolute error <= 2**-10 in units of the scale.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from eekernels.ops.fp8_linear import FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_linear, quantize_fp8, reference
from eekernels.ops.linear_act import apply_activation
from tests.utils import CUDA, DTYPES, randn

# A tiny DiT under to_fp8 against itself in float32 (relative 2-norm error of the output): measured
# 0.0059-0.0067 per row and 0.0057-0.0073 per tensor over seeds 0-2 on CPU (2 blocks, hidden 64), against
# 0.0034-0.0036 for bf16 autocast. The bound leaves 4x room and still fails on a wrong scale (error ~1).
FP8_DIT_REL_ERR = 0.03


def _bound(x64, scale64):
    return 2.0 ** -4 * x64.abs() + 2.0 ** -10 * scale64 + 1e-6 * x64.abs()  # last: float32 division slop


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("per", ["tensor", "row"])
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 1151)])
def test_quantize_error_bound(dtype, per, shape):
    x = randn(*shape, dtype=dtype, scale=3.0, offset=0.25)
    before = x.clone()
    q, scale = quantize_fp8(x, per=per)
    assert torch.equal(x, before)  # the input is not modified
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.dtype == torch.float32
    assert scale.shape == (() if per == "tensor" else (*shape[:-1], 1))
    x64, s64 = x.double(), scale.double()
    err = (dequantize_fp8(q, scale, torch.float64) - x64).abs()
    assert bool((err <= _bound(x64, s64)).all()), float((err - _bound(x64, s64)).max())
    # amax maps to 448 (per tensor: somewhere; per row: in every row)
    qa = q.float().abs()
    if per == "tensor":
        assert float(qa.max()) == FP8_MAX
    else:
        assert bool((qa.amax(dim=-1) == FP8_MAX).all())
    assert 0.005 < _rel(dequantize_fp8(q, scale, torch.float64), x64) < 0.05  # ~2**-4/sqrt(3)/sqrt(E x^2)...


def test_per_row_beats_per_tensor_on_rows_of_different_magnitude():
    x = randn(6, 257, dtype=torch.float32) * torch.logspace(-4, 2, 6)[:, None]
    errs = {}
    for per in ("tensor", "row"):
        q, s = quantize_fp8(x, per=per)
        deq = dequantize_fp8(q, s, torch.float64)
        errs[per] = [_rel(deq[i], x[i]) for i in range(6)]
    assert max(errs["row"]) < 0.05  # every row keeps its 3 mantissa bits
    assert errs["tensor"][0] > 0.5  # the 1e-4 row drowns under one scale set by the 1e2 row
    assert errs["tensor"][-1] < 0.05


def test_given_scale_saturates_at_448():
    x = randn(4, 40, dtype=torch.float32, scale=10.0)
    q, scale = quantize_fp8(x, 0.01)  # calibration scale: |x| > 4.48 saturates
    assert float(scale) == pytest.approx(0.01)
    assert not bool(torch.isnan(q.float()).any())
    big = x.abs() > FP8_MAX * 0.01
    assert bool(big.any())
    assert torch.equal(q.float()[big], torch.sign(x[big]) * FP8_MAX)
    small = x.abs() < FP8_MAX * 0.01 * 0.9
    err = (q.float()[small].double() * 0.01 - x[small].double()).abs()
    assert bool((err <= _bound(x[small].double(), torch.tensor(0.01, dtype=torch.float64))).all())
    # per-row calibrated scales
    s_row = torch.rand(4, 1) + 0.01
    q2, s2 = quantize_fp8(x, s_row, per="row")
    assert torch.equal(s2, s_row) and not bool(torch.isnan(q2.float()).any())


def test_zero_row_gets_unit_scale():
    x = randn(3, 17, dtype=torch.float32)
    x[1] = 0.0
    q, s = quantize_fp8(x, per="row")
    assert float(s[1]) == 1.0 and bool((q[1].float() == 0).all()) and bool((s[[0, 2]] < 1).all())


def _f64_linear(x, wq, ws, bias, activation, per):
    """Independent float64 spec: quantize x at the weight's granularity, dequantize, float64 GEMM."""
    xq, xs = quantize_fp8(x, per=per)
    ws = ws.reshape(-1, 1) if per == "row" else ws
    h = F.linear(dequantize_fp8(xq, xs, torch.float64), dequantize_fp8(wq, ws, torch.float64))
    if bias is not None:
        h = h + bias.double()
    return apply_activation(h, activation)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("per", ["tensor", "row"])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp8_linear_against_float64(dtype, per, activation, with_bias):
    M, K, N = 37, 95, 51  # odd sizes, leading dims (x is 3-D)
    x = randn(1, M, K, dtype=dtype, scale=2.0, offset=0.3)
    w = randn(N, K, dtype=torch.float32, scale=K ** -0.5)
    b = randn(N, dtype=dtype) if with_bias else None
    wq, ws = quantize_fp8(w, per=per)
    x_before = x.clone()
    out = fp8_linear(x, wq, ws, b, activation)
    assert torch.equal(x, x_before)
    assert out.shape == (1, M, N) and out.dtype == dtype
    spec = _f64_linear(x, wq, ws, b, activation, per)
    tol = TOL[dtype]
    assert bool(((out.double() - spec).abs() <= tol + tol * spec.abs()).all())
    # against the unquantized float64 product: the quantization error, a few percent and not zero
    exact = apply_activation(F.linear(x.double(), w.double(), None if b is None else b.double()), activation)
    assert 0.003 < _rel(out, exact) < 0.08


def test_activation_is_applied_after_bias():
    x, w, b = randn(9, 48, dtype=torch.float32), randn(24, 48, dtype=torch.float32), randn(24, dtype=torch.float32)
    wq, ws = quantize_fp8(w, per="row")
    plain = fp8_linear(x, wq, ws, b)
    for act in ("gelu", "gelu_tanh", "silu"):
        torch.testing.assert_close(fp8_linear(x, wq, ws, b, act), apply_activation(plain, act))


def test_calibrated_x_scale_per_tensor():
    x, w = randn(5, 32, dtype=torch.float32), randn(16, 32, dtype=torch.float32)
    wq, ws = quantize_fp8(w)
    out = fp8_linear(x, wq, ws, x_scale=0.5 / FP8_MAX)  # |x| > 0.5 saturates
    xq, xs = quantize_fp8(x, 0.5 / FP8_MAX)
    spec = F.linear(dequantize_fp8(xq, xs, torch.float64), dequantize_fp8(wq, ws, torch.float64))
    torch.testing.assert_close(out.double(), spec, rtol=1e-5, atol=1e-5)
    assert _rel(out, F.linear(x.double(), w.double())) > 0.1  # saturation happened


def _bad_cases():
    x, w = randn(4, 32, dtype=torch.float32), randn(16, 32, dtype=torch.float32)
    wq, ws = quantize_fp8(w, per="row")
    return [
        ("x", dict(x=x.to(torch.int32))),
        ("x", dict(x=randn(4, 31, dtype=torch.float32))),
        ("weight_fp8", dict(weight_fp8=w)),
        ("weight_fp8", dict(weight_fp8=wq[None])),
        ("weight_scale", dict(weight_scale=ws.double())),
        ("weight_scale", dict(weight_scale=torch.ones(7, 1))),
        ("bias", dict(bias=torch.ones(15))),
        ("activation", dict(activation="relu")),
        ("x_scale", dict(x_scale=0.1)),  # per-row weight: x is quantized per row, no calibrated scale
    ], dict(x=x, weight_fp8=wq, weight_scale=ws)


@pytest.mark.parametrize("index", range(9))
def test_fp8_linear_named_errors(index):
    cases, good = _bad_cases()
    name, bad = cases[index]
    with pytest.raises(ValueError, match=rf"fp8_linear: `{name}` expected .*, got "):
        fp8_linear(**{**good, **bad})


@pytest.mark.parametrize("bad, name", [
    (dict(per="col"), "per"),
    (dict(scale=-1.0), "scale"),
    (dict(scale=torch.ones(3)), "scale"),
    (dict(scale=torch.tensor(float("nan"))), "scale"),
])
def test_quantize_named_errors(bad, name):
    with pytest.raises(ValueError, match=rf"fp8_linear: `{name}` expected .*, got "):
        quantize_fp8(randn(4, 8, dtype=torch.float32), **bad)


def test_quantize_rejects_nonfinite_and_fp8_input():
    x = randn(4, 8, dtype=torch.float32)
    x[2, 3] = float("inf")
    with pytest.raises(ValueError, match="`x` expected finite values"):
        quantize_fp8(x)
    with pytest.raises(ValueError, match="`x` expected a float32"):
        quantize_fp8(randn(4, 8, dtype=torch.float32).to(FP8_DTYPE))


def _scaled_mm_usable():
    return CUDA and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not _scaled_mm_usable(), reason="torch._scaled_mm per-row fp8 needs a CUDA GPU of compute "
                                                   "capability >= 9.0; none is visible here")
@pytest.mark.parametrize("per", ["tensor", "row"])
def test_scaled_mm_matches_reference_on_gpu(per):
    from eekernels.ops.fp8_linear import IMPLS

    x = randn(256, 1152, dtype=torch.bfloat16, dev="cuda")
    w = randn(4608, 1152, dtype=torch.bfloat16, dev="cuda", scale=1152 ** -0.5)
    b = randn(4608, dtype=torch.bfloat16, dev="cuda")
    wq, ws = quantize_fp8(w, per=per)
    impl = IMPLS[1]
    assert not impl.why_not(x, wq, ws, b, "gelu_tanh", None)
    out = impl.fn(x, wq, ws, b, "gelu_tanh", None)
    spec = _f64_linear(x, wq, ws, b, "gelu_tanh", per)
    tol = TOL[torch.bfloat16]
    assert bool(((out.double() - spec).abs() <= tol + tol * spec.abs()).all())


# --------------------------------------------------------------------------------------------------
# to_fp8 on a tiny DiT
# --------------------------------------------------------------------------------------------------
def _tiny_dit(seed=0):
    from eekernels.models.dit import DiT

    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                num_classes=10, learn_sigma=True).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random: adaLN-Zero's zeros would make the blocks no-ops
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(fan_in) if p.dim() >= 2 else 0.3))
    return model


@pytest.mark.parametrize("per", ["row", "tensor"])
def test_to_fp8_tiny_dit_close_to_float32(per):
    from eekernels.models.fp8 import FP8Attention, FP8Mlp, to_fp8

    model = _tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp8 = to_fp8(model, per=per)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original unchanged
    assert all(type(b.attn) is not FP8Attention for b in model.blocks)
    assert all(type(b.attn) is FP8Attention and type(b.mlp) is FP8Mlp for b in fp8.blocks)
    assert fp8.blocks[0].attn.qkv_weight_fp8.dtype == FP8_DTYPE
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    y = torch.tensor([1, 4, 7])
    with torch.no_grad():
        ref = model(x, t, y)
        out = fp8(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x, t, y)
    err = _rel(out, ref)
    assert 1e-4 < err < FP8_DIT_REL_ERR, err  # quantized (not the float32 path), and close
    # for scale: bf16 autocast's own error, to put fp8's in context (fp8 has 4 fewer mantissa bits)
    assert _rel(bf16, ref) < err


def test_to_fp8_rejects_models_without_blocks():
    from eekernels.models.fp8 import to_fp8

    with pytest.raises(ValueError, match="to_fp8: `model` expected a model with eekernels Attention/Mlp"):
        to_fp8(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="to_fp8: `per` expected one of"):
        to_fp8(_tiny_dit(), per="block")
