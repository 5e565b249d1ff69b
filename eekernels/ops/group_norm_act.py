"""group_norm_act: GroupNorm with affine, an optional per-sample modulation, then an activation.

    h = GroupNorm(x, num_groups) * weight[c] + bias[c]
    h = h * (1 + scale[b, c]) + shift[b, c]        (when scale and shift are given; ADM's scale-shift norm)
    out = act(h)                                   (None, "gelu", "gelu_tanh", "silu")

Shapes: ``x`` (B, C, H, W); ``weight``, ``bias`` (C,) or None; ``scale``, ``shift`` (B, C) or None; params in
x's dtype or float32. Output (B, C, H, W) in x's dtype. Statistics in float32.
Backends: torch (reference), triton, cuda (``csrc/group_norm_act.cu``).

Bytes at a diffusers UNet2DModel 256 px level, (8, 128, 256, 256) bf16: 134 MB read twice (statistics,
then normalize) and written once, 0.13 ms at 3.0 TB/s; eager GroupNorm then SiLU reads it 3x, writes 2x.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from eekernels import _ext
from eekernels.ops import _common as common
from eekernels.ops._triton import tl, triton
from eekernels.ops.linear_act import activation_fn, apply_activation

OP = "group_norm_act"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def reference(x, num_groups: int, weight=None, bias=None, scale=None, shift=None, activation="silu",
              eps: float = 1e-5):
    """x: (B, C, H, W); weight, bias: (C,) or None; scale, shift: (B, C) or None.

    Computes in float32 (float64 stays float64), returns (B, C, H, W) in x's dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    # torch.group_norm, not F.group_norm: the latter rejects x of shape (1, G, 1, 1) ("more than 1 value
    # per channel"), where the normalized value is simply 0.
    h = torch.group_norm(x.to(compute), num_groups, w, b, eps)
    if scale is not None:
        h = h * (1 + scale.to(compute)[:, :, None, None]) + shift.to(compute)[:, :, None, None]
    return apply_activation(h, activation).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per (b, group), looping over the group in BLOCK chunks, twice.
#
# A group is (C / G) planes of H*W elements: 4 x 256 x 256 = 262k elements at a 256 px UNet level, too many
# for registers, hence the loop. Pass 1 merges per-chunk (count, mean, M2) with Chan's formula, stable
# where sum/sum-of-squares would cancel for large means; pass 2 normalizes, modulates and activates.
# B * G programs (8 x 32 = 256) fill an H100's 132 SMs about twice; a split reduction would only pay at
# B * G well below the SM count.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _group_norm_act_kernel(
    x_ptr, weight_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr,
    C, HW, G,
    stride_xb, stride_xc, stride_sb, stride_hb,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // G).to(tl.int64)  # int64: B * C * HW passes 2**31 at (64, 256, 128, 128)
    g = pid % G
    cpg = C // G
    size = cpg * HW
    c0 = g * cpg
    x_base = x_ptr + b * stride_xb + c0.to(tl.int64) * stride_xc
    out_base = out_ptr + (b * C + c0) * HW
    offs = tl.arange(0, BLOCK)

    # Pass 1: statistics, merged chunk by chunk (Chan et al.).
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, size, BLOCK):
        idx = start + offs
        mask = idx < size
        c = idx // HW
        v = tl.load(x_base + c.to(tl.int64) * stride_xc + (idx - c * HW), mask=mask, other=0.0).to(tl.float32)
        n = tl.minimum(size - start, BLOCK).to(tl.float32)
        chunk_mean = tl.sum(v, axis=0) / n
        d = tl.where(mask, v - chunk_mean, 0.0)
        chunk_m2 = tl.sum(d * d, axis=0)
        total = count + n
        delta = chunk_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + chunk_m2 + delta * delta * (count * n / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / size + eps)

    # Pass 2: normalize, affine, modulate, activate, store.
    for start in range(0, size, BLOCK):
        idx = start + offs
        mask = idx < size
        c = idx // HW
        v = tl.load(x_base + c.to(tl.int64) * stride_xc + (idx - c * HW), mask=mask, other=0.0).to(tl.float32)
        h = (v - mean) * rstd
        ch = c0 + c
        if HAS_WEIGHT:
            h = h * tl.load(weight_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + tl.load(bias_ptr + ch, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:
            scale = tl.load(scale_ptr + b * stride_sb + ch, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + b * stride_hb + ch, mask=mask, other=0.0).to(tl.float32)
            h = h * (1.0 + scale) + shift
        h = activation_fn(h, ACTIVATION)
        tl.store(out_base + idx, h.to(out_ptr.dtype.element_ty), mask=mask)


def _planes_contiguous(x):
    """Kernels read each (b, c) plane as H*W contiguous elements at any (b, c) strides; else copy."""
    B, C, H, W = x.shape
    stride = x.stride()
    if stride[3] == 1 and (H == 1 or stride[2] == W):
        return x
    return x.contiguous()


@functools.lru_cache(maxsize=256)
def _launch_config(group_size: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``, cached per size: triton.next_power_of_2 is costly on the host (ops/_common.py)."""
    # 4096 fp32 values per chunk: 16 per thread at 8 warps; the interpreter is fastest with big chunks too.
    block = min(4096, triton.next_power_of_2(group_size))
    return block, min(max(block // 512, 1), 8)


def _triton(x, num_groups, weight, bias, scale, shift, activation, eps):
    B, C, H, W = x.shape
    x = _planes_contiguous(x)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    scale, shift = (None if t is None else common.last_dim_contiguous(t) for t in (scale, shift))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # (B, C, H, W); ~2x cheaper than torch.empty
    if out.numel() == 0:
        return out
    block, num_warps = _launch_config((C // num_groups) * H * W)
    _group_norm_act_kernel[(B * num_groups,)](
        x, *(x if t is None else t for t in (weight, bias, scale, shift)), out,  # x: unused dummy pointer
        C, H * W, num_groups,
        *x.stride()[:2], 0 if scale is None else scale.stride()[0], 0 if shift is None else shift.stride()[0],
        float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_MOD=scale is not None,
        ACTIVATION=common.ACTIVATION_CODES[activation],
        BLOCK=block, num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# CUDA C++ kernel (csrc/group_norm_act.cu): pointers, sizes, strides and the stream as integers.
# --------------------------------------------------------------------------------------------------
def _cuda(x, num_groups, weight, bias, scale, shift, activation, eps):
    B, C, H, W = x.shape
    x = _planes_contiguous(x)
    params = (weight, bias, scale, shift)
    given = [t for t in params if t is not None]
    param_dtype = x.dtype if all(t.dtype == x.dtype for t in given) else torch.float32
    weight, bias, scale, shift = (None if t is None else t.to(param_dtype).contiguous() for t in params)
    out = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _ext.load().group_norm_act(
        common.ptr(x), common.ptr(weight), common.ptr(bias), common.ptr(scale), common.ptr(shift), common.ptr(out),
        B, C, H * W, num_groups, x.stride(0), x.stride(1), float(eps),
        common.ACTIVATION_CODES[activation], common.dtype_code(x), common.DTYPE_CODES[param_dtype],
        common.stream_handle(x),
    )
    return out


def _torch(*args):
    # Contiguous like the fake impl says: the elementwise ops keep a channels_last input's layout.
    return reference(*args).contiguous()


IMPLS = (
    common.Impl("torch", _torch),
    common.Impl("triton", _triton, **common.TRITON),
    common.Impl("cuda", _cuda, **common.CUDA),
)
# Fastest first on CUDA, as measured at (64, 256, 32, 32) bf16, 32 groups on an H100 (benchmarks/RESULTS.md §1).
AUTO_ORDER = ("triton", "cuda")
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, num_groups, weight, bias, scale, shift, activation, eps):
    """The one entry of both the public function and ``torch.ops.eekernels.group_norm_act``."""
    validate(x, num_groups, weight, bias, scale, shift, activation, eps)
    impl = DISPATCH.select(x, weight, bias, scale, shift)
    return impl.fn(x, num_groups, weight, bias, scale, shift, activation, eps)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.group_norm_act (arguments in the public function's order), its fake
# impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::group_norm_act", mutates_args=())
def _op(
    x: torch.Tensor, num_groups: torch.types.Number, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], activation: Optional[str], eps: torch.types.Number,
) -> torch.Tensor:  # Scalar, not int / float: a bool num_groups or eps reaches validate (_common's "Numbers")
    return _run(x, num_groups, weight, bias, scale, shift, activation, eps)


@_op.register_fake
def _(x, num_groups, weight, bias, scale, shift, activation, eps):
    validate(x, num_groups, weight, bias, scale, shift, activation, eps, fake=True)
    return x.new_empty(x.shape)


common.reference_autograd(_op, reference)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(x, num_groups, weight=None, bias=None, scale=None, shift=None, activation="silu", eps=1e-5, *,
             fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    param = common.check_param_fake if fake else common.check_param
    common.check_tensor(OP, "x", x, ndim=4, dims="(B, C, H, W)")
    B, C = x.shape[:2]
    common.check_int(OP, "num_groups", num_groups, "a positive int")
    common.check_size(C % num_groups == 0, lambda: f"{OP}: `num_groups` expected to divide the {C} channels of x "
                                                   f"(B, C, H, W), got {num_groups}")
    if weight is not None:
        param(OP, "weight", weight, (C,), x, "(C,)")
    if bias is not None:
        param(OP, "bias", bias, (C,), x, "(C,)")
    if (scale is None) != (shift is None):
        given, missing = ("scale", "shift") if shift is None else ("shift", "scale")
        raise ValueError(f"{OP}: `{missing}` expected a (B, C) tensor because `{given}` is given "
                         f"(both or neither), got None")
    if scale is not None:
        param(OP, "scale", scale, (B, C), x, "(B, C)")
        param(OP, "shift", shift, (B, C), x, "(B, C)")  # not None either: both-or-neither is checked above
    common.check_activation(OP, activation)
    common.check_eps(OP, eps)


def group_norm_act(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, activation: str | None = "silu",
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm + affine, then ``* (1 + scale) + shift`` per (sample, channel) if given, then the activation.

    x: (B, C, H, W) with C divisible by num_groups; weight, bias: (C,) or None; scale, shift: (B, C) or None;
    activation: None, "gelu", "gelu_tanh" or "silu". Returns a new (B, C, H, W) tensor in x's dtype.
    """
    if common.needs_op_path(x, weight, bias, scale, shift, numbers=(num_groups, eps), strings=(activation,)):
        return torch.ops.eekernels.group_norm_act(x, num_groups, weight, bias, scale, shift, activation, eps)
    return _run(x, num_groups, weight, bias, scale, shift, activation, eps)
