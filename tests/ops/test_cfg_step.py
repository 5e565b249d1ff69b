"""cfg_step (CFG combine + affine solver update in one pass) against its float64 reference on every backend
available here, and against the sampler's own ``guide`` + ``Solver.update`` for DDIM (eta=0), Euler and
flow_euler."""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import cfg_step
from eekernels.ops.cfg_step import reference, solver_coefficients
from tests.utils import CUDA, DTYPES, assert_close, backends_here, randn, requires_cuda

# (B, C, spatial...): odd sizes; S = 1517 spans two kernel blocks; S = 1 (a flat (B, C, 1) sample).
SHAPES = [(1, 3, 5, 7), (3, 4, 9, 11), (2, 5, 1), (1, 2, 37, 41)]


def _scalars(dtype=torch.float32, dev=None):
    """Fresh random scale > 1 (CFG), a, b (never 0 or 1, so that every term matters)."""
    r = torch.rand(3, dtype=torch.float64)
    vals = (1.5 + 6 * r[0], 0.8 + 0.3 * r[1], -(0.05 + 0.5 * r[2]))
    return [torch.tensor(float(v), dtype=dtype, device=dev or ("cuda" if CUDA else "cpu")) for v in vals]


def _inputs(shape, out_dtype, x_dtype=torch.float32, cfg=True, learned_sigma=False):
    B, C = shape[0], shape[1]
    x = randn(*shape, dtype=x_dtype, scale=1.5, offset=0.2)
    out = randn(2 * B if cfg else B, 2 * C if learned_sigma else C, *shape[2:], dtype=out_dtype, offset=-0.3)
    scale, a, b = _scalars()
    return x, out, (scale if cfg else None), a, b


def _ref64(x, out, scale, a, b, k=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference(d(x), d(out), d(scale), d(a), d(b), k)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["cfg", "cfg_k", "nocfg"])
@pytest.mark.parametrize("learned_sigma", [False, True])
def test_matches_reference(backend, out_dtype, shape, mode, learned_sigma):
    x, out, scale, a, b = _inputs(shape, out_dtype, cfg=mode != "nocfg", learned_sigma=learned_sigma)
    k = 2 if mode == "cfg_k" else None  # DiT's forward_with_cfg guides the first 3 of 4; here 2 of C
    before = [t.clone() for t in (x, out)]
    with eekernels.backend(backend):
        y = cfg_step(x, out, scale, a, b, cfg_channels=k)
    assert y.data_ptr() != x.data_ptr()
    assert_close(y, _ref64(x, out, scale, a, b, k), x.dtype, baseline=reference(x, out, scale, a, b, k))
    assert all(torch.equal(t, t0) for t, t0 in zip((x, out), before)), "an input was modified"


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_x(backend, dtype):
    """x itself in bf16/fp16 (not the sampler's case, which keeps the state in float32): rounded once."""
    x, out, scale, a, b = _inputs((2, 3, 7, 5), dtype, x_dtype=dtype, learned_sigma=True)
    with eekernels.backend(backend):
        y = cfg_step(x, out, scale, a, b)
    assert_close(y, _ref64(x, out, scale, a, b), dtype, baseline=reference(x, out, scale, a, b))


@pytest.mark.parametrize("backend", backends_here())
def test_inplace_and_strided_inputs(backend):
    x, out, scale, a, b = _inputs((2, 3, 6, 5), torch.bfloat16, learned_sigma=True)
    want = _ref64(x, out, scale, a, b)
    # In place: the result lands in x's storage and x is returned.
    xi = x.clone()
    with eekernels.backend(backend):
        got = cfg_step(xi, out, scale, a, b, inplace=True)
    assert got is xi
    assert_close(xi, want, torch.float32)
    # Strided: out a channel slice of a wider buffer, x a transposed view; in place into a non-contiguous x.
    wide = randn(4, 9, 6, 5, dtype=torch.bfloat16)
    wide[:, 1:7] = out
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    with eekernels.backend(backend):
        y = cfg_step(xt, wide[:, 1:7], scale, a, b)
        assert_close(y, want, torch.float32)
        cfg_step(xt, wide[:, 1:7], scale, a, b, inplace=True)
    assert_close(xt, want, torch.float32)
    assert not xt.is_contiguous()


@pytest.mark.parametrize("backend", backends_here())
def test_empty(backend):
    x, out, scale, a, b = _inputs((2, 3, 0, 4), torch.float32)
    with eekernels.backend(backend):
        assert cfg_step(x, out, scale, a, b).shape == (2, 3, 0, 4)


def test_float64_stays_float64():
    x, out, scale, a, b = _inputs((2, 3, 4, 5), torch.float64, x_dtype=torch.float64)
    scale, a, b = (t.double() for t in (scale, a, b))
    y = cfg_step(x, out, scale, a, b)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, a * x + b * (out[2:] + scale * (out[:2] - out[2:])), rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# The sampler's own step: guide + Solver.update equals cfg_step with solver_coefficients.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("ddim", {"timestep_spacing": "respaced"}),
                                              ("euler", {}), ("flow_euler", {"shift": 3.0})])
@pytest.mark.parametrize("learned_sigma", [False, True])
@pytest.mark.parametrize("cfg_channels", [None, 3])
def test_equals_guide_and_solver_update(backend, sampler, options, learned_sigma, cfg_channels):
    from eekernels.samplers.sampling import guide
    from eekernels.samplers.solvers import make_solver

    solver = make_solver(sampler, 7, **options)
    B, C = 3, 4
    x0 = randn(B, C, 5, 7) * solver.init_noise_sigma
    for call in (0, 3, 6):  # first, middle, last (DDIM's alpha_prev = 1) call
        st = solver.new_state(x0)
        st.counter.fill_(call)
        row = st.row()
        out = randn(2 * B, 2 * C if learned_sigma else C, 5, 7)
        scale = torch.tensor(4.5, dtype=st.x.dtype, device=st.x.device)
        expect = st.x.clone()
        st_ref = solver.new_state(x0)
        st_ref.counter.fill_(call)
        eps, var = guide(out, C, scale, st_ref.x.dtype, cfg_channels)
        solver.update(st_ref, row, eps, var)
        a, b = solver_coefficients(solver, row)
        with eekernels.backend(backend):
            got = cfg_step(st.x, out, scale, a, b, cfg_channels=cfg_channels, inplace=True)
        assert got is st.x and not torch.equal(got, expect)
        if backend == "torch" and sampler != "ddim":
            assert torch.equal(got, st_ref.x), "the torch path is guide + x.add_(dt * eps) bit for bit"
        else:  # DDIM's a, b fold (x - s1 eps) / s0 into one multiply-add: a few float32 ulps
            torch.testing.assert_close(got, st_ref.x, rtol=2e-6, atol=2e-6)


def test_solver_coefficients_refuses_non_affine_solvers():
    from eekernels.samplers.solvers import make_solver

    row = torch.zeros(8)
    for sampler, opts in [("ddim", {"eta": 0.5}), ("ddpm", {}), ("heun", {}), ("dpmsolver++", {})]:
        with pytest.raises(ValueError, match=rf"cfg_step: solver {re.escape(repr(sampler))} has no affine update"):
            solver_coefficients(make_solver(sampler, 5, **opts), row)


# --------------------------------------------------------------------------------------------------
# Registration, autograd, validation
# --------------------------------------------------------------------------------------------------
def test_opcheck_and_gradients():
    x, out, scale, a, b = _inputs((2, 3, 4, 5), torch.float32, learned_sigma=True)
    torch.library.opcheck(torch.ops.eekernels.cfg_step.default, (x, out.requires_grad_(), scale, a, b, None))
    torch.library.opcheck(torch.ops.eekernels.cfg_step.default, (x, out.detach()[:2], None, a, b, 2))
    torch.library.opcheck(torch.ops.eekernels.cfg_step_.default, (x.clone(), out.detach(), scale, a, b, None))
    d = [t.detach().double().requires_grad_() for t in (x, out, scale, a, b)]
    y = cfg_step(*d, cfg_channels=2)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, d, g)
    want = torch.autograd.grad(reference(*d, 2), d, g)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q)


def test_inplace_through_the_registered_op_matches():
    x, out, scale, a, b = _inputs((2, 3, 4, 5), torch.float32)
    xi = x.clone()
    torch.ops.eekernels.cfg_step_(xi, out, scale, a, b, None)
    torch.testing.assert_close(xi, torch.ops.eekernels.cfg_step(x, out, scale, a, b, None), rtol=0, atol=0)


def test_compiles_without_graph_breaks():
    x, out, scale, a, b = _inputs((2, 3, 4, 5), torch.float32, learned_sigma=True)
    fn = torch.compile(lambda *t: cfg_step(*t), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, out, scale, a, b), reference(x, out, scale, a, b), rtol=0, atol=0)


@pytest.mark.parametrize("change, match", [
    (lambda x, o, s, a, b: (x.tolist(), o, s, a, b), r"`x` expected a torch.Tensor"),
    (lambda x, o, s, a, b: (x[0, 0, 0], o, s, a, b), r"`x` expected at least 2 dims \(B, C, \.\.\.\)"),
    (lambda x, o, s, a, b: (x.long(), o, s, a, b), r"`x` expected a floating dtype"),
    (lambda x, o, s, a, b: (x, o[:3], s, a, b), r"`out` expected shape \(2B=4, C=3 or 2C=6, 4, 5\) for x "
                                                r"\(2, 3, 4, 5\) with CFG \(\[cond; uncond\]\), got \(3, 3, 4, 5\)"),
    (lambda x, o, s, a, b: (x, o, None, a, b), r"`out` expected shape \(B=2, C=3 or 2C=6, 4, 5\)"),
    (lambda x, o, s, a, b: (x, o[:, :2], s, a, b), r"`out` expected shape .* got \(4, 2, 4, 5\)"),
    (lambda x, o, s, a, b: (x, o[..., :4], s, a, b), r"`out` expected shape .* got \(4, 3, 4, 4\)"),
    (lambda x, o, s, a, b: (x, o[..., 0], s, a, b), r"`out` expected shape .* got \(4, 3, 4\)"),
    (lambda x, o, s, a, b: (x, o.int(), s, a, b), r"`out` expected a floating dtype"),
    (lambda x, o, s, a, b: (x, o.to("meta"), s, a, b), r"`out` expected device"),
    (lambda x, o, s, a, b: (x, o, 4.0, a, b), r"`scale` expected a 0-d float tensor on x's device .* got float"),
    (lambda x, o, s, a, b: (x, o, s.reshape(1), a, b), r"`scale` expected a 0-d tensor \(shape \(\)\), got "
                                                       r"shape \(1,\)"),
    (lambda x, o, s, a, b: (x, o, s, a.to("meta"), b), r"`a` expected device"),
    (lambda x, o, s, a, b: (x, o, s, a, b.long()), r"`b` expected a floating dtype"),
    (lambda x, o, s, a, b: (x, o, s, a, b.expand(3)), r"`b` expected a 0-d tensor"),
])
def test_bad_inputs(change, match):
    x, out, scale, a, b = _inputs((2, 3, 4, 5), torch.bfloat16)
    before = [t.clone() for t in (x, out)]
    for inplace in (False, True):
        with pytest.raises(ValueError, match=match):
            cfg_step(*change(x, out, scale, a, b), inplace=inplace)
    assert all(torch.equal(t, t0) for t, t0 in zip((x, out), before))
    for k, inplace in [(-1, False), (True, False), (1.5, False), (None, 1)]:
        with pytest.raises(ValueError, match="`cfg_channels` expected None or an int|`inplace` expected a bool"):
            cfg_step(x, out, scale, a, b, cfg_channels=k, inplace=inplace)


def test_fake_impl_validates():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, out = torch.empty(2, 3, 4, 5), torch.empty(4, 6, 4, 5)
        s = torch.empty(())
        assert torch.ops.eekernels.cfg_step(x, out, s, s, s, None).shape == (2, 3, 4, 5)
        for op in (torch.ops.eekernels.cfg_step, torch.ops.eekernels.cfg_step_):
            with pytest.raises(ValueError, match=r"`out` expected shape"):
                op(x, out[:, :5], s, s, s, None)
            with pytest.raises(ValueError, match=r"`a` expected a 0-d tensor"):
                op(x, out, s, torch.empty(1), s, None)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 6), H=st.integers(1, 13), W=st.integers(1, 40),
       out_dtype=st.sampled_from(DTYPES), cfg=st.booleans(), learned_sigma=st.booleans(),
       k=st.one_of(st.none(), st.integers(1, 6)), backend=st.sampled_from(backends_here()))
def test_property_random_shapes(B, C, H, W, out_dtype, cfg, learned_sigma, k, backend):
    k = None if k is None else min(k, C)  # cfg_channels in [1, C], as eekernels.sample takes it
    x, out, scale, a, b = _inputs((B, C, H, W), out_dtype, cfg=cfg, learned_sigma=learned_sigma)
    with eekernels.backend(backend):
        y = cfg_step(x, out, scale, a, b, cfg_channels=k)
    assert_close(y, _ref64(x, out, scale, a, b, k), torch.float32, baseline=reference(x, out, scale, a, b, k))


# --------------------------------------------------------------------------------------------------
# GPU: the call inside a CUDA graph reads scale, a and b on the device at replay.
# --------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_cuda_graph_replays_with_new_coefficients(backend):
    x, out, scale, a, b = _inputs((2, 4, 32, 32), torch.bfloat16, learned_sigma=True)
    x0 = x.clone()
    with eekernels.backend(backend):
        cfg_step(x, out, scale, a, b, inplace=True)  # warm-up (compile) outside the capture
        x.copy_(x0)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            cfg_step(x, out, scale, a, b, inplace=True)
    for _ in range(2):
        new = _scalars(dev="cuda")
        for t, v in zip((scale, a, b), new):
            t.copy_(v)
        x.copy_(x0)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(x, _ref64(x0, out, scale, a, b), torch.float32)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("inplace", [False, True])
def test_registered_ops_raise_the_wrappers_error_before_any_launch(backend, inplace, monkeypatch):
    import dataclasses
    import sys

    d = sys.modules["eekernels.ops.cfg_step"].DISPATCH
    for impl in d.impls:  # every implementation fails the test if reached
        monkeypatch.setitem(d.by_name, impl.name,
                            dataclasses.replace(impl, fn=lambda *a, _n=impl.name: pytest.fail(f"{_n} ran")))
    monkeypatch.setattr(d, "torch", d.by_name["torch"])
    x, out, scale, a, b = _inputs((2, 3, 4, 5), torch.float32)
    op = torch.ops.eekernels.cfg_step_ if inplace else torch.ops.eekernels.cfg_step
    for bad in [(x, out[:, :2], scale, a, b), (x, out, scale.reshape(1), a, b), (x, out[:2], scale, a, b)]:
        with eekernels.backend(backend):
            with pytest.raises(ValueError) as want:
                cfg_step(*bad, inplace=inplace)
            with pytest.raises(ValueError) as got:
                op(*bad, None)
        assert str(got.value) == str(want.value) and str(got.value).startswith("cfg_step: ")


def test_auto_takes_triton_on_cuda_and_torch_for_float64():
    """No GPU needed: fake CUDA tensors carry device and dtype, which is all the selection reads."""
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode

    from eekernels.ops._triton import HAS_TRITON

    d = sys.modules["eekernels.ops.cfg_step"].DISPATCH
    with FakeTensorMode():
        x32 = torch.empty(2, 4, 8, 8, device="cuda")
        x64 = torch.empty(2, 4, 8, 8, device="cuda", dtype=torch.float64)
    with eekernels.backend("auto"):
        assert d.select(x32).name == ("triton" if HAS_TRITON else "torch")
        assert d.select(x64).name == "torch"
    assert "triton: float64 is not supported by triton" in d.explain(x64)["triton"]
