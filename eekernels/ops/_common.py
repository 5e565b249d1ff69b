"""Shared machinery of the op files: input validation, backend dispatch and reference autograd.

Each op file (``eekernels/ops/<op>.py``) tells its whole story; this module only holds what would
otherwise be copied into each of them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import triton

from eekernels import _backend, _ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu")
_CHECKED_FLOATS = frozenset(FLOAT_DTYPES + (torch.float64,))  # float64: the tests' reference inputs


# --------------------------------------------------------------------------------------------------
# Validation: a ValueError naming the op, the argument, what was expected and what was given.
#
# Every op call validates its inputs on the host, and at small batches the host is the bottleneck
# (DiT-XL/2 at batch 2 on an H100: ~9.1 ms of CPU per forward, benchmarks/RESULTS.md). So each check first
# tests the common valid case with a few cheap comparisons (torch.Size == tuple, dtype in a frozenset) and
# returns; only when that fails does it run the step-by-step checks, which build the message and raise (or
# accept a case the fast test does not cover, such as a shape with free entries). Messages are built only
# on the way to raising. benchmarks/bench_host_overhead.py times the whole public call.
# --------------------------------------------------------------------------------------------------
def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    like: torch.Tensor | None = None,
    dims: str = "",
    floating: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor of the given rank/shape, on ``like``'s device.

    ``shape`` entries that are None are free. ``dims`` names the dims in the message, e.g. "(B, D)".
    Dtypes may differ from ``like`` only among the floating types (shift/scale in float32 with a
    bfloat16 ``x`` is fine); that is checked by :func:`check_dtype`.
    """
    if (
        isinstance(t, torch.Tensor)
        and (ndim is None or t.dim() == ndim)
        and (shape is None or t.shape == shape)  # False for free (None) entries: those take the slow path
        and (not floating or t.dtype in _CHECKED_FLOATS)
        and (like is None or t.device == like.device)
    ):
        return
    check_tensor_steps(op, name, t, ndim, shape, like, dims, floating)


def check_tensor_steps(op, name, t, ndim, shape, like, dims, floating) -> None:
    """:func:`check_tensor` one condition at a time, in message order: raises the first that fails."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` expected a torch.Tensor {dims}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` expected {ndim} dims {dims}, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(e is not None and e != g for e, g in zip(shape, t.shape)):
            want = tuple("*" if e is None else e for e in shape)
            raise ValueError(f"{op}: `{name}` expected shape {want} {dims}, got {tuple(t.shape)}")
    if floating and t.dtype not in _CHECKED_FLOATS:
        raise ValueError(f"{op}: `{name}` expected a floating dtype (float32, float16, bfloat16), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{op}: `{name}` expected device {like.device} (the device of x), got {t.device}")


def check_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """Per-sample/affine parameters must be x's dtype or float32 (a common mixed-precision layout)."""
    if t.dtype != x.dtype and t.dtype != torch.float32:
        raise ValueError(f"{op}: `{name}` expected dtype {x.dtype} (as x) or torch.float32, got {t.dtype}")


def check_param(op: str, name: str, t, shape: tuple[int, ...], x: torch.Tensor, dims: str) -> None:
    """A per-sample or affine parameter: :func:`check_tensor` (``shape``, x's device) then :func:`check_dtype`.

    One call with one fast test for the usual valid case; anything else runs both checks in order, so the
    errors (and which one comes first) are exactly theirs.
    """
    if isinstance(t, torch.Tensor) and t.shape == shape and t.device == x.device:
        dtype = t.dtype
        if (dtype == x.dtype or dtype == torch.float32) and dtype in _CHECKED_FLOATS:
            return
    check_tensor(op, name, t, shape=shape, like=x, dims=dims)
    check_dtype(op, name, t, x)


def check_eps(op: str, eps) -> None:
    if not isinstance(eps, (float, int)) or not eps > 0:
        raise ValueError(f"{op}: `eps` expected a positive float, got {eps!r}")


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: `activation` expected one of {ACTIVATIONS}, got {activation!r}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels honour the outer strides but need unit stride along the reduced (last) dim."""
    return t if t.stride()[-1] == 1 else t.contiguous()  # stride()[-1]: stride(-1) parses its argument, 1.5x slower


# --------------------------------------------------------------------------------------------------
# Triton launches: what the host pays per call, and what is cached.
#
# Our launchers' own host time, with Triton's launch stubbed out, went from 6-11 us to 2.5-6 us per call on
# the 2-core CPU dev machine: triton.next_power_of_2 is a ConstexprFunction whose host call costs ~2 us, so
# launch configurations are computed once per size (row_launch_config); `t.stride()` once per tensor beats
# `t.stride(i)` per dim (~0.2 us each: argument parsing); outputs come from
# `torch.empty_like(x, memory_format=torch.contiguous_format)`, about half the cost of
# `torch.empty(shape, dtype=, device=)`.
#
# The launch itself (~28 us of host time per kernel on the H100 machine, benchmarks/RESULTS.md) is triton
# 3.9's JITFunction.run: it reads the knobs, the current device and stream, binds and specializes every
# argument (pointer 16-byte alignment, integers == 1 or divisible by 16), hashes that into the kernel-cache
# key and builds launch metadata. The compiled kernel that `kernel[grid](...)` returns could be kept and its
# `.run` called directly, skipping the binder; but that cache would have to be keyed on the same
# specialization (alignment of every pointer, divisibility of every int), or it launches a kernel compiled
# for other assumptions, and the path can only be tested on a GPU, so it is not done here. For fixed shapes
# the sampler's whole-step CUDA graphs (eekernels/graphs.py) remove the launch cost by replaying the kernels.
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def row_launch_config(D: int) -> tuple[int, int]:
    """``(BLOCK_D, num_warps)`` for the one-row-per-program kernels: the row padded to a power of two, held in
    registers, one warp per 256 values (at most 8)."""
    block = triton.next_power_of_2(D)
    return block, min(max(block // 256, 1), 8)


# --------------------------------------------------------------------------------------------------
# Dispatch by capability (xformers-style): each implementation states why it cannot run an input.
# --------------------------------------------------------------------------------------------------
def triton_reasons(x: torch.Tensor, *_) -> list[str]:
    if x.is_cuda or (x.device.type == "cpu" and _backend.triton_interpret()):
        return []
    return [f"triton: needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got device {x.device}"]


def cuda_reasons(x: torch.Tensor, *_) -> list[str]:
    reasons = []
    if not x.is_cuda:
        reasons.append(f"cuda: needs CUDA tensors, got device {x.device}")
    if not _ext.available():
        reasons.append(f"cuda: {_ext.BUILD_HINT}")
    return reasons


def no_reasons(*_) -> list[str]:
    """The torch reference runs anywhere."""
    return []


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``fn`` runs it, ``reasons(*args)`` lists why it cannot (empty: it can)."""

    name: str
    fn: Callable
    reasons: Callable[..., list[str]]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these inputs; the message lists every implementation's reasons."""


class Dispatch:
    """An op's implementations, indexed once (each op file holds one) so that a call only looks them up.

    ``auto``: on CUDA the first of ``auto_order`` (fastest measured first) that supports the inputs;
    elsewhere the torch reference. An explicit backend is used as asked, or raises.
    """

    def __init__(self, op: str, impls: Sequence[Impl], auto_order: Sequence[str]):
        self.op = op
        self.impls = tuple(impls)
        self.by_name = {impl.name: impl for impl in self.impls}
        self.torch = self.by_name["torch"]
        self.auto = tuple(self.by_name[name] for name in auto_order if name in self.by_name)

    def select(self, x: torch.Tensor, *args) -> Impl:
        """Pick the implementation for this call (``args``: the tensors after x, for the ``reasons``)."""
        name = _backend.current_backend()
        if name == "auto":
            if not x.is_cuda:
                return self.torch
            for impl in self.auto:
                if not impl.reasons(x, *args):
                    return impl
            return self.torch
        impl = self.by_name.get(name)
        if impl is not None and not impl.reasons(x, *args):
            return impl
        lines = [f"{self.op}: backend {name!r} cannot run these inputs"]
        for other in self.impls:
            why = other.reasons(x, *args)
            lines.append(f"  {other.name}: " + ("supported" if not why else "; ".join(why)))
        if impl is None:
            lines.append(f"  {name}: no implementation of this op")
        raise BackendUnavailable("\n".join(lines))


def select(op: str, impls: Sequence[Impl], auto_order: Sequence[str], x: torch.Tensor, *args) -> Impl:
    """Pick the implementation for this call, as :meth:`Dispatch.select` (which the op calls use)."""
    return Dispatch(op, impls, auto_order).select(x, *args)


def auto_choice(impls: Sequence[Impl], auto_order: Sequence[str], x: torch.Tensor, *args) -> tuple[str, str]:
    """The backend ``auto`` would take for these inputs, and why (for ``eekernels info``)."""
    if not x.is_cuda:
        return "torch", f"inputs on {x.device}: the torch reference"
    skipped = []
    for candidate in auto_order:
        impl = next((i for i in impls if i.name == candidate), None)
        if impl is None:
            continue
        why = impl.reasons(x, *args)
        if not why:
            note = f"fastest measured of {list(auto_order)}"
            return candidate, note + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
        skipped.extend(why)
    return "torch", "no faster implementation supports the inputs: " + "; ".join(skipped)


def needs_op_path(*tensors) -> bool:
    """Route through ``torch.ops.eekernels.*`` (autograd + fake impls) when tracing or differentiating.

    ``tensors`` are the op's validated tensor arguments, None for absent optional ones.

    Eager inference calls the implementation directly: a registered-op call costs 40-70 us of host
    time (DESIGN.md), more than the kernel itself at small sizes.
    """
    if torch.compiler.is_compiling():
        return True
    if torch.is_grad_enabled():
        for t in tensors:  # a plain loop: any() over a generator costs more than the checks (~0.5 us)
            if t is not None and t.requires_grad:
                return True
    return False


def reference_autograd(op, reference: Callable, num_tensors: int) -> None:
    """Register autograd for ``op`` by recomputing ``reference`` in float32 under autograd in backward.

    The first ``num_tensors`` arguments of the op are tensors (or None); the rest are constants.
    Backward costs one reference forward, which is fine for fine-tuning and keeps a single spec.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else None for t in inputs[:num_tensors]])
        ctx.present = [isinstance(t, torch.Tensor) for t in inputs[:num_tensors]]
        ctx.constants = inputs[num_tensors:]

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [
                s.detach().requires_grad_(ctx.needs_input_grad[i]) if ctx.present[i] else None
                for i, s in enumerate(saved)
            ]
            out = reference(*leaves, *ctx.constants)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        it = iter(got)
        result = [next(it) if leaf is not None and leaf.requires_grad else None for leaf in leaves]
        return tuple(result) + (None,) * len(ctx.constants)

    op.register_autograd(backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------------
# Helpers for calls into the torch-free _C: pointers, strides and the stream go in as integers.
# --------------------------------------------------------------------------------------------------
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def stream_handle(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
