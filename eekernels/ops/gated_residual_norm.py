"""gated_residual_norm: DiT's gated residual and the next LayerNorm in one pass, returning ``(x_out, h)``.

    x_out = x + gate[:, None] * y            (gate None: x + y), rounded to x's dtype
    h     = LN(x_out) * weight + bias        (weight, bias optional)
    h     = h * (1 + scale[:, None]) + shift[:, None]   (when shift and scale are given)

``h`` is computed from ``x_out`` as stored (rounded to x's dtype), so the fused op equals the unfused
composition ``modulated_layer_norm(x + gate[:, None] * y, shift, scale)`` up to float32 rounding.

Shapes: ``x``, ``y`` (B, N, D) in one dtype; ``gate``, ``shift``, ``scale`` (B, D) or None, in x's dtype or
float32; ``weight``, ``bias`` (D,) or None. Outputs are new (B, N, D) tensors in x's dtype.
Backends: torch (reference), triton, cuda (``csrc/gated_residual_norm.cu``).

Bytes at DiT-XL/2, (64, 256, 1152) bf16: read x and y, write x_out and h, 4 x 37.7 MB = 151 MB,
50 us at 3.0 TB/s (docs/design.md); measured against unfused torch: benchmarks/RESULTS.md §1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from eekernels import _ext
from eekernels.ops import _common as common
from eekernels.ops._common import row_stats
from eekernels.ops._triton import tl, triton

OP = "gated_residual_norm"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def reference(x, y, gate, shift, scale, eps: float = 1e-6, *, weight=None, bias=None):
    """x, y: (B, N, D); gate, shift, scale: (B, D) or None; weight, bias: (D,) or None.

    Computes in float32 (float64 stays float64); returns ``(x_out, h)`` in x's dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = y.to(compute) if gate is None else gate.to(compute)[:, None] * y.to(compute)
    x_out = (x.to(compute) + r).to(x.dtype)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    h = F.layer_norm(x_out.to(compute), (x.shape[-1],), w, b, eps=eps)
    if shift is not None:
        h = h * (1 + scale.to(compute)[:, None]) + shift.to(compute)[:, None]
    return x_out, h.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per (b, n) row; the row stays in registers (two reads, two writes).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gated_residual_norm_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, weight_ptr, bias_ptr, x_out_ptr, h_ptr,
    N, D,
    stride_xb, stride_xn, stride_yb, stride_yn, stride_gb, stride_sb, stride_cb,
    eps,
    HAS_GATE: tl.constexpr, HAS_MOD: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: B*N*D passes 2**31 at B=64, N=256, D=1152 x 128
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + n * stride_yn + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        y = y * tl.load(gate_ptr + b * stride_gb + cols, mask=mask, other=0.0).to(tl.float32)
    # Round the residual to x's dtype first: h must be the LayerNorm of x_out as the unfused code sees it.
    x_out = (x + y).to(x_out_ptr.dtype.element_ty)
    tl.store(x_out_ptr + row * D + cols, x_out, mask=mask)
    v = x_out.to(tl.float32)
    vc, rstd = row_stats(v, mask, D, eps)
    h = vc * rstd
    if HAS_WEIGHT:
        h = h * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h = h + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        shift = tl.load(shift_ptr + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * stride_cb + cols, mask=mask, other=0.0).to(tl.float32)
        h = h * (1.0 + scale) + shift
    tl.store(h_ptr + row * D + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


def _triton(x, y, gate, shift, scale, weight, bias, eps):
    B, N, D = x.shape
    x, y = common.last_dim_contiguous(x), common.last_dim_contiguous(y)
    gate, shift, scale = (None if t is None else common.last_dim_contiguous(t) for t in (gate, shift, scale))
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format)  # (B, N, D); ~2x cheaper than torch.empty
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x_out.numel() == 0:
        return x_out, h
    block, num_warps = common.row_launch_config(D)  # cached per D: see _common's "Triton launches"
    sx, sy = x.stride(), y.stride()
    _gated_residual_norm_kernel[(B * N,)](
        x, y, *(x if t is None else t for t in (gate, shift, scale, weight, bias)),  # x: unused dummy pointer
        x_out, h, N, D,
        sx[0], sx[1], sy[0], sy[1],
        *(0 if t is None else t.stride()[0] for t in (gate, shift, scale)),
        float(eps),
        HAS_GATE=gate is not None, HAS_MOD=shift is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_D=block, num_warps=num_warps,
    )
    return x_out, h


# --------------------------------------------------------------------------------------------------
# CUDA C++ kernel (csrc/gated_residual_norm.cu): pointers, sizes, strides and the stream as integers.
# --------------------------------------------------------------------------------------------------
def _cuda(x, y, gate, shift, scale, weight, bias, eps):
    B, N, D = x.shape
    x, y = common.last_dim_contiguous(x), common.last_dim_contiguous(y)
    params = (gate, shift, scale, weight, bias)
    given = [t for t in params if t is not None]
    param_dtype = x.dtype if all(t.dtype == x.dtype for t in given) else torch.float32
    gate, shift, scale, weight, bias = (None if t is None else t.to(param_dtype).contiguous() for t in params)
    x_out = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    h = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    if x_out.numel() == 0:
        return x_out, h
    _ext.load().gated_residual_norm(
        common.ptr(x), common.ptr(y), common.ptr(gate), common.ptr(shift), common.ptr(scale),
        common.ptr(weight), common.ptr(bias),
        common.ptr(x_out), common.ptr(h),
        B, N, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), float(eps),
        common.dtype_code(x), common.DTYPE_CODES[param_dtype], common.stream_handle(x),
    )
    return x_out, h


def _torch(x, y, gate, shift, scale, weight, bias, eps):
    # Contiguous like the fake impl says: x + y keeps the layout of a transposed x.
    x_out, h = reference(x, y, gate, shift, scale, eps, weight=weight, bias=bias)
    return x_out.contiguous(), h.contiguous()


IMPLS = (
    common.Impl("torch", _torch),
    common.Impl("triton", _triton, **common.TRITON, max_d=common.TRITON_MAX_ROW),
    common.Impl("cuda", _cuda, **common.CUDA),
)
# Fastest first on CUDA, as measured at (64, 256, 1152) bf16 on an H100 (benchmarks/RESULTS.md §1).
AUTO_ORDER = ("triton", "cuda")
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, y, gate, shift, scale, weight, bias, eps):
    """The one entry of both the public function and ``torch.ops.eekernels.gated_residual_norm``."""
    validate(x, y, gate, shift, scale, eps, weight=weight, bias=bias)
    impl = DISPATCH.select(x, y, gate, shift, scale, weight, bias)
    return impl.fn(x, y, gate, shift, scale, weight, bias, eps)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.gated_residual_norm, its fake impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::gated_residual_norm", mutates_args=())
def _op(
    x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: torch.types.Number,  # Scalar, not float: a bool eps reaches validate (_common)
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(x, y, gate, shift, scale, weight, bias, eps)


@_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps):
    validate(x, y, gate, shift, scale, eps, weight=weight, bias=bias, fake=True)
    return x.new_empty(x.shape), x.new_empty(x.shape)


common.reference_autograd(_op, _torch)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(x, y, gate, shift, scale, eps=1e-6, *, weight=None, bias=None, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    param = common.check_param_fake if fake else common.check_param
    common.check_tensor(OP, "x", x, ndim=3, dims="(B, N, D)")
    B, N, D = x.shape
    if fake:
        common.check_tensor_fake(OP, "y", y, (B, N, D), x, "(B, N, D), as x")
    else:
        common.check_tensor(OP, "y", y, shape=(B, N, D), like=x, dims="(B, N, D), as x")
    if y.dtype != x.dtype:
        raise ValueError(f"{OP}: `y` expected dtype {x.dtype} (as x), got {y.dtype}")
    if (shift is None) != (scale is None):
        given, missing = ("shift", "scale") if scale is None else ("scale", "shift")
        raise ValueError(f"{OP}: `{missing}` expected a (B, D) tensor because `{given}` is given "
                         f"(both or neither), got None")
    if gate is not None:
        param(OP, "gate", gate, (B, D), x, "(B, D)")
    if shift is not None:
        param(OP, "shift", shift, (B, D), x, "(B, D)")
        param(OP, "scale", scale, (B, D), x, "(B, D)")  # not None either: both-or-neither is checked above
    if weight is not None:
        param(OP, "weight", weight, (D,), x, "(D,)")
    if bias is not None:
        param(OP, "bias", bias, (D,), x, "(D,)")
    common.check_eps(OP, eps)


def gated_residual_norm(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor | None,
    scale: torch.Tensor | None, eps: float = 1e-6, *, weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual then LayerNorm in one pass: returns ``(x_out, h)``.

    ``x_out = x + gate[:, None] * y`` (``gate=None``: ``x + y``); ``h = LN(x_out) * weight + bias``, then
    ``h * (1 + scale[:, None]) + shift[:, None]`` when shift/scale are given (DiT), else the affine LayerNorm
    (U-ViT pre-norm). x, y: (B, N, D); gate, shift, scale: (B, D) or None; weight, bias: (D,) or None.
    Returns two new (B, N, D) tensors in x's dtype.
    """
    if common.needs_op_path(x, y, gate, shift, scale, weight, bias, numbers=(eps,)):  # validated in the registered op
        return torch.ops.eekernels.gated_residual_norm(x, y, gate, shift, scale, weight, bias, eps)
    return _run(x, y, gate, shift, scale, weight, bias, eps)
