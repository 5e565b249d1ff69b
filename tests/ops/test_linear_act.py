"""linear_act against its float64 reference on every backend available here.

GEMM sizes stay small and odd (K, M <= 200): the Triton interpreter runs each tile program in Python.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import linear_act
from eekernels.ops.linear_act import reference
from tests.utils import DTYPES, assert_close, backends_here, randn

# The interpreter evaluates sigmoid(2u) = 1 / (1 + exp(-2u)) in numpy, which warns when exp overflows to
# inf for very negative u; the result (0) is exact, as on the GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTIVATIONS = [None, "gelu", "gelu_tanh", "silu"]
# (B, N, K, M): N in {1, 257}, B in {1, 3}, odd K and M that leave partial tiles in every dim.
SHAPES = [(1, 1, 72, 37), (3, 257, 72, 129), (1, 257, 151, 200), (3, 1, 199, 65)]


def _ref64(x, w, b, act):
    return reference(x.double(), w.double(), None if b is None else b.double(), act)


def _inputs(B, N, K, M, dtype):
    # weight ~ K^-1/2 as at init, so outputs are O(1) and the activations' curved regions are exercised.
    x = randn(B, N, K, dtype=dtype, offset=0.2)
    return x, randn(M, K, dtype=dtype, scale=K ** -0.5), randn(M, dtype=dtype, scale=0.5)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(backend, dtype, shape, activation):
    x, w, b = _inputs(*shape, dtype)
    with eekernels.backend(backend):
        out = linear_act(x, w, b, activation)
    assert_close(out, _ref64(x, w, b, activation), dtype, baseline=reference(x, w, b, activation))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias_and_float32_bias(backend, dtype):
    x, w, b = _inputs(3, 5, 72, 37, dtype)
    with eekernels.backend(backend):
        out = linear_act(x, w, None, "silu")
        out32 = linear_act(x, w, b.float(), "gelu")
    assert_close(out, _ref64(x, w, None, "silu"), dtype, baseline=reference(x, w, None, "silu"))
    assert_close(out32, _ref64(x, w, b.float(), "gelu"), dtype)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 5)])
def test_any_leading_dims(backend, lead):
    x = randn(*lead, 72)
    w, b = randn(37, 72, scale=72 ** -0.5), randn(37)
    with eekernels.backend(backend):
        out = linear_act(x, w, b, "gelu_tanh")
    assert out.shape == (*lead, 37)
    assert_close(out, _ref64(x, w, b, "gelu_tanh"), torch.float32)


@pytest.mark.parametrize("backend", backends_here())
def test_non_contiguous_inputs_and_no_mutation(backend):
    x_t = randn(3, 72, 9).transpose(1, 2)  # (3, 9, 72), last-dim stride 9: copied
    x_rows = randn(3, 18, 80)[:, ::2, :72]  # (3, 9, 72), strided rows: a view
    w = randn(72, 37, scale=72 ** -0.5).t()  # (37, 72) with strides (1, 37): honoured by the kernel
    b = randn(74)[::2]
    for x in (x_t, x_rows):
        before = [t.clone() for t in (x, w, b)]
        with eekernels.backend(backend):
            out = linear_act(x, w, b, "gelu")
        assert out.is_contiguous(), "the output must be contiguous, as the fake impl says"
        assert_close(out, _ref64(x, w, b, "gelu"), torch.float32)
        for t, bef in zip((x, w, b), before):
            assert torch.equal(t, bef), "an input was modified"


def test_opcheck():
    x, w, b = _inputs(2, 3, 72, 37, torch.float32)
    op = torch.ops.eekernels.linear_act.default
    torch.library.opcheck(op, (x, w.requires_grad_(), b, "gelu_tanh"))
    torch.library.opcheck(op, (x, w, None, None))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_reference(activation):
    x, w, b = (t.requires_grad_() for t in _inputs(2, 5, 72, 37, torch.float64))
    out = linear_act(x, w, b, activation)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(reference(x, w, b, activation), (x, w, b), grad)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, w, b, a: (x[0, 0, 0], w, b, a), r"`x` expected at least 1 dim"),
        (lambda x, w, b, a: (x, w[0], b, a), r"`weight` expected 2 dims"),
        (lambda x, w, b, a: (x, w[:, :-1], b, a), r"`weight` expected shape \(M, 72\)"),
        (lambda x, w, b, a: (x, w.float(), b, a), r"`weight` expected dtype torch.bfloat16"),
        (lambda x, w, b, a: (x, w, b[:-1], a), r"`bias` expected shape \(37,\)"),
        (lambda x, w, b, a: (x, w, b.half(), a), r"`bias` expected dtype torch.bfloat16"),
        (lambda x, w, b, a: (x, w.to("meta"), b, a), r"`weight` expected device"),
        (lambda x, w, b, a: (x, w, b.to("meta"), a), r"`bias` expected device"),
        (lambda x, w, b, a: (x, w, b, "relu"), r"`activation` expected one of"),
        (lambda x, w, b, a: (x.long(), w, b, a), r"`x` expected a floating dtype"),
        (lambda x, w, b, a: (x, w.tolist(), b, a), r"`weight` expected a torch.Tensor"),
    ],
)
def test_bad_inputs(change, match):
    x, w, b = _inputs(3, 4, 72, 37, torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        linear_act(*change(x, w, b, "gelu"))


@settings(max_examples=25, deadline=None)
@given(
    R=st.integers(1, 70), K=st.integers(1, 130), M=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(), has_bias=st.booleans(), activation=st.sampled_from(ACTIVATIONS),
    backend=st.sampled_from(backends_here()),
)
def test_property_random_shapes(R, K, M, dtype, transpose, has_bias, activation, backend):
    x = randn(K, R, dtype=dtype).t() if transpose else randn(R, K, dtype=dtype)
    w = randn(M, K, dtype=dtype, scale=K ** -0.5)
    b = randn(M, dtype=dtype) if has_bias else None
    with eekernels.backend(backend):
        out = linear_act(x, w, b, activation)
    assert_close(out, _ref64(x, w, b, activation), dtype, baseline=reference(x, w, b, activation))
