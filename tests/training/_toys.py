"""A tiny text-conditioned ScoreModel (PixArt-like names: t_embedder, t_block, y_embedder; cross-attention to
masked caption tokens), its sorted-prefix forward, and the naive all-blocks-then-pick reference of it."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.models.condition import TextCondition
from eekernels.models.scaffold import ScoreModel


def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], 1)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.cproj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.scale_shift = nn.Parameter(torch.randn(4, d) / d ** 0.5)

    def _split(self, v):
        B, N, D = v.shape
        return v.view(B, N, self.heads, D // self.heads).transpose(1, 2)

    def forward(self, x, ctx, mask, mod):
        B, N, D = x.shape
        shift, scale, shift2, scale2 = (self.scale_shift[None] + mod.view(B, 4, D)).unbind(1)
        h = self.norm1(x) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(h).chunk(3, -1)
        o = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v))
        x = x + self.proj(o.transpose(1, 2).reshape(B, N, D))
        k, v = self.kv(ctx).chunk(2, -1)
        bias = None if mask is None else torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~mask, float("-inf"))[:, None, None, :]
        o = F.scaled_dot_product_attention(self._split(self.q(x)), self._split(k), self._split(v), attn_mask=bias)
        x = x + self.cproj(o.transpose(1, 2).reshape(B, N, D))
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + self.fc2(F.gelu(self.fc1(h)))


class ToyText(ScoreModel):
    """``ToyText(prediction="epsilon"|"flow")``: 8x8 latents, patch 2, hidden 32, 3 blocks, captions of width
    ``token_dim``; epsilon models learn sigma (2C outputs), flow models predict the velocity (C outputs)."""

    family = "ToyText"
    condition = "text"
    fixed_size = True

    def __init__(self, prediction="epsilon", in_channels=3, input_size=8, patch=2, hidden=32, depth=3, heads=2,
                 token_dim=12, pooled_dim=None, length=6):
        super().__init__()
        self.prediction = prediction
        self.in_channels, self.input_size, self.patch = in_channels, input_size, patch
        self.learn_sigma = prediction == "epsilon"
        self.out_channels = in_channels * (2 if self.learn_sigma else 1)
        self.num_blocks, self.min_depth, self.num_classes, self.null_class = depth, 1, None, None
        self.token_dim, self.pooled_dim, self.condition_extras = token_dim, pooled_dim, {}
        n = (input_size // patch) ** 2
        self.x_embedder = nn.Linear(in_channels * patch * patch, hidden)
        self.pos = nn.Parameter(torch.randn(1, n, hidden) * 0.1)
        self.t_embedder = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.t_block = nn.Linear(hidden, 4 * hidden)
        self.y_embedder = nn.Sequential(nn.Linear(token_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.pooled_embedder = None if pooled_dim is None else nn.Linear(pooled_dim, hidden)
        self.y_embedding = nn.Parameter(torch.randn(length, token_dim))  # the learned null caption
        self.blocks = nn.ModuleList(_Block(hidden, heads) for _ in range(depth))
        self.head_norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, patch * patch * self.out_channels)
        self.has_null = True

    def null_condition(self, batch, length, device=None, dtype=None):
        if not self.has_null:
            raise ValueError("ToyText: no learned null condition; pass negative-prompt embeddings")
        if length != self.y_embedding.shape[0]:
            raise ValueError(f"ToyText.null_condition: `length` expected {self.y_embedding.shape[0]}, got {length}")
        tok = self.y_embedding[None].expand(batch, -1, -1).to(device=device, dtype=dtype)
        return TextCondition(tok, torch.ones(batch, length, dtype=torch.bool, device=tok.device))

    def _patchify(self, x):
        B, C, H, W = x.shape
        p = self.patch
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)

    def _unpatchify(self, tok):
        B, N, _ = tok.shape
        p, s, C = self.patch, self.input_size // self.patch, self.out_channels
        return tok.view(B, s, s, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, s * p, s * p)

    def forward_sorted(self, x, t, y, plan, exit_cache):
        c = self.t_embedder(_sinusoid(t, 64))
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(y.pooled)
        mod = self.t_block(F.silu(c))
        ctx, mask = self.y_embedder(y.tokens), y.mask
        h = self.x_embedder(self._patchify(x)) + self.pos
        d, counts, outs = plan.depth, plan.counts, []
        for i in range(d):
            n, n_next = counts[i], (counts[i + 1] if i + 1 < d else 0)
            h = self.blocks[i](h[:n], ctx[:n], None if mask is None else mask[:n], mod[:n])
            if n_next < n:
                outs.append(self.head(self.head_norm(h[n_next:n])))
        return self._unpatchify(torch.cat(outs[::-1]) if len(outs) > 1 else outs[0])


def toy_text(prediction="epsilon", seed=0, **kw) -> ToyText:
    torch.manual_seed(seed)
    return ToyText(prediction, **kw).eval()


class NaiveText(nn.Module):
    """The naive reference: the whole batch through all blocks up to each depth, then each sample's prefix
    output picked by its depth (the same parameters as ``model``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_blocks = model.num_blocks

    def forward(self, x, t, y=None, depth=None):
        if depth is None or isinstance(depth, int):
            return self.model(x, t, y, depth=depth)
        out = None
        for d in range(1, int(depth.max()) + 1):
            full = self.model(x, t, y, depth=d)  # every sample through blocks[:d]
            pick = (depth == d).view(-1, 1, 1, 1)
            out = torch.where(pick, full, full.new_zeros(()) if out is None else out)
        return out


def caption_condition(batch, token_dim=12, length=6, pooled_dim=None, seed=0) -> TextCondition:
    """Random captions with a ragged mask (every row at least one real token)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(batch, length, token_dim, generator=g)
    lens = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None] < lens[:, None]
    pooled = None if pooled_dim is None else torch.randn(batch, pooled_dim, generator=g)
    return TextCondition(tok, mask, pooled)
