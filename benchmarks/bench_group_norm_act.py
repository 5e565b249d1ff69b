"""group_norm_act: GroupNorm + scale-shift + SiLU (an ADM ResBlock's out_layers norm) against torch eager.

Shape on CUDA: (64, 256, 32, 32) bf16, 32 groups (a 256 px U-Net level at batch 64; 16.8 M elements, close
to DiT-XL/2's 18.9 M). Bytes: one read of x and one write of the output (the effective figure; the Triton
kernel reads x twice). Eager runs group_norm, the modulation and silu as separate passes.
"""
import pytest
import torch
import torch.nn.functional as F

from eekernels.ops import group_norm_act

SHAPE = (64, 256, 32, 32) if torch.cuda.is_available() else (2, 64, 16, 16)  # (B, C, H, W)
GROUPS = 32


def eager(x, weight, bias, scale, shift):
    h = F.group_norm(x, GROUPS, weight, bias, eps=1e-5)
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def ours(x, weight, bias, scale, shift):
    return group_norm_act(x, GROUPS, weight, bias, scale, shift, "silu")


@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "eekernels", "triton", "cuda"])
def test_group_norm_act(bench, provider):
    bench.require(provider)
    B, C, H, W = SHAPE
    args = (bench.randn(B, C, H, W, offset=0.5), bench.randn(C, offset=1.0), bench.randn(C),
            bench.randn(B, C, scale=0.5), bench.randn(B, C))
    fn = bench.provider(provider, ours, eager, args)
    bench.record(fn, lambda: eager(*args), bytes_moved=2 * args[0].numel() * args[0].element_size())
