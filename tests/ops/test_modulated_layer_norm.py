"""modulated_layer_norm against its float64 reference on every backend available here."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import modulated_layer_norm
from eekernels.ops.modulated_layer_norm import reference
from tests.utils import DTYPES, assert_close, backends_here, randn

SHAPES = [(1, 1, 72), (3, 257, 72), (1, 257, 1151), (3, 1, 1151)]


def _inputs(B, N, D, dtype):
    # Offset and scale so that the mean-subtraction and (1 + scale) paths are both exercised.
    x = randn(B, N, D, dtype=dtype, scale=2.0, offset=0.5)
    return x, randn(B, D, dtype=dtype), randn(B, D, dtype=dtype, scale=0.5)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    x, shift, scale = _inputs(*shape, dtype)
    ref = reference(x.double(), shift.double(), scale.double())
    with eekernels.backend(backend):
        out = modulated_layer_norm(x, shift, scale)
    assert_close(out, ref, dtype, baseline=reference(x, shift, scale))


@pytest.mark.parametrize("backend", backends_here())
def test_float32_params_with_half_input(backend):
    x = randn(3, 5, 72, dtype=torch.bfloat16)
    shift, scale = randn(3, 72), randn(3, 72)
    with eekernels.backend(backend):
        out = modulated_layer_norm(x, shift, scale)
    assert_close(out, reference(x.double(), shift.double(), scale.double()), torch.bfloat16)


@pytest.mark.parametrize("backend", backends_here())
def test_non_contiguous_inputs_and_no_mutation(backend):
    base = randn(3, 72, 9, dtype=torch.float32)
    x = base.transpose(1, 2)  # (3, 9, 72), last-dim stride 9
    shift = randn(72, 3).t()  # (3, 72), non-contiguous
    scale = randn(3, 144)[:, ::2]
    before = [t.clone() for t in (x, shift, scale)]
    with eekernels.backend(backend):
        out = modulated_layer_norm(x, shift, scale)
    assert_close(out, reference(x.double(), shift.double(), scale.double()), torch.float32)
    for t, b in zip((x, shift, scale), before):
        assert torch.equal(t, b), "an input was modified"


def test_opcheck():
    x, shift, scale = _inputs(2, 3, 72, torch.float32)
    torch.library.opcheck(torch.ops.eekernels.modulated_layer_norm.default, (x, shift, scale.requires_grad_(), 1e-6))


def test_gradients_match_reference():
    x, shift, scale = (t.requires_grad_() for t in _inputs(2, 5, 72, torch.float64))
    out = torch.ops.eekernels.modulated_layer_norm(x, shift, scale, 1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, shift, scale), grad)
    want = torch.autograd.grad(reference(x, shift, scale), (x, shift, scale), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, s, c: (x[0], s, c), r"`x` expected 3 dims"),
        (lambda x, s, c: (x, s[:, :-1], c), r"`shift` expected shape \(3, 72\)"),
        (lambda x, s, c: (x, s, c[:2]), r"`scale` expected shape \(3, 72\)"),
        (lambda x, s, c: (x, s.half(), c), r"`shift` expected dtype torch.bfloat16"),
        (lambda x, s, c: (x, s, c.meta if hasattr(c, "meta") else c.to("meta")), r"`scale` expected device"),
        (lambda x, s, c: (x.long(), s, c), r"`x` expected a floating dtype"),
        (lambda x, s, c: (x, [1.0], c), r"`shift` expected a torch.Tensor"),
    ],
)
def test_bad_inputs(change, match):
    x, shift, scale = _inputs(3, 4, 72, torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        modulated_layer_norm(*change(x, shift, scale))


def test_bad_eps():
    x, shift, scale = _inputs(1, 2, 72, torch.float32)
    with pytest.raises(ValueError, match="`eps` expected a positive float"):
        modulated_layer_norm(x, shift, scale, eps=0.0)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), N=st.integers(1, 9), D=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES), transpose=st.booleans(), backend=st.sampled_from(backends_here()),
)
def test_property_random_shapes(B, N, D, dtype, transpose, backend):
    x = randn(B, D, N, dtype=dtype).transpose(1, 2) if transpose else randn(B, N, D, dtype=dtype)
    shift, scale = randn(B, D, dtype=dtype), randn(B, D, dtype=dtype)
    with eekernels.backend(backend):
        out = modulated_layer_norm(x, shift, scale)
    assert_close(out, reference(x.double(), shift.double(), scale.double()), dtype,
                 baseline=reference(x, shift, scale), ill_conditioned=True)
