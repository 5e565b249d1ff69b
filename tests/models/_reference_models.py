"""Plain, independent implementations to test the models against: nothing imported from eekernels.

- ``RefDiT``: the facebookresearch/DiT layout and math (explicit softmax attention, nn.LayerNorm, chunked
  adaLN per block), with ASE early exit: ``blocks[:depth]`` then the final layer.
- ``RefUViT``: the baofff/U-ViT layout and math, with ASE early exit: in_blocks and mid_block always,
  ``out_blocks[:depth - len(in_blocks) - 1]`` fully, later out blocks only their ``skip_linear``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def glide_timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def mae_pos_embed(dim, grid):
    """MAE's numpy 2-D sin-cos embedding, (grid*grid, dim)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))  # w first
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)


class MathAttention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------------
# facebookresearch/DiT
# --------------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefDiTBlock(nn.Module):
    def __init__(self, D, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = MathAttention(D, heads, True)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = TimmMlp(D, int(D * mlp_ratio), nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, c1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, c2))


class RefDiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=4, num_heads=3,
                 mlp_ratio=4.0, num_classes=10, learn_sigma=True):
        super().__init__()
        self.p, self.out_channels = patch_size, in_channels * (2 if learn_sigma else 1)
        D = hidden_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, D, patch_size, stride=patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, D)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.from_numpy(mae_pos_embed(D, grid)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(RefDiTBlock(D, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(D, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, t, y, depth=None, skipped=None):
        """``skipped``: added to the residual stream after the ``depth`` blocks (what the other blocks add)."""
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        temb = self.t_embedder.mlp(glide_timestep_embedding(t, 256).to(x.dtype))
        c = temb + self.y_embedder.embedding_table(y)
        for block in self.blocks[: len(self.blocks) if depth is None else depth]:
            x = block(x, c)
        if skipped is not None:
            x = x + skipped
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        c, p = self.out_channels, self.p
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)


# --------------------------------------------------------------------------------------------------
# baofff/U-ViT
# --------------------------------------------------------------------------------------------------
class RefUViTBlock(nn.Module):
    def __init__(self, D, heads, qkv_bias, skip):
        super().__init__()
        self.norm1 = nn.LayerNorm(D)
        self.attn = MathAttention(D, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(D)
        self.mlp = TimmMlp(D, 4 * D, nn.GELU())
        self.skip_linear = nn.Linear(2 * D, D) if skip else None

    def forward(self, x, skip=None, full=True):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        if not full:
            return x
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefUViT(nn.Module):
    def __init__(self, img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=4, num_heads=4, qkv_bias=False,
                 mlp_time_embed=False, num_classes=-1, conv=True):
        super().__init__()
        D = embed_dim
        self.embed_dim, self.in_chans, self.p = D, in_chans, patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, D, patch_size, stride=patch_size)
        self.time_embed = (nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D))
                           if mlp_time_embed else nn.Identity())
        self.label_emb = nn.Embedding(num_classes, D) if num_classes > 0 else None
        self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (img_size // patch_size) ** 2, D))
        self.in_blocks = nn.ModuleList(RefUViTBlock(D, num_heads, qkv_bias, False) for _ in range(depth // 2))
        self.mid_block = RefUViTBlock(D, num_heads, qkv_bias, False)
        self.out_blocks = nn.ModuleList(RefUViTBlock(D, num_heads, qkv_bias, True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, patch_size ** 2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

    def forward(self, x, timesteps, y=None, depth=None):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        B, L, D = x.shape
        time_token = self.time_embed(glide_timestep_embedding(timesteps, self.embed_dim).to(x.dtype)).unsqueeze(1)
        x = torch.cat((time_token, x), dim=1)
        if y is not None:
            x = torch.cat((self.label_emb(y).unsqueeze(1), x), dim=1)
        x = x + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        n_full = (depth if depth is not None else 10**9) - len(self.in_blocks) - 1
        for k, blk in enumerate(self.out_blocks):
            x = blk(x, skips.pop(), full=k < n_full)
        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        h = w = int(L ** 0.5)
        p, c = self.p, self.in_chans
        x = x.reshape(B, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, h * p, w * p)
        return self.final_layer(x)


def randomize_(module: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Give EVERY parameter fresh random values (zero-initialized adaLN/output layers would hide errors). Weights of fan-in n get std/sqrt(n) scale so activations stay O(1) through the layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() >= 2 else 1
            scale = std / math.sqrt(fan_in) if p.dim() >= 2 else std
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale + (0.0 if p.dim() >= 2 else 0.1))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def assert_bf16_autocast_close(model, ref, x, t, y, depth=None):
    """``model`` under CPU bfloat16 autocast: bfloat16 out, within 2e-2 of its float32 output and, at one depth
    for all samples, within twice the error of ``ref`` (plain torch) under the same autocast."""
    want = model(x, t, y, depth=depth)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, depth=depth)
        base = None if isinstance(depth, torch.Tensor) else ref(x, t, y, depth=depth)
    err = rel_err(out, want)
    assert out.dtype == torch.bfloat16 and err <= 2e-2, err
    if base is not None:
        assert err <= 2 * rel_err(base, want) + 1e-3, (err, rel_err(base, want))
