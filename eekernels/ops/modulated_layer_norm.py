"""modulated_layer_norm: DiT's adaLN, ``LN(x) * (1 + scale[:, None]) + shift[:, None]`` without affine.

Shapes: ``x`` (B, N, D); ``shift``, ``scale`` (B, D), in x's dtype or float32. Output (B, N, D) in x's dtype.
Statistics in float32. Backends: torch (reference), triton, cuda (``csrc/modulated_layer_norm.cu``).

Bytes at DiT-XL/2, (64, 256, 1152) bf16: one read of x and one write of the output, 2 x 37.7 MB
= 75.5 MB, so 25 us at the 3.0 TB/s an H100 copies at (docs/design.md); measured: benchmarks/RESULTS.md §1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eekernels import _ext
from eekernels.ops import _common as common
from eekernels.ops._common import row_stats
from eekernels.ops._triton import tl, triton

OP = "modulated_layer_norm"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (B, N, D); shift, scale: (B, D). Computes in float32 (float64 stays float64), returns x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    h = F.layer_norm(xf, (x.shape[-1],), eps=eps)
    h = h * (1 + scale.to(compute)[:, None]) + shift.to(compute)[:, None]
    return h.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per (b, n) row; the row stays in registers (one read, one write).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _modulated_layer_norm_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    N, D,
    stride_xb, stride_xn, stride_sb, stride_cb,
    eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: B*N*D passes 2**31 at B=64, N=256, D=1152 x 128
    b = row // N
    n = row % N
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * stride_xb + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    xc, rstd = row_stats(x, mask, D, eps)
    shift = tl.load(shift_ptr + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_cb + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _triton(x, shift, scale, eps):
    B, N, D = x.shape
    x, shift = common.last_dim_contiguous(x), common.last_dim_contiguous(shift)
    scale = common.last_dim_contiguous(scale)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # (B, N, D); ~2x cheaper than torch.empty
    if out.numel() == 0:
        return out
    block, num_warps = common.row_launch_config(D)  # cached per D: see _common's "Triton launches"
    sx = x.stride()
    _modulated_layer_norm_kernel[(B * N,)](
        x, shift, scale, out, N, D,
        sx[0], sx[1], shift.stride()[0], scale.stride()[0],
        float(eps),
        BLOCK_D=block, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# CUDA C++ kernel (csrc/modulated_layer_norm.cu): pointers, sizes, strides and the stream as integers.
# --------------------------------------------------------------------------------------------------
def _cuda(x, shift, scale, eps):
    B, N, D = x.shape
    x = common.last_dim_contiguous(x)
    param_dtype = x.dtype if shift.dtype == scale.dtype == x.dtype else torch.float32
    shift, scale = (t.to(param_dtype).contiguous() for t in (shift, scale))
    out = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _ext.load().modulated_layer_norm(
        common.ptr(x), common.ptr(shift), common.ptr(scale), common.ptr(out),
        B, N, D, x.stride(0), x.stride(1), float(eps),
        common.dtype_code(x), common.dtype_code(shift), common.stream_handle(x),
    )
    return out


IMPLS = (
    common.Impl("torch", reference),
    common.Impl("triton", _triton, **common.TRITON, max_d=common.TRITON_MAX_ROW),
    common.Impl("cuda", _cuda, **common.CUDA),
)
# Fastest first on CUDA, as measured at (64, 256, 1152) bf16 on an H100 (benchmarks/RESULTS.md §1).
AUTO_ORDER = ("cuda", "triton")
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, shift, scale, eps):
    """The one entry of both the public function and ``torch.ops.eekernels.modulated_layer_norm``."""
    validate(x, shift, scale, eps)
    return DISPATCH.select(x, shift, scale).fn(x, shift, scale, eps)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.modulated_layer_norm, its fake impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::modulated_layer_norm", mutates_args=())
def _op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
        eps: torch.types.Number) -> torch.Tensor:  # Scalar, not float: a bool eps reaches validate (_common)
    return _run(x, shift, scale, eps)


@_op.register_fake
def _(x, shift, scale, eps):
    validate(x, shift, scale, eps, fake=True)
    return x.new_empty(x.shape)


common.reference_autograd(_op, reference)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(x, shift, scale, eps=1e-6, *, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    param = common.check_param_fake if fake else common.check_param
    common.check_tensor(OP, "x", x, ndim=3, dims="(B, N, D)")
    B, _, D = x.shape
    param(OP, "shift", shift, (B, D), x, "(B, D)")
    param(OP, "scale", scale, (B, D), x, "(B, D)")
    common.check_eps(OP, eps)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DiT adaLN: ``LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]`` (no affine).

    x: (B, N, D); shift, scale: (B, D). Returns a new (B, N, D) tensor in x's dtype.
    """
    if common.needs_op_path(x, shift, scale, numbers=(eps,)):  # validated in the registered op (impl or fake)
        return torch.ops.eekernels.modulated_layer_norm(x, shift, scale, eps)
    return _run(x, shift, scale, eps)
