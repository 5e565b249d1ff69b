"""linear_act: ``act(x @ weight.T + bias)`` with the bias and activation in the GEMM epilogue.

Shapes: ``x`` (..., K), any leading dims; ``weight`` (M, K) in x's dtype; ``bias`` (M,) or None, in x's dtype
or float32. Output (..., M) in x's dtype. Activations: None, "gelu" (erf), "gelu_tanh", "silu".
Accumulation in float32. Backends: torch (reference), triton (tiled GEMM), and on CUDA ``cublas``
(torch's native-dtype GEMM), which only ``auto`` picks. There is no CUDA C++ kernel:
``backend("cuda")`` raises with reasons.

FLOPs at DiT-XL/2 fc1, B=64: 2 x 16384 x 1152 x 4608 = 174 GFLOP (floor: docs/design.md). Measured against
``F.linear`` alone, linear then a separate GELU, and cuBLASLt's GELU epilogue: benchmarks/RESULTS.md §1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from eekernels import _backend
from eekernels.ops import _common as common
from eekernels.ops._triton import tl, triton

OP = "linear_act"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def apply_activation(h: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activations by name: None, "gelu" (erf), "gelu_tanh" (tanh approximation), "silu"."""
    if activation is None:
        return h
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation: expected one of {common.ACTIVATIONS}, got {activation!r}")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              activation: str | None = None) -> torch.Tensor:
    """x: (..., K); weight: (M, K); bias: (M,) or None. Computes in float32 (float64 stays float64),
    returns (..., M) in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    b = None if bias is None else bias.to(compute)
    h = F.linear(x.to(compute), weight.to(compute), b)
    return apply_activation(h, activation).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel: a tiled GEMM (rows of x against rows of weight), bias and activation in the epilogue
# so the (R, M) product is written once instead of written, read and written again.
# --------------------------------------------------------------------------------------------------
@triton.jit
def activation_fn(h, ACTIVATION: tl.constexpr):
    """Activation by code (common.ACTIVATION_CODES) on float32 values; shared with group_norm_act."""
    if ACTIVATION == 1:  # gelu (erf)
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu_tanh: 0.5 * h * (1 + tanh(u)) == h * sigmoid(2u); tl has no tanh
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        h = h * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 3:  # silu
        h = h * tl.sigmoid(h)
    return h


def _configs():
    if _backend.triton_interpret():
        # The interpreter runs each program in Python: few large tiles are fastest, and one config means
        # no autotuning sweep on CPU.
        return [triton.Config({"BLOCK_R": 64, "BLOCK_M": 64, "BLOCK_K": 64, "GROUP_R": 8}, num_warps=4)]
    # Tiles from Triton's matmul tutorial: the large ones for DiT's GEMMs (R = 16384 tokens), 64 x 64 for
    # small batches. Five, not more: each config is one compile (~1 s) per new (R, M, K, dtype).
    shapes = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 32, 4, 4),
              (64, 64, 32, 4, 4)]
    return [triton.Config({"BLOCK_R": r, "BLOCK_M": m, "BLOCK_K": k, "GROUP_R": 8}, num_warps=w, num_stages=s)
            for r, m, k, w, s in shapes]


@triton.autotune(configs=_configs(), key=["R", "M", "K"])
@triton.jit
def _linear_act_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    R, M, K,
    stride_xr, stride_wm, stride_wk,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    IS_INTERPRET_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    # Grouped launch order: GROUP_R row tiles sweep the weight tiles together, so weight stays in L2.
    pid = tl.program_id(0)
    num_r = tl.cdiv(R, BLOCK_R)
    num_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_R * num_m
    first_r = (pid // width) * GROUP_R
    group_size = min(num_r - first_r, GROUP_R)
    pid_r = first_r + (pid % width) % group_size
    pid_m = (pid % width) // group_size

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    # int64: R * K passes 2**31 at 466k rows of K = 4608 (DiT-XL fc2 input at B = 1820).
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xr + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wm + ks[:, None] * stride_wk  # (BLOCK_K, BLOCK_M)
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=(rows[:, None] < R) & (ks[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(ks[:, None] < k_left) & (cols[None, :] < M), other=0.0)
        if IS_INTERPRET_BF16:  # triton 3.9's interpreter matmuls bfloat16's raw uint16 bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)[None, :]
    acc = activation_fn(acc, ACTIVATION)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * M + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < R) & (cols[None, :] < M))


def _triton(x, weight, bias, activation):
    K = x.shape[-1]
    M = weight.shape[0]
    out = x.new_empty((*x.shape[:-1], M))  # x's dtype and device; cheaper than torch.empty(..., dtype, device)
    if out.numel() == 0:
        return out
    if K == 0:  # an empty sum: the product is zero, leaving bias and activation
        return reference(x, weight, bias, activation)
    # Rows are the leading dims flattened: a view (honouring the row stride) where they merge, else a copy.
    x2 = common.last_dim_contiguous(x).reshape(-1, K)
    bias = None if bias is None else bias.contiguous()
    R = x2.shape[0]
    # Triton's float32 dot uses TF32 on GPUs (10-bit mantissa); float32 callers expect float32 results.
    precision = "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(M, meta["BLOCK_M"]),)

    _linear_act_kernel[grid](
        x2, weight, x2 if bias is None else bias, out,  # x2: unused dummy pointer
        R, M, K,
        x2.stride()[0], *weight.stride(),
        HAS_BIAS=bias is not None, ACTIVATION=common.ACTIVATION_CODES[activation], INPUT_PRECISION=precision,
        IS_INTERPRET_BF16=x.dtype == torch.bfloat16 and _backend.triton_interpret(),  # dtype first: the env read costs more
    )
    return out


# --------------------------------------------------------------------------------------------------
# cuBLAS through torch, in x's dtype (float32 accumulate); the product is rounded once before the
# activation. For gelu_tanh with a bias, cuBLASLt's GELU epilogue (faster than unfused: benchmarks/RESULTS.md §1).
# --------------------------------------------------------------------------------------------------
def _cublas(x, weight, bias, activation):
    bias = None if bias is None else bias.to(x.dtype)
    if activation == "gelu_tanh" and bias is not None and x.dim() >= 2 and x.dtype != torch.float64:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return apply_activation(F.linear(x, weight, bias), activation)


IMPLS = (
    common.Impl("torch", reference),
    common.Impl("triton", _triton, **common.TRITON),
    common.Impl("cublas", _cublas, devices=frozenset({"cuda"}))  # any float dtype: torch's GEMM,
)
# Honest order: cuBLAS runs the DiT GEMMs at ~720 TFLOP/s (docs/design.md) and this Triton GEMM has not been
# measured ahead of it anywhere, so auto takes cuBLAS on CUDA. Move "triton" first only with a
# benchmarks/RESULTS.md figure that shows it faster for the shapes in question.
AUTO_ORDER = ("cublas", "triton")
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, weight, bias, activation):
    """The one entry of both the public function and ``torch.ops.eekernels.linear_act``."""
    validate(x, weight, bias, activation)
    return DISPATCH.select(x, weight, bias).fn(x, weight, bias, activation)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.linear_act, its fake impl and autograd.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("eekernels::linear_act", mutates_args=())
def _op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str]) -> torch.Tensor:
    return _run(x, weight, bias, activation)


@_op.register_fake
def _(x, weight, bias, activation):
    validate(x, weight, bias, activation, fake=True)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


common.reference_autograd(_op, reference)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def validate(x, weight, bias=None, activation=None, *, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from the fake impl (sizes may be symbolic, see _common)."""
    common.check_tensor(OP, "x", x, dims="(..., K)")
    if x.dim() < 1:
        raise ValueError(f"{OP}: `x` expected at least 1 dim (..., K), got shape {tuple(x.shape)}")
    K = x.shape[-1]
    common.check_tensor(OP, "weight", weight, ndim=2, like=x, dims="(M, K)")
    common.check_size(weight.shape[1] == K, lambda: f"{OP}: `weight` expected shape (M, {K}) (M, K) with "
                                                    f"K = x.shape[-1], got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{OP}: `weight` expected dtype {x.dtype} (as x), got {weight.dtype}")
    if bias is not None:
        (common.check_param_fake if fake else common.check_param)(OP, "bias", bias, (weight.shape[0],), x, "(M,)")
    common.check_activation(OP, activation)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``, the activation fused into the GEMM epilogue.

    x: (..., K); weight: (M, K) in x's dtype; bias: (M,) or None; activation: None, "gelu", "gelu_tanh"
    or "silu". Returns a new (..., M) tensor in x's dtype.
    """
    if common.needs_op_path(x, weight, bias, strings=(activation,)):  # validated in the registered op (impl or fake)
        return torch.ops.eekernels.linear_act(x, weight, bias, activation)
    return _run(x, weight, bias, activation)
