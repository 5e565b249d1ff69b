"""Shared machinery of the op files: input validation, backend dispatch and reference autograd.

Each op file (``eekernels/ops/<op>.py``) tells its whole story; this module only holds what would
otherwise be copied into each of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from eekernels import _backend, _ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu")


# --------------------------------------------------------------------------------------------------
# Validation: a ValueError naming the op, the argument, what was expected and what was given.
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
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` expected a torch.Tensor {dims}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` expected {ndim} dims {dims}, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(e is not None and e != g for e, g in zip(shape, t.shape)):
            want = tuple("*" if e is None else e for e in shape)
            raise ValueError(f"{op}: `{name}` expected shape {want} {dims}, got {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{op}: `{name}` expected a floating dtype (float32, float16, bfloat16), got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{op}: `{name}` expected device {like.device} (the device of x), got {t.device}")


def check_dtype(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """Per-sample/affine parameters must be x's dtype or float32 (a common mixed-precision layout)."""
    if t.dtype != x.dtype and t.dtype != torch.float32:
        raise ValueError(f"{op}: `{name}` expected dtype {x.dtype} (as x) or torch.float32, got {t.dtype}")


def check_eps(op: str, eps) -> None:
    if not isinstance(eps, (float, int)) or not eps > 0:
        raise ValueError(f"{op}: `eps` expected a positive float, got {eps!r}")


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: `activation` expected one of {ACTIVATIONS}, got {activation!r}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels honour the outer strides but need unit stride along the reduced (last) dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------------
# Dispatch by capability (xformers-style): each implementation states why it cannot run an input.
# --------------------------------------------------------------------------------------------------
def triton_reasons(x: torch.Tensor) -> list[str]:
    if x.is_cuda or (x.device.type == "cpu" and _backend.triton_interpret()):
        return []
    return [f"triton: needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got device {x.device}"]


def cuda_reasons(x: torch.Tensor) -> list[str]:
    reasons = []
    if not x.is_cuda:
        reasons.append(f"cuda: needs CUDA tensors, got device {x.device}")
    if not _ext.available():
        reasons.append(f"cuda: {_ext.BUILD_HINT}")
    return reasons


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``fn`` runs it, ``reasons(*args)`` lists why it cannot (empty: it can)."""

    name: str
    fn: Callable
    reasons: Callable[..., list[str]]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these inputs; the message lists every implementation's reasons."""


def select(op: str, impls: Sequence[Impl], auto_order: Sequence[str], x: torch.Tensor, *args) -> Impl:
    """Pick the implementation for this call.

    ``auto``: on CUDA the first of ``auto_order`` (fastest measured first) that supports the inputs;
    elsewhere the torch reference. An explicit backend is used as asked, or raises.
    """
    by_name = {impl.name: impl for impl in impls}
    name = _backend.current_backend()
    if name == "auto":
        if not x.is_cuda:
            return by_name["torch"]
        for candidate in auto_order:
            impl = by_name.get(candidate)
            if impl is not None and not impl.reasons(x, *args):
                return impl
        return by_name["torch"]
    impl = by_name.get(name)
    if impl is not None and not impl.reasons(x, *args):
        return impl
    lines = [f"{op}: backend {name!r} cannot run these inputs"]
    for other in impls:
        why = other.reasons(x, *args)
        lines.append(f"  {other.name}: " + ("supported" if not why else "; ".join(why)))
    if impl is None:
        lines.append(f"  {name}: no implementation of this op")
    raise BackendUnavailable("\n".join(lines))


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

    Eager inference calls the implementation directly: a registered-op call costs 40-70 us of host
    time (DESIGN.md), more than the kernel itself at small sizes.
    """
    if torch.compiler.is_compiling():
        return True
    if torch.is_grad_enabled():
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
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
