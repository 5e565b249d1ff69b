"""``to_fp8(model)``: a copy of a DiT (or U-ViT) whose block GEMMs (qkv, proj, fc1, fc2) run in fp8 (E4M3).

Inference only. The copy's ``Attention`` and ``Mlp`` modules are replaced by :class:`FP8Attention` and
:class:`FP8Mlp`, which hold each weight as a float8_e4m3fn buffer plus its float32 scale (per output row by
default, or one per tensor) and call :func:`eekernels.ops.fp8_linear.fp8_linear`; activations are
quantized on the fly (per token for per-row weights). Everything else (embeddings, adaLN, the norms,
attention itself, the final layer) is unchanged, and the original model is not modified. The copy's
state_dict has ``*_weight_fp8`` / ``*_weight_scale`` keys in place of the block linears' ``weight``.

Accuracy: tests/ops/test_fp8_linear.py checks a tiny DiT under ``to_fp8`` against the model in
float32 (see ``FP8_DIT_REL_ERR`` there). Speed: ``torch._scaled_mm`` on compute capability >= 9.0 (per row)
or >= 8.9 (per tensor); elsewhere the dequantizing torch reference, which is slower than the original.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.ops.fp8_linear import PER, fp8_linear, quantize_fp8
from eekernels.models import _layers as L


class _FP8Linears(nn.Module):
    """Holds named fp8 weights (buffers) and float biases (parameters, frozen) taken from nn.Linear modules."""

    def _take(self, name: str, linear: nn.Linear, per: str) -> None:
        q, scale = quantize_fp8(linear.weight.detach(), per=per)
        self.register_buffer(f"{name}_weight_fp8", q)
        self.register_buffer(f"{name}_weight_scale", scale)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_parameter(f"{name}_bias", bias)

    def _linear(self, name: str, h: torch.Tensor, activation=None) -> torch.Tensor:
        return fp8_linear(h, getattr(self, f"{name}_weight_fp8"), getattr(self, f"{name}_weight_scale"),
                          getattr(self, f"{name}_bias"), activation)


class FP8Attention(_FP8Linears):
    """:class:`eekernels.models._layers.Attention` with fp8 qkv and proj GEMMs."""

    def __init__(self, attn: L.Attention, per: str = "row"):
        super().__init__()
        self.num_heads = attn.num_heads
        self._take("qkv", attn.qkv, per)
        self._take("proj", attn.proj, per)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, N, D = h.shape
        qkv = self._linear("qkv", h).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self._linear("proj", o.transpose(1, 2).reshape(B, N, D))


class FP8Mlp(_FP8Linears):
    """:class:`eekernels.models._layers.Mlp` with fp8 fc1 (activation after the GEMM) and fc2."""

    def __init__(self, mlp: L.Mlp, per: str = "row"):
        super().__init__()
        self.activation = mlp.activation
        self._take("fc1", mlp.fc1, per)
        self._take("fc2", mlp.fc2, per)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._linear("fc2", self._linear("fc1", h, self.activation))


def to_fp8(model: nn.Module, *, per: str = "row") -> nn.Module:
    """A deep copy of ``model`` with every ``Attention`` / ``Mlp`` (the transformer blocks' qkv, proj, fc1,
    fc2 of DiT and U-ViT) replaced by its fp8 version; ``per``: "row" (one weight scale per output feature,
    activations per token) or "tensor". The copy is in eval mode; ``model`` is not modified."""
    if per not in PER:
        raise ValueError(f"to_fp8: `per` expected one of {PER}, got {per!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"to_fp8: `model` expected an nn.Module (a DiT or U-ViT), got {type(model).__name__}")
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (L.Attention, L.Mlp)]
    if not targets:
        raise ValueError(f"to_fp8: `model` expected a model with eekernels Attention/Mlp blocks (DiT, U-ViT), "
                         f"got a {type(model).__name__} with none")
    out = copy.deepcopy(model)
    for name, _ in targets:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        old = getattr(parent, child)
        new = FP8Attention(old, per) if isinstance(old, L.Attention) else FP8Mlp(old, per)
        setattr(parent, child, new)
    return out.eval()
