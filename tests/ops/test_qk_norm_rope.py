"""qk_norm_rope against a float64 formula written out here, on every backend available (Triton under the
interpreter), and against diffusers' RMSNorm + apply_rotary_emb + the transpose SDPA takes (FLUX's attention
processor, step by step), with tables from get_1d_rotary_pos_embed and FLUX's FluxPosEmbed."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import eekernels
from eekernels.ops import qk_norm_rope
from eekernels.ops.qk_norm_rope import reference
from tests.utils import DTYPES, assert_close, backends_here, randn


def _rope(N, Dh, dtype=torch.float32, theta=10000.0):
    """FLUX's (N, Dh) tables, written out: angle pos / theta^(2i/Dh) for pair i, each repeated for the pair's
    two elements (diffusers' get_1d_rotary_pos_embed with repeat_interleave_real; checked against it below)."""
    pos = torch.arange(N, dtype=torch.float64) * 1.7 + 0.3  # fractional positions: no accidental symmetry
    inv = 1.0 / theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.outer(pos, inv).repeat_interleave(2, dim=1)
    return ang.cos().to(randn(1).device, dtype), ang.sin().to(randn(1).device, dtype)


def _diffusers():
    """diffusers is a test extra, not a dependency: the wheel check installs only torch, pytest and hypothesis."""
    return pytest.importorskip("diffusers", reason="diffusers is not installed (the cross-checks against it need it)")


def _qk(B, N, H, Dh, dtype):
    qkv = randn(B, N, 3, H, Dh, dtype=dtype, scale=1.5, offset=0.2)  # the QKV GEMM's output layout
    return qkv[:, :, 0], qkv[:, :, 1]


def _one64(x, w, cos, sin, eps):
    """One of q/k in float64, element by element of the pairs, independent of the op's reference."""
    h = x.double()
    if eps is not None:
        h = h / torch.sqrt((h * h).sum(-1, keepdim=True) / h.shape[-1] + eps)
        if w is not None:
            h = h * w.double()
    if cos is not None:
        c, s = cos.double()[None, :, None], sin.double()[None, :, None]  # (1, N, 1, Dh)
        out = torch.empty_like(h)
        out[..., 0::2] = h[..., 0::2] * c[..., 0::2] - h[..., 1::2] * s[..., 0::2]
        out[..., 1::2] = h[..., 1::2] * c[..., 1::2] + h[..., 0::2] * s[..., 1::2]
        h = out
    return h.permute(0, 2, 1, 3)  # (B, H, N, Dh)


def _ref64(q, k, wq, wk, cos, sin, eps=1e-6):
    return _one64(q, wq, cos, sin, eps), _one64(k, wk, cos, sin, eps)


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


def _diffusers_steps(q, k, wq, wk, cos, sin):
    """diffusers' FluxAttnProcessor on (B, N, H, Dh): norm_q/norm_k, RoPE, then SDPA's (B, H, N, Dh) layout."""
    _diffusers()
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    outs = []
    for x, w in ((q, wq), (k, wk)):
        norm = RMSNorm(x.shape[-1], eps=1e-6).to(x.device, w.dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
            h = apply_rotary_emb(norm(x), (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
        outs.append(h.transpose(1, 2))
    return outs


def test_rope_tables_match_diffusers():
    _diffusers()
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    for N, Dh in ((1, 2), (7, 24), (3, 128)):
        pos = torch.arange(N, dtype=torch.float64) * 1.7 + 0.3
        want = get_1d_rotary_pos_embed(Dh, pos, repeat_interleave_real=True, use_real=True, freqs_dtype=torch.float64)
        for got, w in zip(_rope(N, Dh, torch.float64), want):
            # diffusers rounds the inverse frequencies to float32 on the way (about 2e-8 relative)
            torch.testing.assert_close(got.cpu(), w.to(torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends_here())
def test_matches_diffusers_flux_attention_steps(backend):
    B, N, H, Dh = 2, 13, 3, 16
    q, k = _qk(B, N, H, Dh, torch.float32)
    wq, wk = randn(Dh, offset=1.0), randn(Dh, offset=1.0)
    cos, sin = _rope(N, Dh)
    with eekernels.backend(backend):
        got = qk_norm_rope(q, k, wq, wk, cos, sin)
    for g, w, name in zip(got, _diffusers_steps(q, k, wq, wk, cos, sin), "qk"):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", backends_here())
def test_matches_diffusers_with_flux_pos_embed_tables(backend):
    """FLUX's 3-axis tables (axes_dim sums to Dh) for text tokens (ids 0) then image tokens (ids (0, row, col))."""
    _diffusers()
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    B, H, Dh, txt, rows, cols = 1, 3, 24, 3, 4, 5
    ids = torch.cat([torch.zeros(txt, 3), torch.stack(torch.meshgrid(
        torch.zeros(1), torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
        indexing="ij"), dim=-1).reshape(-1, 3)])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[4, 10, 10])(ids)
    cos, sin = cos.to(randn(1).device), sin.to(randn(1).device)
    N = txt + rows * cols
    q, k = _qk(B, N, H, Dh, torch.float32)
    wq, wk = randn(Dh, offset=1.0), randn(Dh, offset=1.0)
    want = _diffusers_steps(q, k, wq, wk, cos, sin)
    for dtype in DTYPES:
        qd, kd = q.to(dtype), k.to(dtype)
        with eekernels.backend(backend):
            got = qk_norm_rope(qd, kd, wq, wk, cos, sin)
        r64 = _ref64(qd, kd, wq, wk, cos, sin)
        for g, r, name in zip(got, r64, "qk"):
            assert_close(g, r, dtype, what=f"{name} {dtype}")
        if dtype == torch.float32:
            for g, w, name in zip(got, want, "qk"):
                torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_torch_path_computes_float64_in_float64():
    q, k = (t.double() for t in _qk(2, 7, 3, 24, torch.float32))
    w = randn(24, dtype=torch.float64, offset=1.0)
    cos, sin = (t.double() for t in _rope(7, 24))
    with eekernels.backend("torch"):
        got = qk_norm_rope(q, k, w, None, cos, sin)
    for g, r in zip(got, _ref64(q, k, w, None, cos, sin)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)


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
    want = torch.autograd.grad(_ref64(q64, k64, w64, w64, c64, s64), (q64, k64, w64), grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _bad(q, k, w, cos, sin):
    return [
        (lambda: qk_norm_rope(q[0], k), r"`q` expected 4 dims \(B, N, H, Dh\)"),
        (lambda: qk_norm_rope(q, k[:, :-1]), r"`k` expected shape \(2, 9, 3, 8\)"),
        (lambda: qk_norm_rope(q, k.double()), r"`k` expected q's dtype"),
        (lambda: qk_norm_rope(q, k, w[:-1]), r"`q_weight` expected shape \(8,\)"),
        (lambda: qk_norm_rope(q, k, None, w.half()), r"`k_weight` expected dtype"),
        (lambda: qk_norm_rope(q, k, w, w, eps=None), r"`eps` expected a positive float \(finite, not a bool\), got None \(None means no norm"),
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


@pytest.mark.parametrize("backend", backends_here())
def test_fullgraph_compile_matches_eager(backend):
    """torch.compile(fullgraph=True, backend="aot_eager") traces the fake impl, forward and backward."""
    torch._dynamo.reset()
    q, k = _qk(1, 5, 2, 8, torch.float32)
    w = randn(8, offset=1.0).requires_grad_()
    cos, sin = _rope(5, 8)
    q = q.detach().requires_grad_()

    def attn(q, k, w):
        qo, ko = qk_norm_rope(q, k, w, w, cos, sin)
        return torch.nn.functional.scaled_dot_product_attention(qo, ko, ko)

    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with eekernels.backend(backend):
        got, want = compiled(q, k, w), attn(q, k, w)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, w), g), torch.autograd.grad(want, (q, w), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", backends_here())
def test_odd_head_dim_without_rope(backend):
    """Odd Dh (norm only): the last element has no pair partner and must still be normalized and written."""
    q, k = _qk(2, 5, 3, 7, torch.float16)
    w = randn(7, dtype=torch.float16, offset=1.0)
    with eekernels.backend(backend):
        got = qk_norm_rope(q, k, w, w)
    for g, r, name in zip(got, _ref64(q, k, w, w, None, None), "qk"):
        assert_close(g, r, torch.float16, what=name)
