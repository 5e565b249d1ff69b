"""qk_norm_rope: the per-head RMSNorm of q and k, RoPE and the (B, H, N, Dh) layout SDPA takes, against the
unfused torch eager steps of diffusers' FLUX attention processor (``RMSNorm`` on q and k, ``apply_rotary_emb``
with ``use_real_unbind_dim=-1``, then the transpose SDPA's layout needs, made contiguous); same process, same
timer. Inputs are views of one (B, N, 3, H, Dh) QKV GEMM output, as in the models.

Byte floor at FLUX.1 (B=1, N=4096 + 512, H=24, Dh=128) bf16 on an H100: one read of q and k and one write of
each, 4 x 28.3 MB = 113 MB, plus the float32 cos/sin tables (2 x 2.4 MB, read once per token for all heads):
118 MB, 39 us at 3.0 TB/s (docs/design.md). The eager steps read and write q and k about 3 times over, with
float32 temporaries. SD3.5 (no RoPE, N = 4096 + 333, H=24, Dh=64): case ``norm`` below, 4 x 14.2 MB = 57 MB, 19 us.
On CPU the shape is small and only the torch providers run (the Triton interpreter is skipped).
"""
import pytest
import torch

from eekernels.ops import qk_norm_rope

CUDA = torch.cuda.is_available()
SHAPE = (1, 4096 + 512, 24, 128) if CUDA else (1, 256, 4, 64)  # (B, N, H, Dh)


def _rms(x, w):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + 1e-6)).to(w.dtype) * w


def _rope(x, cos, sin):
    """diffusers' apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) on (B, N, H, Dh)."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    c, s = cos[None, :, None], sin[None, :, None]
    return (x.float() * c + rotated.float() * s).to(x.dtype)


def eager(q, k, wq, wk, cos, sin):
    q, k = _rms(q, wq), _rms(k, wk)
    if cos is not None:
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()


@pytest.mark.parametrize("case", ["norm+rope", "norm"])
@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "eekernels", "triton"])
def test_qk_norm_rope(bench, provider, case):
    bench.require(provider)
    B, N, H, Dh = SHAPE
    qkv = bench.randn(B, N, 3, H, Dh, offset=0.2)
    pos = torch.arange(N, device=qkv.device, dtype=torch.float64)[:, None]
    freqs = pos / 10000 ** (torch.arange(0, Dh, 2, device=qkv.device, dtype=torch.float64) / Dh)
    cos, sin = (f(freqs).repeat_interleave(2, dim=-1).float() for f in (torch.cos, torch.sin))
    if case == "norm":
        cos = sin = None
    args = (qkv[:, :, 0], qkv[:, :, 1], bench.randn(Dh, offset=1.0), bench.randn(Dh, offset=1.0), cos, sin)
    fn = bench.provider(provider, qk_norm_rope, eager, args)
    nbytes = 4 * args[0].numel() * qkv.element_size() + (0 if cos is None else 2 * cos.numel() * cos.element_size())
    bench.record(fn, lambda: eager(*args), bytes_moved=nbytes)
