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
cos/sin (2 x 2.4 MB float32, read once per token for all its heads): 118 MB, 39 us at 3.0 TB/s (docs/design.md).
Unfused, diffusers reads and writes q and k three times (norm, RoPE, the transpose SDPA's layout needs).
Backends: torch (reference), triton.
"""
from __future__ import annotations

import functools
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
# Triton kernel: one program per (b, n) token and block of heads, for q and k. The (heads, Dh) tile is loaded as
# its even and odd halves (the RoPE pairs), normalized per head and rotated in registers, and stored at
# (b, h, n) of the outputs. The token's cos/sin row is loaded once for all its heads (and q and k).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rope_tile(src, w_ptr, dst, c_e, c_o, s_e, s_o, ev, mask, omask, Dh, eps,
               HAS_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROPE: tl.constexpr):
    """One (heads, Dh) tile: ``src``/``dst`` point at each pair's even element, ``ev`` = 2 * pair index."""
    xe = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(src + 1, mask=omask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=1) + tl.sum(xo * xo, axis=1)) / Dh + eps)
        xe = xe * rstd[:, None]
        xo = xo * rstd[:, None]
        if HAS_WEIGHT:
            xe = xe * tl.load(w_ptr + ev, mask=ev < Dh, other=0.0).to(tl.float32)[None, :]
            xo = xo * tl.load(w_ptr + ev + 1, mask=ev + 1 < Dh, other=0.0).to(tl.float32)[None, :]
    if HAS_ROPE:
        ye = xe * c_e - xo * s_e
        yo = xo * c_o + xe * s_o
    else:
        ye = xe
        yo = xo
    tl.store(dst, ye.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + 1, yo.to(dst.dtype.element_ty), mask=omask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    N, H, Dh,
    sqb, sqn, sqh, skb, skn, skh, scn, ssn,
    eps,
    HAS_NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, HAS_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)  # int64: B * H * N * Dh passes 2**31 at video sizes
    n = tok % N
    b = tok // N
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ev = 2 * tl.arange(0, BLOCK_HALF)  # each pair's even element; the index math is shared by q, k and the tables
    mask = (heads[:, None] < H) & (ev[None, :] < Dh)
    omask = mask & (ev[None, :] + 1 < Dh)  # odd Dh (no RoPE): the last pair has no odd element
    c_e = 0.0
    c_o = 0.0
    s_e = 0.0
    s_o = 0.0
    if HAS_ROPE:  # Dh is even here
        cp = cos_ptr + n * scn + ev
        sp = sin_ptr + n * ssn + ev
        rmask = ev < Dh
        c_e = tl.load(cp, mask=rmask, other=0.0).to(tl.float32)[None, :]
        c_o = tl.load(cp + 1, mask=rmask, other=0.0).to(tl.float32)[None, :]
        s_e = tl.load(sp, mask=rmask, other=0.0).to(tl.float32)[None, :]
        s_o = tl.load(sp + 1, mask=rmask, other=0.0).to(tl.float32)[None, :]
    # (B, H, N, Dh) contiguous outputs: head h of this token at (b * H + h) * N * Dh + n * Dh
    out = (b * H * N + n) * Dh + heads[:, None] * (N * Dh) + ev[None, :]
    _rope_tile(q_ptr + b * sqb + n * sqn + heads[:, None] * sqh + ev[None, :], qw_ptr, qo_ptr + out,
               c_e, c_o, s_e, s_o, ev, mask, omask, Dh, eps, HAS_NORM, HAS_QW, HAS_ROPE)
    _rope_tile(k_ptr + b * skb + n * skn + heads[:, None] * skh + ev[None, :], kw_ptr, ko_ptr + out,
               c_e, c_o, s_e, s_o, ev, mask, omask, Dh, eps, HAS_NORM, HAS_KW, HAS_ROPE)


@functools.lru_cache(maxsize=256)
def _launch_config(H: int, Dh: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_HALF, num_warps)``: all heads of a token in one program up to 4096 values per tile
    (FLUX's 24 x 128 pads to 32 x 64 pairs), one warp per 512 values, at most 8."""
    half = triton.next_power_of_2((Dh + 1) // 2)
    block_h = min(triton.next_power_of_2(H), max(1, 2048 // half))
    return block_h, half, min(max(block_h * half // 256, 1), 8)


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
    block_h, block_half, num_warps = _launch_config(H, Dh)
    _qk_norm_rope_kernel[(B * N, triton.cdiv(H, block_h))](
        q, k, q if qw is None else qw, q if kw is None else kw, q if not rope else cos, q if not rope else sin,
        q_out, k_out,  # q: unused dummy pointer
        N, H, Dh,
        *q.stride()[:3], *k.stride()[:3], cos.stride()[0] if rope else 0, sin.stride()[0] if rope else 0,
        1e-6 if eps is None else float(eps),
        HAS_NORM=eps is not None, HAS_QW=qw is not None, HAS_KW=kw is not None, HAS_ROPE=rope,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
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
        cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
        eps: Optional[torch.types.Number]) -> tuple[torch.Tensor, torch.Tensor]:  # Scalar?: see _common
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
def _kind(t) -> str:
    """How a message names a value: "None", "a tensor" (a real or fake one alike) or its type."""
    return "None" if t is None else "a tensor" if isinstance(t, torch.Tensor) else type(t).__name__


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
            raise ValueError(f"{OP}: `eps` expected a positive float (finite, not a bool), got None (None means "
                             f"no norm, which takes no q_weight or k_weight)")
    else:
        common.check_eps(OP, eps)
    if (cos is None) != (sin is None):
        raise ValueError(f"{OP}: `cos` and `sin` expected both tensors (RoPE) or both None, got "
                         f"{_kind(cos)} and {_kind(sin)}")
    if cos is not None:
        common.check_size(Dh % 2 == 0, lambda: f"{OP}: `q` expected an even head dim Dh for RoPE (cos and sin "
                                               f"given), got shape {tuple(q.shape)} (B, N, H, Dh)")
        for name, t in (("cos", cos), ("sin", sin)):
            tensor(OP, name, t, (N, Dh), q, "(N, Dh)")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, eps: float | None = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then RoPE, written as (B, H, N, Dh) for SDPA (see the module docstring).

    q, k: (B, N, H, Dh), e.g. views of a QKV GEMM's output; q_weight, k_weight: (Dh,) or None; cos, sin:
    (N, Dh) or None; ``eps=None`` with no weights: RoPE (and the layout change) only. Returns new tensors.
    """
    if common.needs_op_path(q, k, q_weight, k_weight, cos, sin, numbers=() if eps is None else (eps,)):
        return torch.ops.eekernels.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)  # validated there
    return _run(q, k, q_weight, k_weight, cos, sin, eps)
