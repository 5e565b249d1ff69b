"""The CUDA C++ kernels of ``eekernels._C`` against their float64 references (GPU only).

The kernels are called directly (pointers, sizes, strides, stream) so that outputs can be poisoned with
NaN beforehand and every layout the contract allows (padded rows, transposed batches, misaligned
views that force the scalar fallback, fp32 parameters with half inputs) is exercised; then once more
through the public ops under ``eekernels.backend("cuda")`` and inside a captured CUDA graph.
"""
import pytest
import torch

import eekernels
from eekernels import _ext
from tests.utils import CUDA, DTYPES, assert_close, randn

pytestmark = [
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; none is visible on this machine"),
    pytest.mark.skipif(CUDA and not _ext.available(), reason=f"{_ext.unavailable_reason()}"),
]

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTS = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
# D: 72 (9 16-byte vectors of bf16), 1151 (odd: scalar fallback), 1152 (DiT-XL); N 1 and 257; B 1 and 3.
ROW_SHAPES = [(B, N, D) for B in (1, 3) for N in (1, 257) for D in (72, 1151, 1152)]
LAYOUTS = ["contiguous", "padded_rows", "transposed_batch", "misaligned"]


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def _rows(B, N, D, dtype, layout, offset=0.5):
    """x (B, N, D) on the GPU in the given memory layout (unit stride along D in every case)."""
    if layout == "contiguous":
        return randn(B, N, D, dtype=dtype, scale=2.0, offset=offset)
    if layout == "padded_rows":  # stride_xn = D + 8
        return randn(B, N, D + 8, dtype=dtype, scale=2.0, offset=offset)[..., :D]
    if layout == "transposed_batch":  # stride_xb = D, stride_xn = B * D
        return randn(N, B, D, dtype=dtype, scale=2.0, offset=offset).transpose(0, 1)
    if layout == "misaligned":  # 2-4 bytes off a 16-byte boundary: the scalar fallback
        return randn(B, N, D + 1, dtype=dtype, scale=2.0, offset=offset)[..., 1:]
    raise ValueError(layout)


def _params(B, D, dtype, param_dtype):
    pd = dtype if param_dtype == "same" else torch.float32
    return pd, (lambda *shape, **kw: randn(*shape, dtype=pd, **kw))


def _d(t):
    return None if t is None else t.double()


# --------------------------------------------------------------------------------------------------
# modulated_layer_norm
# --------------------------------------------------------------------------------------------------
def _mln_c(x, shift, scale, eps=1e-6):
    B, N, D = x.shape
    out = _poisoned((B, N, D), x.dtype)
    _ext.load().modulated_layer_norm(_ptr(x), _ptr(shift), _ptr(scale), _ptr(out), B, N, D, x.stride(0),
                                     x.stride(1), eps, CODES[x.dtype], CODES[shift.dtype], _stream())
    return out


@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_modulated_layer_norm(shape, dtype, param_dtype):
    from eekernels.ops.modulated_layer_norm import reference

    B, N, D = shape
    _, make = _params(B, D, dtype, param_dtype)
    x, shift, scale = _rows(B, N, D, dtype, "contiguous"), make(B, D), make(B, D, scale=0.5)
    out = _mln_c(x, shift, scale)
    assert_close(out, reference(x.double(), shift.double(), scale.double()), dtype,
                 baseline=reference(x, shift, scale))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [72, 1151, 1152])
def test_modulated_layer_norm_layouts(D, dtype, layout):
    from eekernels.ops.modulated_layer_norm import reference

    x = _rows(3, 257, D, dtype, layout)
    shift, scale = randn(3, D, dtype=dtype), randn(3, D, dtype=dtype, scale=0.5)
    before = x.clone()
    out = _mln_c(x, shift, scale)
    assert_close(out, reference(x.double(), shift.double(), scale.double()), dtype,
                 baseline=reference(x, shift, scale))
    assert torch.equal(x, before), "x was modified"


@pytest.mark.parametrize("D", [40000, 40001])  # past 512 threads x 8 vectors: the streaming kernel
def test_modulated_layer_norm_long_rows(D):
    from eekernels.ops.modulated_layer_norm import reference

    x = randn(2, 3, D, scale=2.0, offset=30.0)  # a large mean: the shifted sums must not cancel
    shift, scale = randn(2, D), randn(2, D, scale=0.5)
    out = _mln_c(x, shift, scale)
    assert_close(out, reference(x.double(), shift.double(), scale.double()), torch.float32)


# --------------------------------------------------------------------------------------------------
# gated_residual_norm
# --------------------------------------------------------------------------------------------------
def _grn_c(x, y, gate, shift, scale, weight, bias, eps=1e-6):
    B, N, D = x.shape
    x_out, h = _poisoned((B, N, D), x.dtype), _poisoned((B, N, D), x.dtype)
    given = [t for t in (gate, shift, scale, weight, bias) if t is not None]
    pcode = CODES[given[0].dtype] if given else CODES[x.dtype]
    _ext.load().gated_residual_norm(
        _ptr(x), _ptr(y), _ptr(gate), _ptr(shift), _ptr(scale), _ptr(weight), _ptr(bias), _ptr(x_out), _ptr(h),
        B, N, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), eps, CODES[x.dtype], pcode, _stream())
    return x_out, h


def _grn_check(x, y, gate, shift, scale, weight, bias, dtype):
    from eekernels.ops.gated_residual_norm import reference

    x_out, h = _grn_c(x, y, gate, shift, scale, weight, bias)
    ref = reference(x.double(), y.double(), _d(gate), _d(shift), _d(scale), weight=_d(weight), bias=_d(bias))
    base = reference(x, y, gate, shift, scale, weight=weight, bias=bias)
    assert_close(x_out, ref[0], dtype, baseline=base[0], what="x_out")
    # h normalises x_out as stored (rounded to x's dtype): its reference starts from our x_out.
    zero = torch.zeros_like(x_out)
    ref_h = reference(x_out.double(), zero.double(), None, _d(shift), _d(scale), weight=_d(weight), bias=_d(bias))[1]
    base_h = reference(x_out, zero, None, shift, scale, weight=weight, bias=bias)[1]
    assert_close(h, ref_h, dtype, baseline=base_h, what="h")


MODES = {  # which of gate, shift/scale, weight, bias are given
    "dit": (True, True, False, False),
    "uvit": (False, False, True, True),
    "plain": (False, False, False, False),
    "gate_weight_only": (True, False, True, False),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_gated_residual_norm(shape, dtype, param_dtype, mode):
    B, N, D = shape
    has_gate, has_mod, has_w, has_b = MODES[mode]
    _, make = _params(B, D, dtype, param_dtype)
    x, y = _rows(B, N, D, dtype, "contiguous"), _rows(B, N, D, dtype, "contiguous", offset=0.0)
    gate = make(B, D) if has_gate else None
    shift, scale = (make(B, D), make(B, D, scale=0.5)) if has_mod else (None, None)
    weight = make(D, offset=1.0) if has_w else None
    bias = make(D) if has_b else None
    _grn_check(x, y, gate, shift, scale, weight, bias, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [72, 1151, 1152])
def test_gated_residual_norm_layouts(D, dtype, layout):
    x, y = _rows(3, 257, D, dtype, layout), _rows(3, 257, D, dtype, "padded_rows", offset=0.0)
    gate, shift, scale = randn(3, D, dtype=dtype), randn(3, D, dtype=dtype), randn(3, D, dtype=dtype, scale=0.5)
    before = (x.clone(), y.clone())
    _grn_check(x, y, gate, shift, scale, None, None, dtype)
    assert torch.equal(x, before[0]) and torch.equal(y, before[1]), "an input was modified"


@pytest.mark.parametrize("D", [40000, 40001])
def test_gated_residual_norm_long_rows(D):
    x, y = randn(2, 3, D, scale=2.0, offset=30.0), randn(2, 3, D)
    _grn_check(x, y, randn(2, D), randn(2, D), randn(2, D, scale=0.5), None, None, torch.float32)


# --------------------------------------------------------------------------------------------------
# group_norm_act
# --------------------------------------------------------------------------------------------------
def _gna_c(x, G, weight, bias, scale, shift, act, eps=1e-5):
    B, C, H, W = x.shape
    out = _poisoned((B, C, H, W), x.dtype)
    given = [t for t in (weight, bias, scale, shift) if t is not None]
    pcode = CODES[given[0].dtype] if given else CODES[x.dtype]
    _ext.load().group_norm_act(_ptr(x), _ptr(weight), _ptr(bias), _ptr(scale), _ptr(shift), _ptr(out), B, C, H * W,
                               G, x.stride(0), x.stride(1), eps, ACTS[act], CODES[x.dtype], pcode, _stream())
    return out


def _gna_check(x, G, weight, bias, scale, shift, act, dtype):
    from eekernels.ops.group_norm_act import reference

    out = _gna_c(x, G, weight, bias, scale, shift, act)
    ref = reference(x.double(), G, _d(weight), _d(bias), _d(scale), _d(shift), act)
    assert_close(out, ref, dtype, baseline=reference(x, G, weight, bias, scale, shift, act))


# (B, C, H, W, G): odd planes (scalar path), 1x1 planes, the ADM shape (vector path, 8 x 1024 per group),
# and 16 x 64 x 64 = 65536-element groups (the streaming kernel in every dtype).
GN_SHAPES = [(1, 8, 7, 9, 4), (3, 72, 7, 9, 8), (3, 72, 1, 1, 24), (3, 64, 32, 32, 32), (2, 32, 64, 64, 2)]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GN_SHAPES)
def test_group_norm_act(shape, dtype, param_dtype, act):
    B, C, H, W, G = shape
    _, make = _params(B, C, dtype, param_dtype)
    x = randn(B, C, H, W, dtype=dtype, scale=2.0, offset=0.5)
    _gna_check(x, G, make(C, offset=1.0), make(C), make(B, C, scale=0.5), make(B, C), act, dtype)


@pytest.mark.parametrize("given", ["none", "affine_only", "modulation_only"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_act_optional_params(dtype, given):
    B, C, H, W, G = 3, 64, 16, 16, 32
    x = randn(B, C, H, W, dtype=dtype, scale=2.0, offset=0.5)
    w, b = (randn(C, dtype=dtype, offset=1.0), randn(C, dtype=dtype)) if given == "affine_only" else (None, None)
    sc, sh = (randn(B, C, dtype=dtype, scale=0.5), randn(B, C, dtype=dtype)) if given == "modulation_only" else (None, None)
    _gna_check(x, G, w, b, sc, sh, "silu", dtype)


@pytest.mark.parametrize("layout", ["channel_slice", "batch_slice", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_act_layouts(dtype, layout):
    B, C, H, W, G = 3, 64, 16, 16, 16
    if layout == "channel_slice":  # stride_xc = 2 * HW
        x = randn(B, 2 * C, H, W, dtype=dtype, scale=2.0, offset=0.5)[:, ::2]
    elif layout == "batch_slice":  # stride_xb = 2 * C * HW
        x = randn(2 * B, C, H, W, dtype=dtype, scale=2.0, offset=0.5)[::2]
    else:  # planes one element off a 16-byte boundary: the scalar fallback
        x = randn(B * C * H * W + 1, dtype=dtype, scale=2.0, offset=0.5)[1:].view(B, C, H, W)
    before = x.clone()
    _gna_check(x, G, randn(C, dtype=dtype, offset=1.0), randn(C, dtype=dtype), None, None, "gelu", dtype)
    assert torch.equal(x, before), "x was modified"


# --------------------------------------------------------------------------------------------------
# Through the public ops, inside a CUDA graph, and on a side stream
# --------------------------------------------------------------------------------------------------
def test_public_ops_on_cuda_backend_match_direct_calls():
    from eekernels.ops import gated_residual_norm, group_norm_act, modulated_layer_norm

    x, y = randn(3, 257, 1152, dtype=torch.bfloat16), randn(3, 257, 1152, dtype=torch.bfloat16)
    gate, shift, scale = (randn(3, 1152, dtype=torch.bfloat16) for _ in range(3))
    xi = randn(3, 64, 16, 16, dtype=torch.bfloat16)
    w, b = randn(64, dtype=torch.bfloat16), randn(64, dtype=torch.bfloat16)
    with torch.no_grad(), eekernels.backend("cuda"):
        assert torch.equal(modulated_layer_norm(x, shift, scale), _mln_c(x, shift, scale))
        got = gated_residual_norm(x, y, gate, shift, scale)
        want = _grn_c(x, y, gate, shift, scale, None, None)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        got = group_norm_act(xi, 32, w, b, activation="silu")
        assert torch.equal(got, _gna_c(xi, 32, w, b, None, None, "silu"))


def test_graph_capture_and_side_stream():
    """The static CUDA runtime inside _C launches onto torch's streams, also while torch captures."""
    x = randn(4, 33, 1152, dtype=torch.bfloat16)
    shift, scale = randn(4, 1152, dtype=torch.bfloat16), randn(4, 1152, dtype=torch.bfloat16)
    out = _poisoned(x.shape, x.dtype)

    def call():
        _ext.load().modulated_layer_norm(_ptr(x), _ptr(shift), _ptr(scale), _ptr(out), 4, 33, 1152, x.stride(0),
                                         x.stride(1), 1e-6, 2, 2, _stream())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up on a side stream, as graph capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    x.copy_(randn(4, 33, 1152, dtype=torch.bfloat16, offset=1.0))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    from eekernels.ops.modulated_layer_norm import reference

    assert_close(out, reference(x.double(), shift.double(), scale.double()), torch.bfloat16)
