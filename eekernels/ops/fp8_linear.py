"""fp8_linear: ``act(x @ dequant(weight_fp8).T + bias)`` with E4M3 GEMM inputs, an opt-in inference path.

fp8 here is ``torch.float8_e4m3fn`` (4 exponent bits, 3 mantissa bits, largest finite value 448, no inf).
A tensor is stored as ``(q, scale)`` with ``x ≈ q.float() * scale``; ``scale`` is float32 and either one
number for the whole tensor (``per="tensor"``) or one per row (``per="row"``, shape (..., 1)).

- :func:`quantize_fp8` computes the scale from the tensor's amax on the fly (``amax / 448``), or takes one
  from calibration; values beyond ``448 * scale`` saturate to ±448 (torch's cast alone would give NaN).
- :func:`fp8_linear` quantizes ``x`` on the fly at the weight's granularity (per token for a per-row
  weight, one scale for a per-tensor weight, or ``x_scale`` from calibration) and multiplies in fp8 with
  float32 accumulation. On CUDA with compute capability >= 8.9 (Ada, Hopper) that is ``torch._scaled_mm``
  (per-row scaling needs >= 9.0 and a bfloat16 x); elsewhere the torch reference dequantizes both operands
  to float32 and runs ``F.linear``, which has the same quantization error, so the CPU tests check the
  numerics that the GPU path computes. Bias and activation follow the GEMM in float32 (a torch epilogue, not fused).

Output (..., N) in x's dtype. Not registered as a ``torch.ops`` op and not differentiable: inference only.
Error bounds (tests/ops/test_fp8_linear.py): E4M3 rounds to 3 mantissa bits, a relative error of at most
2**-4 per element (half an ulp), RMS about 2**-4 / sqrt(3) ≈ 3.6%; in a K-long dot product of random
inputs the errors average, giving ~3-5% relative 2-norm error per GEMM output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from eekernels.ops import _common as common
from eekernels.ops.linear_act import apply_activation

OP = "fp8_linear"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
PER = ("tensor", "row")
_MIN_AMAX = 1e-12  # an all-zero tensor (or row) gets scale 1: its quantization is exact zeros


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{OP}: `{name}` expected {expected}, got {got}")


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------
def _scale_shape(x: torch.Tensor, per: str) -> tuple:
    return () if per == "tensor" else (*x.shape[:-1], 1)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float | None = None, *, per: str = "tensor"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float -> ``(x_fp8, scale)``: ``x_fp8`` E4M3 of x's shape, ``scale`` float32 with
    ``x ≈ x_fp8.float() * scale``.

    ``per="tensor"``: one scale, shape (); ``per="row"``: one per row over the last dim, shape (..., 1).
    ``scale=None`` computes ``amax / 448`` (so the largest magnitude maps to 448); a given scale (a positive
    float, or a tensor of that shape, e.g. from calibration) is used as is and larger values saturate to
    ±448. x is not modified.
    """
    if per not in PER:
        _fail("per", f"one of {PER}", repr(per))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        _fail("x", "a float32/float16/bfloat16/float64 tensor", _describe(x))
    if x.dim() < 1 or (per == "row" and x.dim() < 2):
        _fail("x", f"at least {1 if per == 'tensor' else 2} dims for per={per!r}", _describe(x))
    shape = _scale_shape(x, per)
    if scale is None:
        xa = x.detach().abs().float()
        amax = xa.amax() if per == "tensor" else xa.amax(dim=-1, keepdim=True)
        if not bool(torch.isfinite(amax).all()):
            _fail("x", "finite values (the scale is computed from its amax)", "inf or NaN")
        scale = torch.where(amax > _MIN_AMAX, amax / FP8_MAX, torch.ones_like(amax))
    else:
        scale = _checked_scale("scale", scale, shape, x, per)
    q = (x.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _checked_scale(name: str, scale, shape: tuple, x: torch.Tensor, per: str) -> torch.Tensor:
    """A given scale (``quantize_fp8``'s ``scale``, ``fp8_linear``'s ``x_scale``) as a float32 tensor of
    ``shape``; a ValueError naming ``name`` unless it is a positive finite float (not a bool) or a float tensor
    of that shape on x's device with positive finite entries (checking those reads them: one host sync)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not 0 < scale < math.inf:  # NaN fails the comparison
            _fail(name, "a positive finite float", repr(scale))
        return torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        _fail(name, f"None, a positive float or a float tensor of shape {shape}", _describe(scale))
    if scale.numel() == 1 and per == "tensor":
        scale = scale.reshape(())
    if tuple(scale.shape) != shape:
        _fail(name, f"shape {shape} for per={per!r} and x {tuple(x.shape)}", _describe(scale))
    if scale.device != x.device:
        _fail(name, f"a tensor on x's device {x.device}", _describe(scale))
    scale = scale.detach().float()
    if not bool(((scale > 0) & torch.isfinite(scale)).all()):
        _fail(name, "positive finite values", "zero, negative, inf or NaN entries")
    return scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() * scale`` in ``dtype`` (float64 for references)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(compute) * scale.to(compute)).to(dtype)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def weight_per(weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> str:
    """"tensor" for a scale of shape () or (1,), "row" for (N, 1) or (N,); a ValueError otherwise."""
    N = weight_fp8.shape[0]
    if not isinstance(weight_scale, torch.Tensor) or weight_scale.dtype != torch.float32:
        _fail("weight_scale", "a float32 tensor of shape (), (1,), (N, 1) or (N,)", _describe(weight_scale))
    if weight_scale.numel() == 1 and weight_scale.dim() <= 1:
        return "tensor"
    if tuple(weight_scale.shape) in ((N, 1), (N,)):
        return "row"
    _fail("weight_scale", f"shape (), (1,), ({N}, 1) or ({N},) for weight {tuple(weight_fp8.shape)}",
          _describe(weight_scale))


def validate(x, weight_fp8, weight_scale, bias, activation, x_scale=None) -> str:
    """Every check, before any GEMM; returns the weight's granularity ("tensor" or "row")."""
    if not isinstance(x, torch.Tensor) or x.dtype not in common.FLOAT_DTYPES + (torch.float64,):
        _fail("x", "a float32/float16/bfloat16/float64 tensor (fp8_linear quantizes it)", _describe(x))
    if x.dim() < 1:
        _fail("x", "at least 1 dim (..., K)", _describe(x))
    if not isinstance(weight_fp8, torch.Tensor) or weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2:
        _fail("weight_fp8", "a 2-D float8_e4m3fn tensor (N, K) (from quantize_fp8)", _describe(weight_fp8))
    N, K = weight_fp8.shape
    if x.shape[-1] != K:
        _fail("x", f"last dim K = {K} (weight_fp8's dim 1)", _describe(x))
    per = weight_per(weight_fp8, weight_scale)
    for name, t in (("weight_fp8", weight_fp8), ("weight_scale", weight_scale)):
        if t.device != x.device:
            _fail(name, f"a tensor on x's device {x.device}", _describe(t))
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (N,):
            _fail("bias", f"None or a float tensor of shape ({N},)", _describe(bias))
        if bias.device != x.device:
            _fail("bias", f"a tensor on x's device {x.device}", _describe(bias))
    common.check_activation(OP, activation)
    if x_scale is not None:
        if per != "tensor":
            _fail("x_scale", "None with a per-row weight (x is then quantized per row on the fly)",
                  _describe(x_scale))
        _checked_scale("x_scale", x_scale, (), x, per)
    return per


# --------------------------------------------------------------------------------------------------
# Implementations: both take (x, weight_fp8, weight_scale, bias, activation, x_scale)
# --------------------------------------------------------------------------------------------------
def _epilogue(h: torch.Tensor, bias, activation, out_dtype) -> torch.Tensor:
    if bias is not None:
        h = h + bias.to(h.dtype)
    return apply_activation(h, activation).to(out_dtype)


def reference(x, weight_fp8, weight_scale, bias=None, activation=None, x_scale=None) -> torch.Tensor:
    """Quantize x as the GPU path does, dequantize both operands, F.linear in float32 (float64 for float64 x),
    then bias and activation. The spec of :func:`fp8_linear`."""
    per = weight_per(weight_fp8, weight_scale)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xq, xs = quantize_fp8(x, x_scale, per=per)
    ws = weight_scale.reshape(-1, 1) if per == "row" else weight_scale.reshape(())
    h = F.linear(dequantize_fp8(xq, xs, compute), dequantize_fp8(weight_fp8, ws, compute))
    return _epilogue(h, bias, activation, x.dtype)


def _scaled_mm_reasons(x, weight_fp8, weight_scale, *args) -> list[str]:
    why = []
    if x.device.type != "cuda":
        return why  # the device declaration already says so
    cap = torch.cuda.get_device_capability(x.device)
    per = weight_per(weight_fp8, weight_scale)
    need = (9, 0) if per == "row" else (8, 9)
    if cap < need:
        why.append(f"scaled_mm: per-{per} fp8 GEMMs need compute capability >= {need[0]}.{need[1]}, "
                   f"got {cap[0]}.{cap[1]}")
    if per == "row" and x.dtype != torch.bfloat16:
        why.append(f"scaled_mm: per-row scaling outputs bfloat16 only; x is {str(x.dtype).removeprefix('torch.')}")
    N, K = weight_fp8.shape
    if K % 16 or N % 16:
        why.append(f"scaled_mm: K and N must be multiples of 16, got K={K}, N={N}")
    if not hasattr(torch, "_scaled_mm"):
        why.append("scaled_mm: this torch has no torch._scaled_mm")
    return why


def _scaled_mm(x, weight_fp8, weight_scale, bias=None, activation=None, x_scale=None) -> torch.Tensor:
    per = weight_per(weight_fp8, weight_scale)
    N, K = weight_fp8.shape
    x2 = x.reshape(-1, K)
    xq, xs = quantize_fp8(x2, x_scale, per=per)
    wt = weight_fp8.contiguous().t()  # (K, N) column-major: the layout _scaled_mm wants for its second operand
    if per == "row":  # rowwise scaling: float32 scales (M, 1) and (1, N), bfloat16 output
        out = torch._scaled_mm(xq, wt, scale_a=xs.reshape(-1, 1), scale_b=weight_scale.reshape(1, N),
                               out_dtype=torch.bfloat16)
    else:
        out = torch._scaled_mm(xq, wt, scale_a=xs.reshape(()), scale_b=weight_scale.reshape(()),
                               out_dtype=x.dtype if x.dtype != torch.float64 else torch.float32)
    out = _epilogue(out.float() if (bias is not None or activation is not None) else out, bias, activation,
                    x.dtype)
    return out.reshape(*x.shape[:-1], N)


IMPLS = (
    common.Impl("torch", reference),
    common.Impl("scaled_mm", _scaled_mm, reasons=_scaled_mm_reasons, dtypes=common.KERNEL_DTYPES,
                devices=frozenset({"cuda"})),
)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, activation: str | None = None, *,
               x_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``activation(x @ (weight_fp8 * weight_scale).T + bias)`` with x quantized to E4M3 at the weight's
    granularity (per token for a per-row weight; one amax scale, or ``x_scale`` from calibration, for a
    per-tensor weight).

    x: (..., K) float32/float16/bfloat16 (float64 runs the reference in float64); weight_fp8: (N, K)
    float8_e4m3fn and weight_scale: float32 () / (1,) or (N, 1) / (N,), both from
    ``quantize_fp8(weight, per=...)``; bias: (N,) or None; activation: None, "gelu", "gelu_tanh", "silu".
    Returns (..., N) in x's dtype. ``torch._scaled_mm`` on CUDA >= 8.9 (>= 9.0 and bfloat16 x for per-row)
    when K and N are multiples of 16, else the dequantizing torch reference.
    """
    validate(x, weight_fp8, weight_scale, bias, activation, x_scale)
    for impl in reversed(IMPLS):  # scaled_mm where it can run, else torch
        if not impl.why_not(x, weight_fp8, weight_scale, bias, activation, x_scale):
            return impl.fn(x, weight_fp8, weight_scale, bias, activation, x_scale)
    raise AssertionError("unreachable: the torch reference takes every validated input")
