"""Small deterministic stand-ins with the eekernels model and schedule contracts, for fast sampler tests.

ToyModel(x, t, y=None, depth=None, exit_cache=None): a per-pixel MLP whose output depends on x, t, y and on
how many of its residual blocks run; it records every call's depth and timesteps. ToySchedule: piecewise
constant depth over equal bins of t, with ``depth(t)``, ``plan(timesteps)`` and ``total_depth``. TextToy: a
text-conditioned ScoreModel (TextCondition input, null condition or none, epsilon or flow prediction);
``text_condition`` draws random captions.
"""
from __future__ import annotations

import torch
from torch import nn

from eekernels.models import TextCondition
from eekernels.models.scaffold import ScoreModel


class ToyModel(nn.Module):
    """Tiny score network: 1x1 'convs' (linears over channels), t and label embeddings, residual tanh blocks."""

    min_reuse_depth = 0  # with an exit cache, depth 0 runs no block (its snapshots start at block 0's input)

    def __init__(self, channels=3, num_blocks=4, num_classes=5, learn_sigma=False, input_size=5, hidden=16,
                 seed=0, deep_ignores_input=False, deep_poly_in_t=None, deep_from=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_channels, self.num_blocks, self.input_size = channels, num_blocks, input_size
        self.num_classes = num_classes
        self.null_class = num_classes  # the extra embedding row, as DiT with class dropout
        self.learn_sigma = learn_sigma
        self.out_channels = channels * (2 if learn_sigma else 1)
        # deep_ignores_input: the blocks past the first one add a value that depends only on y, so what an
        # exit cache records at a full-depth call is exactly what the skipped blocks add later.
        self.deep_ignores_input = deep_ignores_input
        # deep_poly_in_t=n: the blocks past the first one add a value that is a polynomial of degree n in t (and
        # depends on y), so a forecast of order n from earlier full calls is exact.
        self.deep_poly_in_t = deep_poly_in_t
        self.deep_from = deep_from  # the first of those blocks (0: the whole stack, for depth-0 forecasts)
        self.inp = nn.Linear(channels, hidden)
        self.temb = nn.Linear(4, hidden)
        self.yemb = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        self.out = nn.Linear(hidden, self.out_channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / max(1, p.shape[-1]) ** 0.5))
        self.calls: list[tuple[object, torch.Tensor]] = []

    def forward(self, x, t, y=None, depth=None, exit_cache=None):
        self.calls.append((depth, t.detach().clone()))
        d = self.num_blocks if depth is None else int(depth)
        tf = t.to(self.temb.weight.dtype)[:, None] / 1000.0  # float64 too, for exact references
        temb = self.temb(torch.cat([torch.sin(3 * tf), torch.cos(2 * tf), tf, tf * tf], 1))
        h = self.inp(x.movedim(1, -1)) + temb[:, None, None, :]
        label = torch.zeros_like(h[:, :1, :1, :])
        if self.yemb is not None:
            lab = y if y is not None else torch.full((x.shape[0],), self.null_class, device=x.device)
            label = self.yemb(lab)[:, None, None, :]
            h = h + label
        snapshots = {}
        for i in range(d):
            snapshots[i] = h
            if self.deep_poly_in_t is not None and i >= self.deep_from:
                h = h + 0.3 * torch.tanh(self.blocks[i](label)) * (tf ** self.deep_poly_in_t + 0.5 * tf)[:, None, None]
            elif self.deep_ignores_input and i >= self.deep_from:
                h = h + 0.3 * torch.tanh(self.blocks[i](label))
            else:
                h = h + 0.5 * torch.tanh(self.blocks[i](h))
        if exit_cache is not None:
            if d == self.num_blocks:
                for k in exit_cache.depths:
                    exit_cache.store(k, h - snapshots[k])
            else:
                h = h + exit_cache.load(d)
        o = self.out(h).movedim(-1, 1)
        if self.learn_sigma:
            eps, v = o.split(self.in_channels, 1)
            o = torch.cat([eps, torch.tanh(v)], 1)  # learned-range variance input lies in [-1, 1]
        return o.to(x.dtype)


class ToySchedule:
    """Exit schedule contract: depth(t) piecewise constant over len(depths) equal bins of [0, num_timesteps)."""

    def __init__(self, depths, num_timesteps=1000):
        self.table = torch.tensor(depths, dtype=torch.int64)
        self.num_timesteps = num_timesteps
        self.total_depth = int(self.table.max())

    def depth(self, t):
        t = torch.as_tensor(t)
        n = len(self.table)
        bins = (t.double() * n / self.num_timesteps).floor().long().clamp(0, n - 1)
        return self.table.to(t.device)[bins]

    def plan(self, timesteps):
        return self.depth(torch.as_tensor(timesteps))


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class TextToy(ScoreModel):
    """A tiny text-conditioned ScoreModel (``condition = "text"``) on the scaffold's input checks and depth plan.

    Per pixel: h = inp(x) + temb(t) + ctx, ctx = proj(masked mean of the tokens) + pool(pooled) [+ guid(g)];
    then residual tanh blocks on the leading (depth-sorted) rows, then a linear head. ``prediction`` "epsilon"
    or "flow"; ``null=True`` gives a learned null caption (PixArt-like ``null_condition``), else null_condition
    raises (SD3/FLUX-like). Records every call's (depth, t, tokens) in ``calls``.
    """

    family = "TextToy"
    condition = "text"
    num_classes = None
    null_class = None
    learn_sigma = False
    min_depth = 1

    def __init__(self, channels=3, num_blocks=4, token_dim=6, pooled_dim=4, input_size=5, hidden=16, seed=0,
                 prediction="epsilon", null=True, guidance=False, max_length=12):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.in_channels = self.out_channels = channels
        self.num_blocks, self.input_size = num_blocks, input_size
        self.token_dim, self.pooled_dim, self.prediction = token_dim, pooled_dim, prediction
        self.condition_extras = {"guidance": ()} if guidance else {}
        self.inp = nn.Linear(channels, hidden)
        self.temb = nn.Linear(4, hidden)
        self.proj = nn.Linear(token_dim, hidden)
        self.pool = nn.Linear(pooled_dim, hidden) if pooled_dim is not None else None
        self.guid = nn.Linear(1, hidden) if guidance else None
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_blocks))
        self.out = nn.Linear(hidden, channels)
        self.y_embedding = nn.Parameter(torch.empty(max_length, token_dim)) if null else None
        self.null_pooled = nn.Parameter(torch.empty(pooled_dim)) if null and pooled_dim is not None else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 / max(1, p.shape[-1]) ** 0.5))
        self.calls: list = []

    def null_condition(self, batch, length, device=None, dtype=None):
        if self.y_embedding is None:
            raise ValueError("TextToy: no null condition; pass negative-prompt embeddings (negative=...)")
        if length > self.y_embedding.shape[0]:
            raise ValueError(f"TextToy: null_condition length expected <= {self.y_embedding.shape[0]}, got {length}")
        dev = device or self.y_embedding.device
        tok = self.y_embedding[:length].to(device=dev, dtype=dtype or self.y_embedding.dtype)
        pooled = None
        if self.null_pooled is not None:
            pooled = self.null_pooled.to(device=dev, dtype=dtype or self.null_pooled.dtype).expand(batch, -1)
        return TextCondition(tok.expand(batch, -1, -1), torch.ones(batch, length, dtype=torch.bool, device=dev),
                             pooled)

    def forward_sorted(self, x, t, y, plan, exit_cache):
        self.calls.append((plan.depth, t.detach().clone(), y.tokens.detach().clone()))
        w = self.inp.weight.dtype
        tf = t.to(w)[:, None] / 1000.0
        temb = self.temb(torch.cat([torch.sin(3 * tf), torch.cos(2 * tf), tf, tf * tf], 1))
        tok = y.tokens.to(w)
        m = torch.ones(tok.shape[:2], dtype=w, device=tok.device) if y.mask is None else y.mask.to(w)
        ctx = self.proj((tok * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1))
        if self.pool is not None:
            ctx = ctx + self.pool(y.pooled.to(w))
        if self.guid is not None:
            ctx = ctx + self.guid(y.extra["guidance"].to(w)[:, None])
        h = self.inp(x.movedim(1, -1).to(w)) + (temb + ctx)[:, None, None, :]
        for i in range(plan.depth):
            n = plan.counts[i]
            h = torch.cat([h[:n] + 0.5 * torch.tanh(self.blocks[i](h[:n])), h[n:]])
        return self.out(h).movedim(-1, 1).to(x.dtype)


def text_condition(batch=2, length=5, token_dim=6, pooled_dim=4, seed=0, mask=True, guidance=None, dtype=torch.float32):
    """Fresh random caption embeddings (a ragged mask: sample i has length - i real tokens, at least 1)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(batch, length, token_dim, generator=g, dtype=dtype)
    m = None
    if mask:
        m = torch.arange(length)[None, :] < (length - torch.arange(batch)[:, None]).clamp_min(1)
    pooled = torch.randn(batch, pooled_dim, generator=g, dtype=dtype) if pooled_dim is not None else None
    extra = {} if guidance is None else {"guidance": torch.full((batch,), float(guidance), dtype=dtype)}
    return TextCondition(tok, m, pooled, extra)
