"""layer_norm: LayerNorm with affine against torch eager ``F.layer_norm`` (one fused ATen kernel already).

Bytes: one read of x and one write of the output; 75.5 MB at (64, 256, 1152) bf16, 25 us at 3.0 TB/s.
"""
import pytest
import torch
import torch.nn.functional as F

from eekernels.ops import layer_norm

SHAPE = (64, 256, 1152) if torch.cuda.is_available() else (4, 64, 256)  # (B, N, D)


def eager(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=1e-6)


@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "eekernels", "triton"])
def test_layer_norm(bench, provider):
    bench.require(provider)
    B, N, D = SHAPE
    args = (bench.randn(B, N, D, offset=0.5), bench.randn(D, offset=1.0), bench.randn(D))
    fn = bench.provider(provider, layer_norm, eager, args)
    bench.record(fn, lambda: eager(*args), bytes_moved=2 * args[0].numel() * args[0].element_size())
