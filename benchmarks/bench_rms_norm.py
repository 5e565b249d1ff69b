"""rms_norm: RMSNorm over the last dim against the unfused torch eager ``x * rsqrt(mean(x^2) + eps) * w`` in
float32 (diffusers' ``RMSNorm``), and against ``torch.nn.functional.rms_norm``; same process, same timer.

Byte floor (one read of x, one write of the output; the weight is 0.02% more): at FLUX.1's joint sequence
(1, 4096 + 512, 3072) bf16 on an H100, 2 x 28.3 MB = 56.6 MB, 19 us at 3.0 TB/s (docs/design.md). diffusers'
RMSNorm upcasts to float32 for the variance and writes a float32 temporary: about 5 passes over x.
On CPU the shape is small and only the torch providers run (the Triton interpreter is skipped).
"""
import pytest
import torch

from eekernels.ops import rms_norm

SHAPE = (1, 4096 + 512, 3072) if torch.cuda.is_available() else (1, 256, 384)  # (B, N, D)


def eager(x, w):
    """diffusers' RMSNorm.forward, written out: variance in float32, the product back in the weight's dtype."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + 1e-6)).to(w.dtype) * w


def functional(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps=1e-6)


@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "eekernels", "triton"])
def test_rms_norm(bench, provider):
    bench.require(provider)
    B, N, D = SHAPE
    args = (bench.randn(B, N, D, offset=0.5), bench.randn(D, offset=1.0))
    fn = bench.provider(provider, rms_norm, eager, args)
    bench.record(fn, lambda: eager(*args), bytes_moved=2 * args[0].numel() * args[0].element_size(),
                 extra_baselines={"F.rms_norm": lambda: functional(*args)})
