"""layer_norm against its float64 reference on every backend available here."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import layer_norm
from eekernels.ops.layer_norm import reference
from tests.utils import DTYPES, assert_close, backends_here, randn

SHAPES = [(1, 1, 72), (3, 257, 72), (1, 257, 1151), (3, 1, 1151)]


def _ref64(x, w, b):
    return reference(x.double(), None if w is None else w.double(), None if b is None else b.double())


def _inputs(B, N, D, dtype):
    # Offset and scale so that mean subtraction and the affine are both exercised.
    return randn(B, N, D, dtype=dtype, scale=2.0, offset=0.5), randn(D, dtype=dtype, offset=1.0), randn(D, dtype=dtype)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    x, w, b = _inputs(*shape, dtype)
    with eekernels.backend(backend):
        out = layer_norm(x, w, b)
    assert_close(out, _ref64(x, w, b), dtype, baseline=reference(x, w, b))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 72), (1, 2, 1151)])
def test_no_affine(backend, dtype, shape):
    x, w, b = _inputs(*shape, dtype)
    w = b = None
    with eekernels.backend(backend):
        out = layer_norm(x, w, b)
    assert_close(out, _ref64(x, w, b), dtype, baseline=reference(x, w, b))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_weight_or_bias_alone_float32_params(backend, which):
    x, w, b = _inputs(3, 5, 72, torch.bfloat16)
    w, b = (w.float(), None) if which == "weight" else (None, b.float())
    with eekernels.backend(backend):
        out = layer_norm(x, w, b)
    assert_close(out, _ref64(x, w, b), torch.bfloat16)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("shape", [(72,), (5, 72), (2, 3, 4, 73)])
def test_any_rank_over_last_dim(backend, shape):
    x = randn(*shape, offset=0.5)
    w, b = randn(shape[-1]), randn(shape[-1])
    with eekernels.backend(backend):
        out = layer_norm(x, w, b)
    assert_close(out, _ref64(x, w, b), torch.float32)


@pytest.mark.parametrize("backend", backends_here())
def test_non_contiguous_inputs_and_no_mutation(backend):
    x = randn(3, 72, 9).transpose(1, 2)  # (3, 9, 72), last-dim stride 9: copied
    x_rows = randn(3, 18, 80)[:, ::2, :72]  # (3, 9, 72), unit last-dim stride, strided rows: a view
    w, b = randn(144)[::2], randn(72)
    for xi in (x, x_rows):
        before = [t.clone() for t in (xi, w, b)]
        with eekernels.backend(backend):
            out = layer_norm(xi, w, b)
        assert out.is_contiguous(), "the output must be contiguous, as the fake impl says"
        assert_close(out, _ref64(xi, w, b), torch.float32)
        for t, bef in zip((xi, w, b), before):
            assert torch.equal(t, bef), "an input was modified"


def test_opcheck():
    x, w, b = _inputs(2, 3, 72, torch.float32)
    torch.library.opcheck(torch.ops.eekernels.layer_norm.default, (x, w.requires_grad_(), b, 1e-6))
    torch.library.opcheck(torch.ops.eekernels.layer_norm.default, (x, None, None, 1e-6))


def test_gradients_match_reference():
    x, w, b = (t.requires_grad_() for t in _inputs(2, 5, 72, torch.float64))
    out = layer_norm(x, w, b)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(reference(x, w, b), (x, w, b), grad)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, w, b: (x[0, 0, 0], w, b), r"`x` expected at least 1 dim"),
        (lambda x, w, b: (x, w[:-1], b), r"`weight` expected shape \(72,\)"),
        (lambda x, w, b: (x, w, b[None]), r"`bias` expected shape \(72,\)"),
        (lambda x, w, b: (x, w.half(), b), r"`weight` expected dtype torch.bfloat16"),
        (lambda x, w, b: (x, w, b.to("meta")), r"`bias` expected device"),
        (lambda x, w, b: (x.long(), w, b), r"`x` expected a floating dtype"),
        (lambda x, w, b: (x.tolist(), w, b), r"`x` expected a torch.Tensor"),
    ],
)
def test_bad_inputs(change, match):
    x, w, b = _inputs(3, 4, 72, torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        layer_norm(*change(x, w, b))


def test_bad_eps():
    x, w, b = _inputs(1, 2, 72, torch.float32)
    with pytest.raises(ValueError, match="`eps` expected a positive float"):
        layer_norm(x, w, b, eps=-1e-6)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), N=st.integers(1, 9), D=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(), affine=st.booleans(), backend=st.sampled_from(backends_here()),
)
def test_property_random_shapes(B, N, D, dtype, transpose, affine, backend):
    x = randn(B, D, N, dtype=dtype).transpose(1, 2) if transpose else randn(B, N, D, dtype=dtype)
    w, b = (randn(D, dtype=dtype), randn(D, dtype=dtype)) if affine else (None, None)
    with eekernels.backend(backend):
        out = layer_norm(x, w, b)
    assert_close(out, _ref64(x, w, b), dtype, baseline=reference(x, w, b), ill_conditioned=True)
