"""qk_norm_rope against its float64 reference on every backend here, and the reference against diffusers'
RMSNorm + apply_rotary_emb + the transpose SDPA takes (FLUX's attention processor, step by step)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import qk_norm_rope
from eekernels.ops.qk_norm_rope import reference
from tests.utils import DTYPES, assert_close, backends_here, randn


def _rope(N, Dh, dtype=torch.float32):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    pos = torch.arange(N, dtype=torch.float64) * 1.7 + 0.3  # fractional positions: no accidental symmetry
    cos, sin = get_1d_rotary_pos_embed(Dh, pos, repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float64)
    return cos.to(randn(1).device, dtype), sin.to(randn(1).device, dtype)


def _qk(B, N, H, Dh, dtype):
    qkv = randn(B, N, 3, H, Dh, dtype=dtype, scale=1.5, offset=0.2)  # the QKV GEMM's output layout
    return qkv[:, :, 0], qkv[:, :, 1]


def _ref64(q, k, wq, wk, cos, sin, eps=1e-6):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference(d(q), d(k), d(wq), d(wk), d(cos), d(sin), eps)


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, N, H, Dh", [(1, 1, 1, 2), (2, 7, 3, 24), (1, 3, 2, 128)])
@pytest.mark.parametrize("case", ["norm+rope", "norm", "rope", "no-weight"])
def test_matches_reference(backend, dtype, B, N, H, Dh, case):
    q, k = _qk(B, N, H, Dh, dtype)
    wq, wk = randn(Dh, dtype=dtype, offset=1.0), randn(Dh, dtype=dtype, offset=1.0)
    cos, sin = _rope(N, Dh)
    eps = 1e-6
    if case == "norm":
        cos = sin = None
    elif case == "rope":
        wq = wk = eps = None
    elif case == "no-weight":
        wq = wk = None
    with eekernels.backend(backend):
        oq, ok = qk_norm_rope(q, k, wq, wk, cos, sin, eps=eps)
    rq, rk = _ref64(q, k, wq, wk, cos, sin, eps)
    bq, bk = reference(q, k, wq, wk, cos, sin, eps)
    for out, ref, base, name in ((oq, rq, bq, "q"), (ok, rk, bk, "k")):
        assert out.shape == (B, H, N, Dh) and out.is_contiguous(), name
        assert_close(out, ref, dtype, baseline=base, what=name)


def test_reference_is_diffusers_flux_attention_steps():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    B, N, H, Dh = 2, 13, 3, 16
    q, k = _qk(B, N, H, Dh, torch.float32)
    nq, nk = RMSNorm(Dh, eps=1e-6), RMSNorm(Dh, eps=1e-6)
    with torch.no_grad():
        nq.weight.copy_(randn(Dh, offset=1.0))
        nk.weight.copy_(randn(Dh, offset=1.0))
        cos, sin = _rope(N, Dh)
        # diffusers' FluxAttnProcessor: unflatten to (B, N, H, Dh), norm_q/norm_k, RoPE, then SDPA's layout
        want_q = apply_rotary_emb(nq(q), (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1).transpose(1, 2)
        want_k = apply_rotary_emb(nk(k), (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1).transpose(1, 2)
        got_q, got_k = reference(q, k, nq.weight, nk.weight, cos, sin)
    torch.testing.assert_close(got_q, want_q, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got_k, want_k, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", backends_here())
def test_strided_views_float32_tables_and_no_mutation(backend):
    q, k = _qk(2, 9, 2, 8, torch.bfloat16)  # views into one (B, N, 3, H, Dh) tensor
    wq, wk = randn(8), randn(8)  # float32 weights with bf16 q/k
    cos, sin = _rope(9, 8)
    before = [t.clone() for t in (q, k, wq, wk, cos, sin)]
    with eekernels.backend(backend):
        oq, ok = qk_norm_rope(q, k, wq, wk, cos, sin)
    rq, rk = _ref64(q, k, wq, wk, cos, sin)
    assert_close(oq, rq, torch.bfloat16, what="q")
    assert_close(ok, rk, torch.bfloat16, what="k")
    assert all(torch.equal(t, b) for t, b in zip((q, k, wq, wk, cos, sin), before)), "an input was modified"


def test_opcheck_and_gradients():
    q, k = _qk(1, 5, 2, 8, torch.float32)
    w = randn(8)
    cos, sin = _rope(5, 8)
    torch.library.opcheck(torch.ops.eekernels.qk_norm_rope.default, (q, k, w.requires_grad_(), w, cos, sin, 1e-6))
    torch.library.opcheck(torch.ops.eekernels.qk_norm_rope.default, (q, k, None, None, None, None, None))
    q64, k64 = (t.double().requires_grad_() for t in _qk(1, 5, 2, 8, torch.float32))
    w64 = randn(8, dtype=torch.float64).requires_grad_()
    c64, s64 = (t.double() for t in _rope(5, 8))
    outs = qk_norm_rope(q64, k64, w64, w64, c64, s64)
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, (q64, k64, w64), grads)
    want = torch.autograd.grad(reference(q64, k64, w64, w64, c64, s64), (q64, k64, w64), grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _bad(q, k, w, cos, sin):
    return [
        (lambda: qk_norm_rope(q[0], k), r"`q` expected 4 dims \(B, N, H, Dh\)"),
        (lambda: qk_norm_rope(q, k[:, :-1]), r"`k` expected shape \(2, 9, 3, 8\)"),
        (lambda: qk_norm_rope(q, k.double()), r"`k` expected q's dtype"),
        (lambda: qk_norm_rope(q, k, w[:-1]), r"`q_weight` expected shape \(8,\)"),
        (lambda: qk_norm_rope(q, k, None, w.half()), r"`k_weight` expected dtype"),
        (lambda: qk_norm_rope(q, k, w, w, eps=None), r"`eps` expected a positive float when a norm weight"),
        (lambda: qk_norm_rope(q, k, w, w, cos, None), r"`cos` and `sin` expected both"),
        (lambda: qk_norm_rope(q, k, w, w, cos[:-1], sin[:-1]), r"`cos` expected shape \(9, 8\)"),
        (lambda: qk_norm_rope(q[..., :7], k[..., :7], None, None, cos[:, :7], sin[:, :7]), r"even head dim"),
        (lambda: qk_norm_rope(q, k, w, w, eps=-1.0), r"`eps` expected a positive float"),
        (lambda: qk_norm_rope(q.tolist(), k), r"`q` expected a torch.Tensor"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_inputs(index):
    q, k = _qk(2, 9, 3, 8, torch.float32)
    call, match = _bad(q, k, randn(8), *_rope(9, 8))[index]
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 12), H=st.integers(1, 3), half=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES), rope=st.booleans(), backend=st.sampled_from(backends_here()))
def test_property_random_shapes(B, N, H, half, dtype, rope, backend):
    Dh = 2 * half
    q, k = _qk(B, N, H, Dh, dtype)
    w = randn(Dh, dtype=dtype)
    cos, sin = _rope(N, Dh) if rope else (None, None)
    with eekernels.backend(backend):
        oq, ok = qk_norm_rope(q, k, w, None, cos, sin)
    rq, rk = _ref64(q, k, w, None, cos, sin)
    bq, bk = reference(q, k, w, None, cos, sin)
    assert_close(oq, rq, dtype, baseline=bq, what="q")
    assert_close(ok, rk, dtype, baseline=bk, what="k")
