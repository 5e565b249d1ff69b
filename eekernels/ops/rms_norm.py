"""rms_norm: RMSNorm over the last dim, ``x / sqrt(mean(x^2) + eps) * weight``.

Shapes: ``x`` (..., D), any rank >= 1; ``weight`` (D,) or None, in x's dtype or float32. Output has x's shape
and dtype. Statistics in float32 (float64 stays float64). Used by SD3.5 and FLUX (their QK norms go through
``qk_norm_rope``, which fuses it with RoPE). Backends: torch (reference), triton.

Bytes at FLUX.1, (1, 4608, 3072) bf16: one read of x and one write of the output, 2 x 28.3 MB = 56.6 MB, so
19 us at the 3.0 TB/s an H100 copies at (docs/design.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from eekernels.ops import _common as common
from eekernels.ops._triton import tl, triton

OP = "rms_norm"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., D); weight: (D,) or None. Computes in float32 (float64 stays float64), returns x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = h * weight.to(compute)
    return h.to(x.dtype).contiguous()  # contiguous whatever x's strides, as the kernel and the fake impl


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per row; the row stays in registers (one read, one write).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr, weight_ptr, out_ptr,
    D, stride_xr,
    eps,
    HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * D passes 2**31 at FLUX sizes x 128
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_xr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps))
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _triton(x, weight, eps):
    D = x.shape[-1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    x2 = common.last_dim_contiguous(x).reshape(-1, D)  # a view whenever the leading dims merge
    weight = None if weight is None else weight.contiguous()
    block, num_warps = common.row_launch_config(D)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, x2 if weight is None else weight, out,  # x2: unused dummy pointer
        D, x2.stride()[0], float(eps),
        HAS_WEIGHT=weight is not None, BLOCK_D=block, num_warps=num_warps,
    )
    return out


IMPLS = (
    common.Impl("torch", reference),
    common.Impl("triton", _triton, **common.TRITON, max_d=common.TRITON_MAX_ROW),
)
AUTO_ORDER = ("triton",)  # not yet timed on a GPU: the Triton row kernel, as layer_norm's
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, weight, eps):
    """The one entry of both the public function and ``torch.ops.eekernels.rms_norm``."""
    validate(x, weight, eps)
    return DISPATCH.select(x, weight).fn(x, weight, eps)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.rms_norm, its fake impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::rms_norm", mutates_args=())
def _op(x: torch.Tensor, weight: Optional[torch.Tensor],
        eps: torch.types.Number) -> torch.Tensor:  # Scalar, not float: a bool eps reaches validate (_common)
    return _run(x, weight, eps)


@_op.register_fake
def _(x, weight, eps):
    validate(x, weight, eps, fake=True)
    return x.new_empty(x.shape)


common.reference_autograd(_op, reference)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(x, weight=None, eps=1e-6, *, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    param = common.check_param_fake if fake else common.check_param
    common.check_tensor(OP, "x", x, dims="(..., D)")
    if x.dim() < 1:
        raise ValueError(f"{OP}: `x` expected at least 1 dim (..., D), got shape {tuple(x.shape)}")
    if weight is not None:
        param(OP, "weight", weight, (x.shape[-1],), x, "(D,)")
    common.check_eps(OP, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``.

    x: (..., D); weight: (D,) or None (no scale). Returns a new tensor of x's shape and dtype.
    """
    if common.needs_op_path(x, weight, numbers=(eps,)):  # validated in the registered op (impl or fake)
        return torch.ops.eekernels.rms_norm(x, weight, eps)
    return _run(x, weight, eps)
