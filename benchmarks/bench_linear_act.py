"""linear_act: DiT's fc1, ``gelu_tanh(x @ W.T + b)``, against torch eager linear then GELU.

Shape on CUDA: x (64, 256, 1152), W (4608, 1152) bf16: 174 GFLOP. ``speedup_vs_linear_alone`` compares with
``F.linear`` without the activation: the target is >= 0.95 (docs/design.md: F.linear alone 242 us, 718 TFLOP/s;
linear then GELU 347 us; cuBLASLt's GELU epilogue 282 us). ``cublas`` is the path auto takes on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

from eekernels.ops import linear_act

SHAPE = (64, 256, 1152, 4608) if torch.cuda.is_available() else (2, 64, 256, 512)  # (B, N, K, M)


def eager(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def ours(x, weight, bias):
    return linear_act(x, weight, bias, "gelu_tanh")


@pytest.mark.parametrize("provider", ["torch_eager", "torch_compile", "eekernels", "triton", "cublas"])
def test_linear_act(bench, provider):
    bench.require(provider)
    B, N, K, M = SHAPE
    args = (bench.randn(B, N, K), bench.randn(M, K, scale=K ** -0.5), bench.randn(M, scale=0.1))
    fn = bench.provider(provider, ours, eager, args)
    bench.record(fn, lambda: eager(*args), flops=2 * B * N * K * M,
                 extra_baselines={"linear_alone": lambda: F.linear(*args)})
