"""cfg_step: the end of a sampling step in one pass, the CFG combine and an affine solver update.

    eps   = out_u + scale * (out_c - out_u)      over the first C channels of ``out`` = [cond; uncond]
    x_new = a * x + b * eps

Shapes: ``x`` (B, C, ...) the sample (the solver state: float32, or float64 on the torch path); ``out`` the
model output, (2B, C or 2C, ...) with CFG (rows [cond; uncond], as ``eekernels.samplers.sampling.guide`` takes
it), (B, C or 2C, ...) without (``scale=None``: eps = out[:, :C]); its trailing dims are x's, any float dtype.
A learned-sigma model's variance channels (C..2C) are never read. ``scale``, ``a``, ``b``: 0-d float tensors
on x's device, read by the kernel on the device: no host sync, and a CUDA graph that captured the call replays
with whatever values they hold then (``Session.cfg``, a row of the solver's coefficient table).
``cfg_channels``: None (or C) guides all C channels; k in [1, C) guides the first k and takes the others from
the conditional half (DiT's ``forward_with_cfg`` with k = 3), as ``guide`` does.

The solvers whose update is affine in (x, eps) for a fixed step:
- Euler, flow_euler: ``x += dt * eps``: a = 1, b = dt;
- DDIM with eta = 0 (no clipping): ``x0 = (x - s1 eps) / s0``, ``x_new = p0 x0 + p1 eps``:
  a = p0 / s0, b = p1 - p0 s1 / s0.

Arithmetic in float32 (float64 x stays float64 on the torch path), in ``guide``'s order: out cast first,
then ``u + s * (c - u)``, then ``a * x + b * eps``, one rounding to x's dtype at the end. The torch reference
reproduces ``guide`` + Euler's ``add_`` bit for bit (1 * x is exact); the Triton kernel may contract the
multiply-adds into FMAs (within an ulp or two).

``inplace=True`` writes x_new into ``x`` and returns ``x`` (the sampler's static state buffer); the default
returns a new tensor and modifies nothing.

Bytes at FLUX.1 1024^2 (x (1, 16, 128, 128) float32, out (2, 16, 128, 128) bf16), in place: read x 1.05 MB,
read out 1.05 MB, write x 1.05 MB: 3.1 MB, 1.0 us at 3.0 TB/s (docs/design.md), i.e. one launch; unfused
(``guide`` + the DDIM update) is ~10 launches and ~8 full passes of float32 temporaries. DiT-XL/2 256^2 at
B = 64 (x (64, 4, 32, 32) float32, out (128, 8, 32, 32) float32): 3 x 1.05 MB = 3.1 MB as well.
Backends: torch (reference), triton.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from eekernels.ops import _common as common
from eekernels.ops._triton import tl, triton

OP = "cfg_step"


# --------------------------------------------------------------------------------------------------
# Reference (the spec)
# --------------------------------------------------------------------------------------------------
def reference(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
              cfg_channels: int | None = None) -> torch.Tensor:
    """``a * x + b * guided_eps``, a new tensor of x's shape and dtype (see the module docstring)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C = x.shape[0], x.shape[1]
    eps = out[:, :C].to(compute)
    if scale is not None:
        eps_c, eps_u = eps[:B], eps[B:]
        s = scale.to(compute)
        if cfg_channels is None or cfg_channels >= C:
            eps = eps_u + s * (eps_c - eps_u)
        else:
            k = cfg_channels
            eps = torch.cat([eps_u[:, :k] + s * (eps_c[:, :k] - eps_u[:, :k]), eps_c[:, k:]], 1)
    y = a.to(compute) * x.to(compute) + b.to(compute) * eps
    return y.to(x.dtype).contiguous()


def _torch(x, out, scale, a, b, cfg_channels, dst):
    y = reference(x, out, scale, a, b, cfg_channels)
    if dst is None:
        return y
    dst.copy_(y)
    return dst


# --------------------------------------------------------------------------------------------------
# Triton kernel: grid (B * C, cdiv(S, BLOCK)), S = prod(x.shape[2:]); each program one block of one (b, c)
# plane. Loads x, the cond (and uncond) eps block and the three scalars; one store.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cfg_step_kernel(
    x_ptr, out_ptr, scale_ptr, a_ptr, b_ptr, y_ptr,
    B, C, S, K,
    stride_ob, stride_oc, stride_os,
    HAS_CFG: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # b * C + c; int64: B * C * S passes 2**31 at large batches
    bi = row // C
    ci = row % C
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    x = tl.load(x_ptr + row * S + offs, mask=mask, other=0.0).to(tl.float32)
    o_off = ci * stride_oc + offs * stride_os
    eps = tl.load(out_ptr + bi * stride_ob + o_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        guided = (offs * 0 + ci) < K  # a block (a scalar mask does not broadcast in the interpreter)
        u = tl.load(out_ptr + (bi + B) * stride_ob + o_off, mask=mask & guided, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr).to(tl.float32)
        eps = tl.where(guided, u + s * (eps - u), eps)
    a = tl.load(a_ptr).to(tl.float32)
    b = tl.load(b_ptr).to(tl.float32)
    y = a * x + b * eps
    tl.store(y_ptr + row * S + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def _block(S: int) -> int:
    """Values per program: S padded to a power of two, at most 1024 (8 per thread at 4 warps); cached, as
    triton.next_power_of_2 costs host time (see _common)."""
    return min(1024, triton.next_power_of_2(S))


def _triton(x, out, scale, a, b, cfg_channels, dst):
    B, C = x.shape[0], x.shape[1]
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if dst is None or not dst.is_contiguous() else dst
    if x.numel() == 0:
        return y if dst is None else dst
    S = x.numel() // (B * C)
    xc = x.contiguous()  # a no-op for the sampler's state; in place, the kernel reads x before writing it
    o3 = out.reshape(out.shape[0], out.shape[1], S)  # a view whenever the trailing dims merge
    K = C if cfg_channels is None else min(cfg_channels, C)
    so = o3.stride()
    block = _block(S)
    _cfg_step_kernel[(B * C, triton.cdiv(S, block))](
        xc, o3, a if scale is None else scale, a, b, y,  # a: unused dummy pointer without CFG
        B, C, S, K, so[0], so[1], so[2],
        HAS_CFG=scale is not None, BLOCK=block, num_warps=4,
    )
    if dst is not None and y is not dst:
        dst.copy_(y)
        return dst
    return y


IMPLS = (
    common.Impl("torch", _torch),
    common.Impl("triton", _triton, **common.TRITON),
)
AUTO_ORDER = ("triton",)  # not yet timed on a GPU: one launch instead of ~10 small ones
DISPATCH = common.Dispatch(OP, IMPLS, AUTO_ORDER)


def _run(x, out, scale, a, b, cfg_channels, dst):
    """The one entry of the public function and both registered ops (dst: None, or x for in place)."""
    validate(x, out, scale, a, b, cfg_channels)
    return DISPATCH.select(x, out).fn(x, out, scale, a, b, cfg_channels, dst)


# --------------------------------------------------------------------------------------------------
# Registration: torch.ops.eekernels.cfg_step (functional, with autograd) and cfg_step_ (writes x).
# --------------------------------------------------------------------------------------------------
# cfg_channels is a Scalar?, not an int?: an int schema turns True into 1 before validate sees it (_common, "Numbers").
@torch.library.custom_op("eekernels::cfg_step", mutates_args=())
def _op(x: torch.Tensor, out: torch.Tensor, scale: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
        cfg_channels: Optional[torch.types.Number]) -> torch.Tensor:
    return _run(x, out, scale, a, b, cfg_channels, None)


@_op.register_fake
def _(x, out, scale, a, b, cfg_channels):
    validate(x, out, scale, a, b, cfg_channels, fake=True)
    return x.new_empty(x.shape)


common.reference_autograd(_op, reference)


@torch.library.custom_op("eekernels::cfg_step_", mutates_args=("x",))
def _op_inplace(x: torch.Tensor, out: torch.Tensor, scale: Optional[torch.Tensor], a: torch.Tensor,
                b: torch.Tensor, cfg_channels: Optional[torch.types.Number]) -> None:
    _run(x, out, scale, a, b, cfg_channels, x)


@_op_inplace.register_fake
def _(x, out, scale, a, b, cfg_channels):
    validate(x, out, scale, a, b, cfg_channels, fake=True)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------
def _check_scalar(name, t, x):
    if isinstance(t, torch.Tensor) and t.dim() == 0 and t.device == x.device and t.dtype in common._CHECKED_FLOATS:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{OP}: `{name}` expected a 0-d float tensor on x's device (read on the device: no host "
                         f"sync), got {type(t).__name__}")
    if t.dim() != 0:
        raise ValueError(f"{OP}: `{name}` expected a 0-d tensor (shape ()), got shape {tuple(t.shape)}")
    common.check_tensor(OP, name, t, like=x, dims="()")


def validate(x, out, scale, a, b, cfg_channels=None, *, fake=False) -> None:
    """Raise ValueError on bad inputs; ``fake``: from a fake impl (sizes may be symbolic, see _common)."""
    common.check_tensor(OP, "x", x, dims="(B, C, ...)")
    if x.dim() < 2:
        raise ValueError(f"{OP}: `x` expected at least 2 dims (B, C, ...), got shape {tuple(x.shape)}")
    common.check_tensor(OP, "out", out, like=x, dims="(2B or B, C or 2C, ...)")
    B, C = x.shape[0], x.shape[1]
    rows = B if scale is None else 2 * B

    def got() -> str:  # built only on the way to raising
        want = "(" + ", ".join([f"{'B' if scale is None else '2B'}={rows}", f"C={C} or 2C={2 * C}",
                                *map(str, x.shape[2:])]) + ")"
        return (f"{OP}: `out` expected shape {want} for x {tuple(x.shape)}"
                + ("" if scale is None else " with CFG ([cond; uncond])") + f", got {tuple(out.shape)}")

    if out.dim() != x.dim():
        raise ValueError(got())
    c_out = out.shape[1]
    if not fake:
        if out.shape[0] != rows or (c_out != C and c_out != 2 * C) or out.shape[2:] != x.shape[2:]:
            raise ValueError(got())
    else:
        common.check_size(out.shape[0] == rows, got)
        common.check_size((c_out - C) * (c_out - 2 * C) == 0, got)  # C or 2C, one (symbolic) condition
        for i in range(2, x.dim()):
            common.check_size(out.shape[i] == x.shape[i], got)
    if scale is not None:
        _check_scalar("scale", scale, x)
    _check_scalar("a", a, x)
    _check_scalar("b", b, x)
    if cfg_channels is not None:  # as eekernels.sample takes it: 1 to C channels guided
        common.check_int(OP, "cfg_channels", cfg_channels, lambda: f"None or an int in [1, {C}] (C = x.shape[1])",
                         1, C)


def cfg_step(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, *,
             cfg_channels: int | None = None, inplace: bool = False) -> torch.Tensor:
    """``x_new = a * x + b * (out_u + scale * (out_c - out_u))`` over the first C = x.shape[1] channels.

    x: (B, C, ...); out: (2B, C or 2C, ...) = [cond; uncond] with ``scale``, (B, C or 2C, ...) with
    ``scale=None`` (no CFG: eps = out[:, :C]); scale, a, b: 0-d float tensors on x's device (read on the
    device). ``cfg_channels``: None (all C), or k in [1, C]: guide only the first k channels (the rest from the
    conditional half).
    ``inplace``: write the result into ``x`` and return it; otherwise return a new tensor (x's shape, dtype).
    """
    if inplace is not True and inplace is not False:
        raise ValueError(f"{OP}: `inplace` expected a bool, got {inplace!r}")
    op_path = common.needs_op_path(x, out, scale, a, b, numbers=() if cfg_channels is None else (cfg_channels,))
    if inplace:
        if op_path:  # validated in the registered op (impl or fake)
            torch.ops.eekernels.cfg_step_(x, out, scale, a, b, cfg_channels)
            return x
        return _run(x, out, scale, a, b, cfg_channels, x)
    if op_path:
        return torch.ops.eekernels.cfg_step(x, out, scale, a, b, cfg_channels)
    return _run(x, out, scale, a, b, cfg_channels, None)


def solver_coefficients(solver, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) 0-d device tensors for ``solver``'s update at coefficient ``row``, for the affine solvers
    (``euler``, ``flow_euler``; ``ddim`` with eta = 0 and no clipping): a few 0-d device ops, no host sync."""
    name = getattr(solver, "name", None)
    if name in ("euler", "flow_euler"):
        dt = solver.c(row, "dt")
        return torch.ones_like(dt), dt
    if name == "ddim" and solver.options.get("eta", 0.0) == 0 and not solver.options.get("clip_sample", False):
        s0, s1, p0, p1 = (solver.c(row, k) for k in ("s0", "s1", "p0", "p1"))
        a = p0 / s0
        return a, p1 - a * s1
    raise ValueError(f"{OP}: solver {name!r} has no affine update a * x + b * eps (euler, flow_euler, and ddim "
                     f"with eta=0 and clip_sample=False do)")

