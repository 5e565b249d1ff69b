"""The ASE reference code's way of training under an exit schedule, in plain torch, as a baseline.

Every sample runs through every block up to the deepest exit in the batch; after each block the hidden
state of the samples that exit there is picked (``torch.where``), and the final layer runs once on the
picked states. Same function as ``DiT.forward(..., depth=per_sample_tensor)``, without skipping any work:
the baseline for the gradient test and the training-speed benchmark.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from eekernels.models import _layers as L


def _modulate(x, shift, scale, eps):
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _attention(block, h, num_heads):
    B, N, D = h.shape
    qkv = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).view(B, N, 3, num_heads, D // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
    return F.linear(o, block.attn.proj.weight, block.attn.proj.bias)


def _mlp(block, h):
    mlp = block.mlp
    a = F.linear(h, mlp.fc1.weight, mlp.fc1.bias)
    a = F.gelu(a, approximate="tanh") if mlp.activation == "gelu_tanh" else getattr(F, mlp.activation)(a)
    return F.linear(a, mlp.fc2.weight, mlp.fc2.bias)


def naive_exit_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, depth: torch.Tensor) -> torch.Tensor:
    """An eekernels ``DiT`` at per-sample ``depth`` (B,) the naive way: all blocks for all samples, then pick.

    x: (B, C, H, W); t: (B,) timesteps; y: (B,) labels or None (null class). Returns (B, out_channels, H, W).
    """
    if depth.shape != (x.shape[0],):
        raise ValueError(f"naive_exit_forward: `depth` expected shape ({x.shape[0]},), got {tuple(depth.shape)}")
    D = model.hidden_size
    if y is None and model.y_embedder is not None:
        y = torch.full((x.shape[0],), model.null_class, dtype=torch.long, device=x.device)
    c = model.t_embedder(t)
    if model.y_embedder is not None:
        c = c + model.y_embedder.embedding_table(y)
    c = F.silu(c)
    h = model.x_embedder(x) + model.pos_embed.to(x.dtype)
    deepest = int(depth.max())  # the reference picks the depth on the host too
    picked = torch.zeros_like(h)
    for i in range(deepest):
        w, b = model.block_adaLN(i)
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = F.linear(c, w, b).chunk(6, dim=1)
        block = model.blocks[i]
        h = h + g_msa[:, None] * _attention(block, _modulate(h, s_msa, sc_msa, model.eps), model.num_heads)
        h = h + g_mlp[:, None] * _mlp(block, _modulate(h, s_mlp, sc_mlp, model.mlp_norm_eps))
        picked = torch.where((depth == i + 1)[:, None, None], h, picked)
    w, b = model.final_adaLN()
    shift, scale = F.linear(c, w, b).chunk(2, dim=1)
    out = model.final_layer.linear(_modulate(picked, shift, scale, model.eps))
    return L.unpatchify(out, model.patch_size, model.out_channels)


class NaiveExitModel(torch.nn.Module):
    """Wraps a DiT so that ``model(x, t, y, depth=tensor)`` runs :func:`naive_exit_forward` (same parameters)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.null_class, self.num_classes, self.num_blocks = model.null_class, model.num_classes, model.num_blocks

    def forward(self, x, t, y=None, depth=None):
        if depth is None or isinstance(depth, int):
            return self.model(x, t, y, depth=depth)
        return naive_exit_forward(self.model, x, t, y, depth)
