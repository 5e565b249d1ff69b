"""qk_norm_rope: the per-head RMSNorm of q and k (SD3.5, FLUX) and RoPE (FLUX), in one pass, written in the
layout SDPA takes.

Shapes: ``q``, ``k`` (B, N, H, Dh) with a contiguous last dim: views of a QKV GEMM's output (B, N, 3, H, Dh)
need no copy. ``q_weight``, ``k_weight`` (Dh,) or None. ``cos``, ``sin`` (N, Dh) in the repeated-pair form of
diffusers' ``get_1d_rotary_pos_embed(..., repeat_interleave_real=True)`` (FLUX's ``FluxPosEmbed``), or both
None (no RoPE). Returns ``(q_out, k_out)``, each (B, H, N, Dh) contiguous in the input's dtype.

Per head row of Dh values: ``h = x / sqrt(mean(x^2) + eps) * weight`` (skipped when ``eps`` is None and both
weights are None), then, with RoPE, pairs rotate (diffusers' ``apply_rotary_emb(..., use_real_unbind_dim=-1)``):
``out[2i] = h[2i] cos[2i] - h[2i+1] sin[2i]``, ``out[2i+1] = h[2i+1] cos[2i+1] + h[2i] sin[2i+1]``. Float32
throughout (float64 stays float64); one rounding at the end.

Bytes at FLUX.1 (B=1, 4096 + 512 tokens, 24 heads x 128) bf16: read q and k, write them, 4 x 28.3 MB, plus
cos/sin (2 x 2.4 MB float32, from L2 after the first heads): 118 MB, 39 us at 3.0 TB/s (docs/design.md).
Unfused, diffusers reads and writes q and k three times (norm, RoPE, the transpose SDPA's layout needs).
Backends: torch (reference), triton.
"""
from __future__ import annotations

from typing import Optional

import torch

from eekernels.ops import _common as common
from eekernels.ops._triton import tl, triton

OP = "qk_norm_rope"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def _one(x, weight, cos, sin, eps):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute)
    if eps is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            h = h * weight.to(compute)
    if cos is not None:
        even, odd = h[..., 0::2], h[..., 1::2]
        rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
        h = h * cos.to(compute)[None, :, None, :] + rotated * sin.to(compute)[None, :, None, :]
    return h.to(x.dtype).transpose(1, 2).contiguous()


def reference(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None = None,
              k_weight: torch.Tensor | None = None, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
              eps: float | None = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, N, H, Dh). Returns (B, H, N, Dh) each, computed in float32 (float64 stays float64)."""
    return _one(q, q_weight, cos, sin, eps), _one(k, k_weight, cos, sin, eps)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per (b, n, h) row of q and the same row of k. The row is loaded as its even and
# odd halves (the RoPE pairs), normalized and rotated in registers, and stored at (b, h, n) of the output.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rope_row(x_ptr, w_ptr, out_ptr, c_e, c_o, s_e, s_o, half_cols, mask, Dh, eps,
              HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr):
    xe = tl.load(x_ptr + 2 * half_cols, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + 2 * half_cols + 1, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / Dh + eps)
        xe = xe * rstd
        xo = xo * rstd
        if HAS_WEIGHT:
            xe = xe * tl.load(w_ptr + 2 * half_cols, mask=mask, other=0.0).to(tl.float32)
            xo = xo * tl.load(w_ptr + 2 * half_cols + 1, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        ye = xe * c_e - xo * s_e
        yo = xo * c_o + xe * s_o
    else:
        ye = xe
        yo = xo
    tl.store(out_ptr + 2 * half_cols, ye.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + 2 * half_cols + 1, yo.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    N, H, Dh,
    sqb, sqn, sqh, skb, skn, skh, scn, ssn,
    eps,
    HAS_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: B * H * N * Dh passes 2**31 at video sizes
    h = pid % H
    n = (pid // H) % N
    b = pid // (H * N)
    half_cols = tl.arange(0, BLOCK_HALF)
    mask = half_cols < Dh // 2
    c_e = 0.0
    c_o = 0.0
    s_e = 0.0
    s_o = 0.0
    if HAS_ROPE:
        c_e = tl.load(cos_ptr + n * scn + 2 * half_cols, mask=mask, other=0.0).to(tl.float32)
        c_o = tl.load(cos_ptr + n * scn + 2 * half_cols + 1, mask=mask, other=0.0).to(tl.float32)
        s_e = tl.load(sin_ptr + n * ssn + 2 * half_cols, mask=mask, other=0.0).to(tl.float32)
        s_o = tl.load(sin_ptr + n * ssn + 2 * half_cols + 1, mask=mask, other=0.0).to(tl.float32)
    out_row = ((b * H + h) * N + n) * Dh  # (B, H, N, Dh) contiguous
    _rope_row(q_ptr + b * sqb + n * sqn + h * sqh, qw_ptr, qo_ptr + out_row, c_e, c_o, s_e, s_o, half_cols, mask,
              Dh, eps, HAS_NORM, HAS_QW, HAS_ROPE)
    _rope_row(k_ptr + b * skb + n * skn + h * skh, kw_ptr, ko_ptr + out_row, c_e, c_o, s_e, s_o, half_cols, mask,
              Dh, eps, HAS_NORM, HAS_KW, HAS_ROPE)


def _triton(q, k, q_weight, k_weight, cos, sin, eps):
    B, N, H, Dh = q.shape
    q, k = common.last_dim_contiguous(q), common.last_dim_contiguous(k)
    q_out = q.new_empty((B, H, N, Dh))
    k_out = k.new_empty((B, H, N, Dh))
    if q_out.numel() == 0:
        return q_out, k_out
    rope = cos is not None
    if rope:
        cos, sin = common.last_dim_contiguous(cos), common.last_dim_contiguous(sin)
    qw = None if q_weight is None else q_weight.contiguous()
    kw = None if k_weight is None else k_weight.contiguous()
    block = triton.next_power_of_2(max(Dh // 2, 1))
    _qk_norm_rope_kernel[(B * N * H,)](
        q, k, q if qw is None else qw, q if kw is None else kw, q if not rope else cos, q if not rope else sin,
        q_out, k_out,  # q: unused dummy pointer
        N, H, Dh,
        *q.stride()[:3], *k.stride()[:3], cos.stride()[0] if rope else 0, sin.stride()[0] if rope else 0,
        1e-6 if eps is None else float(eps),
        HAS_NORM=eps is not None, HAS_QW=qw is not None, HAS_KW=kw is not None, HAS_ROPE=rope,
        BLOCK_HALF=block, num_warps=1 if block <= 64 else 2,
    )
    return q_out, k_out


IMPLS = (
    common.Impl("torch", reference),
    common.Impl("triton", _triton, **common.TRITON, max_d=1 << 14),
)
AUTO_ORDER = ("triton",)  # not yet timed on a GPU
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(q, k, q_weight, k_weight, cos, sin, eps):
    """The one entry of both the public function and ``torch.ops.eekernels.qk_norm_rope``."""
    validate(q, k, q_weight, k_weight, cos, sin, eps)
    return DISPATCH.select(q, k, q_weight, k_weight, cos, sin).fn(q, k, q_weight, k_weight, cos, sin, eps)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.qk_norm_rope, its fake impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::qk_norm_rope", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
        cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], eps: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(q, k, q_weight, k_weight, cos, sin, eps)


@_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    validate(q, k, q_weight, k_weight, cos, sin, eps, fake=True)
    B, N, H, Dh = q.shape
    return q.new_empty((B, H, N, Dh)), k.new_empty((B, H, N, Dh))


common.reference_autograd(_op, reference)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(q, k, q_weight=None, k_weight=None, cos=None, sin=None, eps=1e-6, *, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    param = common.check_param_fake if fake else common.check_param
    tensor = common.check_tensor_fake if fake else (
        lambda op, name, t, shape, like, dims: common.check_tensor(op, name, t, shape=shape, like=like, dims=dims))
    common.check_tensor(OP, "q", q, ndim=4, dims="(B, N, H, Dh)")
    B, N, H, Dh = q.shape
    tensor(OP, "k", k, (B, N, H, Dh), q, "(B, N, H, Dh), as q")
    if k.dtype != q.dtype:
        raise ValueError(f"{OP}: `k` expected q's dtype {q.dtype}, got {k.dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            param(OP, name, w, (Dh,), q, "(Dh,)")
    if eps is None:
        if q_weight is not None or k_weight is not None:
            raise ValueError(f"{OP}: `eps` expected a positive float when a norm weight is given, got None")
    else:
        common.check_eps(OP, eps)
    if (cos is None) != (sin is None):
        raise ValueError(f"{OP}: `cos` and `sin` expected both tensors (RoPE) or both None, got "
                         f"{type(cos).__name__} and {type(sin).__name__}")
    if cos is not None:
        if not fake and Dh % 2:
            raise ValueError(f"{OP}: RoPE expected an even head dim Dh, got q of shape {tuple(q.shape)}")
        for name, t in (("cos", cos), ("sin", sin)):
            tensor(OP, name, t, (N, Dh), q, "(N, Dh)")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, eps: float | None = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then RoPE, written as (B, H, N, Dh) for SDPA (see the module docstring).

    q, k: (B, N, H, Dh), e.g. views of a QKV GEMM's output; q_weight, k_weight: (Dh,) or None; cos, sin:
    (N, Dh) or None; ``eps=None`` with no weights: RoPE (and the layout change) only. Returns new tensors.
    """
    if common.needs_op_path(q, k, q_weight, k_weight, cos, sin):  # validated in the registered op
        return torch.ops.eekernels.qk_norm_rope(q, k, q_weight, k_weight, cos, sin,
                                                None if eps is None else common.eps_arg(OP, eps))
    return _run(q, k, q_weight, k_weight, cos, sin, eps)
