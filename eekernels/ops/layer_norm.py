"""layer_norm: LayerNorm over the last dim with an optional affine, ``LN(x) * weight + bias``.

Shapes: ``x`` (..., D), any rank >= 1 (the transformer ops use (B, N, D)); ``weight``, ``bias`` (D,) or None,
in x's dtype or float32. Output has x's shape and dtype. Statistics in float32.
Backends: torch (reference), triton. There is no CUDA C++ kernel: ``backend("cuda")`` raises with reasons.

Bytes at DiT-XL/2, (64, 256, 1152) bf16: one read of x and one write of the output, 2 x 37.7 MB = 75.5 MB,
25 us at the 3.0 TB/s an H100 copies at.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from eekernels.ops import _common as common
from eekernels.ops._common import row_stats
from eekernels.ops._triton import tl, triton

OP = "layer_norm"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def reference(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-6) -> torch.Tensor:
    """x: (..., D); weight, bias: (D,) or None. Computes in float32 (float64 stays float64), returns x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    return F.layer_norm(x.to(compute), (x.shape[-1],), w, b, eps=eps).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per row; the row stays in registers (one read, one write).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr,
    D, stride_xr,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * D passes 2**31 at (64, 256, 1152) x 128
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_xr + cols, mask=mask, other=0.0).to(tl.float32)
    xc, rstd = row_stats(x, mask, D, eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _triton(x, weight, bias, eps):
    D = x.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # ~2x cheaper than torch.empty(x.shape, ...)
    if out.numel() == 0:
        return out
    # Any rank: rows are the leading dims flattened. reshape keeps a view (honouring the row stride)
    # whenever the leading dims merge, and copies otherwise.
    x2 = common.last_dim_contiguous(x).reshape(-1, D)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    block, num_warps = common.row_launch_config(D)  # cached per D: see _common's "Triton launches"
    _layer_norm_kernel[(x2.shape[0],)](
        x2, x2 if weight is None else weight, x2 if bias is None else bias, out,  # x2: unused dummy pointer
        D, x2.stride()[0], float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_D=block, num_warps=num_warps,
    )
    return out


IMPLS = (
    common.Impl("torch", reference),
    common.Impl("triton", _triton, **common.TRITON, max_d=common.TRITON_MAX_ROW),
)
# No CUDA C++ kernel (modulated_layer_norm's covers DiT). On CUDA Triton beats the torch reference (which
# converts x to float32 and back) and torch eager at (64, 256, 1152) bf16 on an H100 (benchmarks/RESULTS.md §1).
AUTO_ORDER = ("triton",)
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, weight, bias, eps):
    """The one entry of both the public function and ``torch.ops.eekernels.layer_norm``."""
    validate(x, weight, bias, eps)
    return DISPATCH.select(x, weight, bias).fn(x, weight, bias, eps)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.layer_norm, its fake impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::layer_norm", mutates_args=())
def _op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
        eps: torch.types.Number) -> torch.Tensor:  # Scalar, not float: a bool eps reaches validate (_common)
    return _run(x, weight, bias, eps)


@_op.register_fake
def _(x, weight, bias, eps):
    validate(x, weight, bias, eps, fake=True)
    return x.new_empty(x.shape)


common.reference_autograd(_op, reference)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(x, weight=None, bias=None, eps=1e-6, *, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    param = common.check_param_fake if fake else common.check_param
    common.check_tensor(OP, "x", x, dims="(..., D)")
    if x.dim() < 1:
        raise ValueError(f"{OP}: `x` expected at least 1 dim (..., D), got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight is not None:
        param(OP, "weight", weight, (D,), x, "(D,)")
    if bias is not None:
        param(OP, "bias", bias, (D,), x, "(D,)")
    common.check_eps(OP, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x: (..., D) (usually (B, N, D)); weight, bias: (D,) or None. Returns a new tensor of x's shape and dtype.
    """
    if common.needs_op_path(x, weight, bias, numbers=(eps,)):  # validated in the registered op (impl or fake)
        return torch.ops.eekernels.layer_norm(x, weight, bias, eps)
    return _run(x, weight, bias, eps)
