"""Shared machinery of the op files: input validation, backend dispatch and reference autograd.

Each op file (``eekernels/ops/<op>.py``) tells its whole story; this module only holds what would
otherwise be copied into each of them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from eekernels import _backend, _ext
from eekernels.ops._triton import HAS_TRITON, NOT_INSTALLED, tl, triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The activations by name, and the codes the Triton kernels and csrc/ switch on. csrc/common.cuh mirrors
# these codes in `activate` (tests/ops/test_activations.py compares the two).
ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
ACTIVATIONS = tuple(ACTIVATION_CODES)
_CHECKED_FLOATS = frozenset(FLOAT_DTYPES + (torch.float64,))  # float64: the torch path computes it in float64
KERNEL_DTYPES = frozenset(FLOAT_DTYPES)  # what the Triton and _C kernels compute at the dtype's own precision


# --------------------------------------------------------------------------------------------------
# Validation: a ValueError naming the op, the argument, what was expected and what was given.
#
# Every op call validates its inputs on the host, and at small batches the host is the bottleneck
# (DiT-XL/2 at batch 2 on an H100 is host-bound: benchmarks/RESULTS.md §2). So each check first
# tests the common valid case with a few cheap comparisons (torch.Size == tuple, dtype in a frozenset) and
# returns; only when that fails does it run the step-by-step checks, which build the message and raise (or
# accept a case the fast test does not cover, such as a shape with free entries). Messages are built only
# on the way to raising. benchmarks/bench_host_overhead.py times the whole public call.
#
# Each op validates in one place, its ``_run``: the public function's eager path and the registered
# ``torch.ops.eekernels.<op>`` impl both go through it, so a direct torch.ops call is checked and a wrapper
# call is checked once. The fake impls run the same ``validate`` with ``fake=True`` (sizes below).
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


# Numbers. A registered op declares its number arguments (eps, num_groups, cfg_channels) as ``Scalar``
# (``torch.types.Number``), not ``float`` or ``int``: torch's dispatcher converts a bool given to a ``float``
# argument into 1.0 and one given to an ``int`` (SymInt) argument into 1 before the op sees it (it also takes a
# 0-d tensor there), while a ``Scalar`` reaches the op as the Python value it was, so the checks below see the
# bool. Under torch.compile(dynamic=True) a number may arrive as a SymInt / SymFloat: its range conditions go
# through check_size (a deferred assertion, no specialization); the op checks the concrete value when it runs.
def is_int(value) -> bool:
    """A Python int that is not a bool, or a symbolic int (tracing)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, torch.SymInt)


def check_int(op: str, name: str, value, expected: str | Callable[[], str], low: int = 1, high=None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) in ``[low, high]`` (``high``: None for no
    bound, or a size, which may be symbolic); ``expected`` (or a function building it) describes the valid
    values in the message."""
    def message() -> str:
        return f"{op}: `{name}` expected {expected() if callable(expected) else expected}, got {value!r}"

    if not is_int(value):
        raise ValueError(message())
    check_size(value >= low, message)
    if high is not None:
        check_size(value <= high, message)


def check_eps(op: str, eps) -> None:
    """A positive finite float (an int is fine; a bool is not: True would silently mean 1.0)."""
    if type(eps) is float and 0.0 < eps < math.inf:  # the usual case; NaN fails the comparison
        return

    def message() -> str:
        return f"{op}: `eps` expected a positive float (finite, not a bool), got {eps!r}"

    if isinstance(eps, (torch.SymFloat, torch.SymInt)):  # traced: deferred assertions (see "Numbers" above)
        check_size(eps > 0, message)
        check_size(eps < math.inf, message)
    elif isinstance(eps, bool) or not isinstance(eps, (float, int)) or not 0 < eps < math.inf:
        raise ValueError(message())


# Fake impls (torch.compile, FakeTensorMode) validate too, with the same messages. A size there may be
# symbolic: comparing it in Python would specialize the graph on it (a guard), so size conditions go
# through torch._check_value, which asserts a symbolic condition and raises ValueError on a false one.
def check_size(ok, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` unless ``ok``; a symbolic ``ok`` (tracing) becomes an assertion."""
    if ok is True:  # plain bools: every eager call, and static sizes when tracing
        return
    torch._check_value(ok, message)


def check_shape_fake(op: str, name: str, t: torch.Tensor, shape: Sequence, dims: str) -> None:
    """:func:`check_tensor`'s shape test, one :func:`check_size` per dim (``t`` has ``len(shape)`` dims)."""
    for got, want in zip(t.shape, shape):
        check_size(got == want, lambda: f"{op}: `{name}` expected shape {tuple(shape)} {dims}, got {tuple(t.shape)}")


def check_tensor_fake(op: str, name: str, t, shape: Sequence, like: torch.Tensor, dims: str) -> None:
    """:func:`check_tensor` with ``shape`` and ``like`` for fake impls, same checks and messages in the same
    order; only the sizes go through :func:`check_shape_fake`."""
    if not isinstance(t, torch.Tensor) or t.dim() != len(shape):
        check_tensor_steps(op, name, t, None, shape, like, dims, True)  # raises: type or rank, as eagerly
    check_shape_fake(op, name, t, shape, dims)
    check_tensor(op, name, t, like=like, dims=dims)


def check_param_fake(op: str, name: str, t, shape: tuple, x: torch.Tensor, dims: str) -> None:
    """:func:`check_param` for fake impls: :func:`check_tensor_fake` then :func:`check_dtype`."""
    check_tensor_fake(op, name, t, shape, x, dims)
    check_dtype(op, name, t, x)


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: `activation` expected one of {ACTIVATIONS}, got {activation!r}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels honour the outer strides but need unit stride along the reduced (last) dim."""
    return t if t.stride()[-1] == 1 else t.contiguous()  # stride()[-1]: stride(-1) parses its argument, 1.5x slower


# --------------------------------------------------------------------------------------------------
# Triton launches: what the host pays per call, and what is cached.
#
# Our launchers' own host time, with Triton's launch stubbed out, was measured on the 2-core CPU dev machine
# (benchmarks/RESULTS.md §5); what cut it: triton.next_power_of_2 is a ConstexprFunction with a costly host
# call, so launch configurations are computed once per size (row_launch_config); `t.stride()` once per tensor
# beats `t.stride(i)` per dim (argument parsing); outputs come from
# `torch.empty_like(x, memory_format=torch.contiguous_format)`, cheaper than `torch.empty(shape, dtype=, device=)`.
#
# The launch itself (its host time on the H100 machine: benchmarks/RESULTS.md §2) is triton
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


@triton.jit
def row_stats(x, mask, D, eps):
    """LayerNorm statistics of one float32 row held in registers: the centred row (0 where ``mask`` is off)
    and 1 / sqrt(var + eps), two passes over the registers (no E[x^2] - E[x]^2 cancellation)."""
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    return xc, rstd


# --------------------------------------------------------------------------------------------------
# Dispatch by capability (xformers-style). Each implementation declares what it runs (devices, dtypes, the
# largest D, i.e. x's last dim) plus ``reasons`` for the conditions only known at run time (Triton installed,
# _C built, TRITON_INTERPRET); ``why_not`` joins them. One Dispatch per op serves the call (``select``), the
# tests and ``eekernels info`` (``explain``). No kernel needs aligned pointers: the CUDA kernels use 16-byte
# vector I/O only where every pointer and stride allows it and fall back to scalar I/O otherwise, and the
# launchers copy an input whose last dim is not contiguous (last_dim_contiguous).
# --------------------------------------------------------------------------------------------------
# Triton keeps a row in one block of at most 2**20 elements (TRITON_MAX_TENSOR_NUMEL).
TRITON_MAX_ROW = 1 << 20


def triton_reasons(x: torch.Tensor, *_) -> list[str]:
    if not HAS_TRITON:
        return [f"triton: {NOT_INSTALLED}"]
    if x.is_cuda or (x.device.type == "cpu" and _backend.triton_interpret()):
        return []
    return [f"triton: needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got device {x.device}"]


def cuda_reasons(x: torch.Tensor, *_) -> list[str]:
    return [] if _ext.available() else [f"cuda: {_ext.BUILD_HINT}"]


def no_reasons(*_) -> list[str]:
    """Nothing known only at run time stops it."""
    return []


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``fn`` runs it; the rest says which inputs it takes.

    ``devices``: the device types of x it runs on (None: any); ``dtypes``: the dtypes of x it computes in;
    ``max_d``: the largest last dim of x (None: no limit); ``reasons(x, *args)``: why it cannot run now for
    reasons the declarations cannot state (empty: it can).
    """

    name: str
    fn: Callable
    reasons: Callable[..., list[str]] = no_reasons
    dtypes: frozenset = _CHECKED_FLOATS
    devices: frozenset | None = None
    max_d: int | None = None

    def why_not(self, x: torch.Tensor, *args) -> list[str]:
        """Every reason this implementation cannot run these inputs (empty: it can)."""
        why = []
        if x.dtype not in self.dtypes:  # float64 on the kernels: they would compute it in float32
            why.append(f"{self.name}: {str(x.dtype).removeprefix('torch.')} is not supported by {self.name}")
        if self.devices is not None and x.device.type not in self.devices:
            kinds = " or ".join(sorted(d.upper() for d in self.devices))
            why.append(f"{self.name}: needs {kinds} tensors, got device {x.device}")
        if self.max_d is not None and x.dim() > 0 and x.shape[-1] > self.max_d:
            why.append(f"{self.name}: D (x's last dim) at most {self.max_d}, got {x.shape[-1]}")
        return why + self.reasons(x, *args)


# Kernel implementations (declared with these): torch's own dtypes on the Triton and _C kernels.
TRITON = dict(reasons=triton_reasons, dtypes=KERNEL_DTYPES, devices=frozenset({"cuda", "cpu"}))  # cpu: interpreter
CUDA = dict(reasons=cuda_reasons, dtypes=KERNEL_DTYPES, devices=frozenset({"cuda"}))


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
        self.auto_order = tuple(auto_order)
        self.auto = tuple(self.by_name[name] for name in auto_order if name in self.by_name)

    def select(self, x: torch.Tensor, *args, backend: str | None = None) -> Impl:
        """Pick the implementation for this call (``args``: the tensors after x, for the reasons).

        ``backend``: the one in force (``eekernels.backend``, ``EEKERNELS_BACKEND``) unless given. An explicit
        backend that does not take x's dtype raises ``ValueError`` naming it (a wrong input for that backend);
        one that cannot run for other reasons (device, size, build) raises ``BackendUnavailable``.
        """
        name = _backend.current_backend() if backend is None else backend
        if name == "auto":
            if not x.is_cuda:
                return self.torch
            for impl in self.auto:
                if not impl.why_not(x, *args):
                    return impl
            return self.torch  # e.g. float64: explain() says why
        impl = self.by_name.get(name)
        if impl is not None:
            why = impl.why_not(x, *args)
            if not why:
                return impl
            if x.dtype not in impl.dtypes:
                raise ValueError(f"{self.op}: `x` has dtype {x.dtype}, which backend {name!r} does not support "
                                 f"(it takes {_dtype_names(impl.dtypes)}); backend 'torch' (or 'auto', which "
                                 f"picks it) computes {x.dtype} in {x.dtype}")
        lines = [f"{self.op}: backend {name!r} cannot run these inputs"]
        for other, why in self.explain(x, *args).items():
            lines.append(f"  {other}: " + ("supported" if not why else "; ".join(why)))
        if impl is None:
            lines.append(f"  {name}: no implementation of this op")
        raise BackendUnavailable("\n".join(lines))

    def explain(self, x: torch.Tensor, *args) -> dict[str, list[str]]:
        """Each implementation's reasons against these inputs, by name (empty: it can run them)."""
        return {impl.name: impl.why_not(x, *args) for impl in self.impls}


_SCALAR_TYPES = (int, float, torch.SymInt, torch.SymFloat)  # what a schema Scalar passes on as given (bool: an int)


def needs_op_path(*tensors, numbers: tuple = (), strings: tuple = ()) -> bool:
    """Route through ``torch.ops.eekernels.*`` (autograd + fake impls) when tracing or differentiating.

    ``tensors`` are the op's tensor arguments (not yet validated), None for absent optional ones; ``numbers``
    its Scalar arguments (leave out an optional one that is None); ``strings`` its ``str?`` ones. Both paths
    validate once: the eager one in the op's ``_run``, the op path in the registered impl (or fake impl). An
    argument of a type the op's schema refuses (a list for a tensor, a string or None for a number) takes the
    eager path, whose validation raises the op's ValueError naming it; the dispatcher would raise a
    RuntimeError instead.

    Eager inference calls the implementation directly: a registered-op call costs more host time than the
    kernel itself at small sizes (benchmarks/RESULTS.md §9).
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and not torch.is_grad_enabled():
        return False
    grad = compiling
    try:
        for t in tensors:  # a plain loop: any() over a generator costs more than the checks
            if t is not None and t.requires_grad:
                grad = True
    except AttributeError:  # not a tensor
        return False
    if grad:
        for n in numbers:
            if not isinstance(n, _SCALAR_TYPES):
                return False
        for s in strings:
            if s is not None and not isinstance(s, str):
                return False
    return grad


def reference_autograd(op, reference: Callable) -> None:
    """Register autograd for ``op`` by recomputing ``reference`` (same argument order) under autograd in backward.

    Tensor arguments get gradients, wherever they sit in the schema; the rest (None, ints, strings, floats)
    are passed through as given. Backward costs one reference forward, which is fine for fine-tuning and
    keeps a single spec.
    """

    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
        ctx.others = [None if is_t else t for t, is_t in zip(inputs, ctx.is_tensor)]

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        with torch.enable_grad():
            args = [next(saved).detach().requires_grad_(ctx.needs_input_grad[i]) if is_t else ctx.others[i]
                    for i, is_t in enumerate(ctx.is_tensor)]
            wanted = [a for a, is_t in zip(args, ctx.is_tensor) if is_t and a.requires_grad]
            out = reference(*args)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return tuple(next(got) if is_t and a.requires_grad else None for a, is_t in zip(args, ctx.is_tensor))

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
