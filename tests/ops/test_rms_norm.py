"""rms_norm against a float64 formula written out here on every backend available (Triton under the
interpreter), and against diffusers' RMSNorm."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import rms_norm
from eekernels.ops.rms_norm import reference
from tests.utils import DTYPES, assert_close, backends_here, randn

SHAPES = [(1, 1, 72), (3, 67, 72), (1, 7, 1151), (2, 3, 4, 24)]


def _ref64(x, w, eps=1e-6):
    """Float64, written out here, independent of the op's reference."""
    x = x.double()
    h = x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return h if w is None else h * w.double()


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(backend, dtype, shape, affine):
    x = randn(*shape, dtype=dtype, scale=2.0, offset=0.5)
    w = randn(shape[-1], dtype=dtype, offset=1.0) if affine else None
    with eekernels.backend(backend):
        out = rms_norm(x, w)
    assert_close(out, _ref64(x, w), dtype, baseline=reference(x, w))


@pytest.mark.parametrize("backend", backends_here())
def test_matches_diffusers_rmsnorm(backend):
    pytest.importorskip("diffusers", reason="diffusers is not installed (the cross-check against it needs it)")
    from diffusers.models.normalization import RMSNorm

    x = randn(3, 11, 40, offset=0.3)
    norm = RMSNorm(40, eps=1e-6, elementwise_affine=True).to(x.device)
    with torch.no_grad():
        norm.weight.copy_(randn(40, offset=1.0))
        want = norm(x)
    with eekernels.backend(backend):
        got = rms_norm(x, norm.weight.detach())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_path_computes_float64_in_float64():
    x, w = randn(2, 7, 72, dtype=torch.float64, offset=0.5), randn(72, dtype=torch.float64)
    with eekernels.backend("torch"):
        torch.testing.assert_close(rms_norm(x, w), _ref64(x, w), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", backends_here())
def test_strided_rows_float32_weight_and_no_mutation(backend):
    x = randn(3, 18, 80, dtype=torch.bfloat16)[:, ::2, :72]  # strided rows, unit last-dim stride: a view
    xt = randn(3, 72, 9).transpose(1, 2)  # last-dim stride 9: copied
    for xi, w in ((x, randn(72)), (xt, randn(144)[::2])):
        before = [t.clone() for t in (xi, w)]
        with eekernels.backend(backend):
            out = rms_norm(xi, w)
        assert out.is_contiguous()
        assert_close(out, _ref64(xi, w), xi.dtype)
        assert all(torch.equal(t, b) for t, b in zip((xi, w), before)), "an input was modified"


def test_opcheck_and_gradients():
    x, w = randn(2, 3, 72), randn(72)
    torch.library.opcheck(torch.ops.eekernels.rms_norm.default, (x, w.requires_grad_(), 1e-6))
    torch.library.opcheck(torch.ops.eekernels.rms_norm.default, (x, None, 1e-6))
    x64, w64 = randn(2, 5, 72, dtype=torch.float64).requires_grad_(), randn(72, dtype=torch.float64).requires_grad_()
    out = rms_norm(x64, w64)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x64, w64), g)
    want = torch.autograd.grad(_ref64(x64, w64), (x64, w64), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change, match", [
    (lambda x, w: (x[0, 0, 0], w), r"`x` expected at least 1 dim"),
    (lambda x, w: (x, w[:-1]), r"`weight` expected shape \(72,\)"),
    (lambda x, w: (x, w.half()), r"`weight` expected dtype torch.bfloat16"),
    (lambda x, w: (x, w.to("meta")), r"`weight` expected device"),
    (lambda x, w: (x.long(), w), r"`x` expected a floating dtype"),
    (lambda x, w: (x.tolist(), w), r"`x` expected a torch.Tensor"),
])
def test_bad_inputs(change, match):
    x, w = randn(3, 4, 72, dtype=torch.bfloat16), randn(72, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        rms_norm(*change(x, w))
    with pytest.raises(ValueError, match="`eps` expected a positive float"):
        rms_norm(x, w, eps=0.0)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 9), D=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       affine=st.booleans(), backend=st.sampled_from(backends_here()))
def test_property_random_shapes(B, N, D, dtype, affine, backend):
    x = randn(B, N, D, dtype=dtype)
    w = randn(D, dtype=dtype) if affine else None
    with eekernels.backend(backend):
        out = rms_norm(x, w)
    assert_close(out, _ref64(x, w), dtype, baseline=reference(x, w))


@pytest.mark.parametrize("backend", backends_here())
def test_fullgraph_compile_matches_eager(backend):
    """torch.compile(fullgraph=True, backend="aot_eager") traces the fake impl, forward and backward."""
    torch._dynamo.reset()
    x, w = randn(2, 5, 24).requires_grad_(), randn(24, offset=1.0).requires_grad_()
    fn = lambda x, w: rms_norm(x, w) * 2 + rms_norm(x)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with eekernels.backend(backend):
        got, want = compiled(x, w), fn(x, w)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g)):
        torch.testing.assert_close(a, b)
