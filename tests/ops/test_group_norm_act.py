"""group_norm_act against its float64 reference on every backend available here."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import eekernels
from eekernels.ops import group_norm_act
from eekernels.ops.group_norm_act import reference
from tests.utils import DTYPES, assert_close, backends_here, randn

# The interpreter evaluates sigmoid(2u) = 1 / (1 + exp(-2u)) in numpy, which warns when exp overflows to
# inf for very negative u; the result (0) is exact, as on the GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTIVATIONS = [None, "gelu", "gelu_tanh", "silu"]
# (B, C, H, W, G): odd planes (7x9, 1x1), 1 to 72 groups, and groups larger than one 4096-element chunk
# of the Triton kernel (72 x 63 = 4536, 8 x 45 x 47 = 16920), so the chunk merge is exercised.
SHAPES = [(1, 8, 7, 9, 4), (3, 72, 7, 9, 8), (3, 72, 1, 1, 24), (3, 72, 7, 9, 1), (1, 8, 45, 47, 1)]


def _d(t):
    return None if t is None else t.double()


def _inputs(B, C, H, W, dtype):
    x = randn(B, C, H, W, dtype=dtype, scale=2.0, offset=0.5)
    weight, bias = randn(C, dtype=dtype, offset=1.0), randn(C, dtype=dtype)
    scale, shift = randn(B, C, dtype=dtype, scale=0.5), randn(B, C, dtype=dtype)
    return x, weight, bias, scale, shift


def _ref64(x, G, weight, bias, scale, shift, act):
    return reference(x.double(), G, _d(weight), _d(bias), _d(scale), _d(shift), act)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    *dims, G = shape
    x, weight, bias, scale, shift = _inputs(*dims, dtype)
    with eekernels.backend(backend):
        out = group_norm_act(x, G, weight, bias, scale, shift, "silu")
    assert_close(out, _ref64(x, G, weight, bias, scale, shift, "silu"), dtype,
                 baseline=reference(x, G, weight, bias, scale, shift, "silu"))


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("params", ["none", "affine", "modulation"])
def test_activations_and_parameter_sets(backend, dtype, activation, params):
    x, weight, bias, scale, shift = _inputs(3, 72, 7, 9, dtype)
    if params != "modulation":
        scale = shift = None
    if params == "none":
        weight = bias = None
    with eekernels.backend(backend):
        out = group_norm_act(x, 8, weight, bias, scale, shift, activation)
    assert_close(out, _ref64(x, 8, weight, bias, scale, shift, activation), dtype,
                 baseline=reference(x, 8, weight, bias, scale, shift, activation))


@pytest.mark.parametrize("backend", backends_here())
def test_float32_params_with_half_input(backend):
    x, weight, bias, scale, shift = _inputs(3, 8, 7, 9, torch.bfloat16)
    args = (x, 4, weight.float(), bias, scale.float(), shift, "gelu")
    with eekernels.backend(backend):
        out = group_norm_act(*args)
    assert_close(out, _ref64(*args), torch.bfloat16)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_groups(backend, dtype):
    """C == G and H = W = 1: every group is one element, so x - mean = 0 and h is the bias alone.

    Variance 0 leaves rstd = eps^-1/2 = 316: torch's CPU kernel, computing x * rstd - mean * rstd, keeps
    only ~316 float32 ulps of h, hence atol 1e-4 for float32 here; half dtypes round far coarser anyway.
    """
    x, weight, bias, scale, shift = _inputs(3, 8, 1, 1, dtype)
    args = (x, 8, weight, bias, scale, shift, "gelu")
    with eekernels.backend(backend):
        out = group_norm_act(*args)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), _ref64(*args), atol=1e-4, rtol=1e-5)
    else:
        assert_close(out, _ref64(*args), dtype)


@pytest.mark.parametrize("backend", backends_here())
def test_large_mean_is_stable(backend):
    """A mean 200x the spread. float32 holds the mean to ulp(200) / 2 = 7.6e-6, so any float32 kernel is off
    by ~1e-5 here; statistics by sum and sum of squares would be off by ~1e-3 (E[x^2] = 4e4 to 6e-8 relative)."""
    x = randn(2, 8, 33, 37, offset=200.0)
    with eekernels.backend(backend):
        out = group_norm_act(x, 2, activation=None)
    torch.testing.assert_close(out.double(), _ref64(x, 2, None, None, None, None, None), atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend", backends_here())
def test_non_contiguous_inputs_and_no_mutation(backend):
    weight, bias = randn(144)[::2], randn(72)
    scale, shift = randn(72, 3).t(), randn(3, 144)[:, ::2]
    inputs = [
        randn(3, 72, 7, 9).to(memory_format=torch.channels_last),  # planes not contiguous: copied
        randn(3, 144, 7, 9)[:, ::2],  # contiguous planes at a channel stride of 2 planes: honoured
        randn(3, 72, 7, 10)[..., :9],  # rows of a plane not adjacent: copied
    ]
    for x in inputs:
        args = (x, 8, weight, bias, scale, shift, "silu")
        before = [t.clone() for t in (x, weight, bias, scale, shift)]
        with eekernels.backend(backend):
            out = group_norm_act(*args)
        assert out.is_contiguous(), "the output must be contiguous, as the fake impl says"
        assert_close(out, _ref64(*args), torch.float32)
        for t, bef in zip((x, weight, bias, scale, shift), before):
            assert torch.equal(t, bef), "an input was modified"


def test_opcheck():
    x, weight, bias, scale, shift = _inputs(2, 8, 3, 5, torch.float32)
    op = torch.ops.eekernels.group_norm_act.default
    torch.library.opcheck(op, (x, 4, weight.requires_grad_(), bias, scale, shift, "silu", 1e-5))
    torch.library.opcheck(op, (x, 2, None, None, None, None, None, 1e-5))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_reference(activation):
    x, weight, bias, scale, shift = (t.requires_grad_() for t in _inputs(2, 8, 3, 5, torch.float64))
    leaves = (x, weight, bias, scale, shift)
    out = group_norm_act(x, 4, weight, bias, scale, shift, activation)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(reference(x, 4, weight, bias, scale, shift, activation), leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "x": a["x"][0]}, r"`x` expected 4 dims"),
        (lambda a: {**a, "num_groups": 5}, r"`num_groups` expected to divide the 8 channels"),
        (lambda a: {**a, "num_groups": 0}, r"`num_groups` expected a positive int"),
        (lambda a: {**a, "num_groups": 2.0}, r"`num_groups` expected a positive int"),
        (lambda a: {**a, "weight": a["weight"][:-1]}, r"`weight` expected shape \(8,\)"),
        (lambda a: {**a, "bias": a["bias"].half()}, r"`bias` expected dtype torch.bfloat16"),
        (lambda a: {**a, "scale": a["scale"][:2]}, r"`scale` expected shape \(3, 8\)"),
        (lambda a: {**a, "shift": a["shift"][:, :4]}, r"`shift` expected shape \(3, 8\)"),
        (lambda a: {**a, "shift": None}, r"`shift` expected a \(B, C\) tensor because `scale` is given"),
        (lambda a: {**a, "scale": None}, r"`scale` expected a \(B, C\) tensor because `shift` is given"),
        (lambda a: {**a, "scale": a["scale"].to("meta")}, r"`scale` expected device"),
        (lambda a: {**a, "activation": "relu"}, r"`activation` expected one of"),
        (lambda a: {**a, "x": a["x"].long()}, r"`x` expected a floating dtype"),
        (lambda a: {**a, "eps": -1.0}, r"`eps` expected a positive float"),
    ],
)
def test_bad_inputs(change, match):
    x, weight, bias, scale, shift = _inputs(3, 8, 5, 7, torch.bfloat16)
    a = change(dict(x=x, num_groups=4, weight=weight, bias=bias, scale=scale, shift=shift,
                    activation="silu", eps=1e-5))
    with pytest.raises(ValueError, match=match):
        group_norm_act(**a)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), G=st.integers(1, 4), cpg=st.integers(1, 5), H=st.integers(1, 11), W=st.integers(1, 11),
    dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "channels_last", "channel_slice"]),
    modulated=st.booleans(), activation=st.sampled_from(ACTIVATIONS), backend=st.sampled_from(backends_here()),
)
def test_property_random_shapes(B, G, cpg, H, W, dtype, layout, modulated, activation, backend):
    assume(cpg * H * W > 1)  # one-element groups are ill-conditioned in float32: test_one_element_groups
    C = G * cpg
    if layout == "channel_slice":
        x = randn(B, 2 * C, H, W, dtype=dtype)[:, 1::2]
    else:
        x = randn(B, C, H, W, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    weight, bias = randn(C, dtype=dtype), randn(C, dtype=dtype)
    scale, shift = (randn(B, C, dtype=dtype), randn(B, C, dtype=dtype)) if modulated else (None, None)
    args = (x, G, weight, bias, scale, shift, activation)
    with eekernels.backend(backend):
        out = group_norm_act(*args)
    assert_close(out, _ref64(*args), dtype, baseline=reference(*args))
