"""The model scaffold (eekernels/models/scaffold.py): depth plan, sorted prefixes, exit cache, the by-depth loop.

``Toy`` is a whole family declared in this file alone (a 2-block adaLN MLP "transformer"): it runs full depth,
an int depth, a per-sample depth and the exit cache through the scaffold and through ``eekernels.sample``.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eekernels
from eekernels import ExitSchedule
from eekernels.models.cache import ExitCache
from eekernels.models.scaffold import Carry, NextNorm, ScoreModel, add_and_norm, plan_depth
from eekernels.ops import modulated_layer_norm

EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# The toy family: blocks, early-exit rule (the scaffold's default), no converters
# --------------------------------------------------------------------------------------------------
class ToyBlock(nn.Module):
    """``x + gate * fc(modulate(norm(x)))``; the next norm fused into the add."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, carry, gate, next_norm):
        return Carry(*add_and_norm(carry.x, self.fc(carry.h), gate, next_norm))


class Toy(ScoreModel):
    family = "Toy"

    def __init__(self, channels=2, size=4, dim=8, blocks=2):
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.input_size, self.dim, self.num_blocks, self.min_depth = size, dim, blocks, 1
        self.num_classes = self.null_class = None
        self.learn_sigma = False
        self.proj_in = nn.Linear(channels, dim)
        self.t_proj = nn.Linear(dim, dim)
        self.ada = nn.Linear(dim, (2 + 3 * blocks) * dim)  # head shift/scale, then (shift, scale, gate) per block
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(blocks))
        self.proj_out = nn.Linear(dim, channels)
        self.depths_run = []

    def conditioning(self, t):
        freq = eekernels.models._layers.timestep_embedding(t, self.dim)
        return self.ada(F.silu(self.t_proj(freq))).view(t.shape[0], 2 + 3 * self.num_blocks, self.dim).unbind(1)

    def embed(self, x, t, y, depth):
        self.depths_run.append(depth)
        tokens = self.proj_in(x.flatten(2).transpose(1, 2))
        cond = self.conditioning(t)
        return Carry(tokens, modulated_layer_norm(tokens, cond[2], cond[3], EPS)), cond

    def block_inputs(self, cond, i, n):
        return cond[4 + 3 * i][:n]

    def entry_norm(self, cond, j):
        return NextNorm(EPS, shift=cond[2 + 3 * j], scale=cond[3 + 3 * j])

    def head_norm(self, cond):
        return NextNorm(EPS, shift=cond[0], scale=cond[1])

    def head(self, h, cond):
        return self.proj_out(h)

    def unembed(self, out, cond):
        return out.transpose(1, 2).reshape(out.shape[0], self.in_channels, self.input_size, self.input_size)


def reference(model, x, t, depth):
    """The toy in plain torch, one depth for the batch."""
    cond = model.conditioning(t)

    def modulate(v, shift, scale):
        return F.layer_norm(v, v.shape[-1:], eps=EPS) * (1 + scale[:, None]) + shift[:, None]

    s = model.proj_in(x.flatten(2).transpose(1, 2))
    for i in range(depth):
        s = s + cond[4 + 3 * i][:, None] * model.blocks[i].fc(modulate(s, cond[2 + 3 * i], cond[3 + 3 * i]))
    return model.unembed(model.proj_out(modulate(s, cond[0], cond[1])), cond)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 4, 4, generator=g), torch.rand(batch, generator=g) * 999


# --------------------------------------------------------------------------------------------------
# Depth plan
# --------------------------------------------------------------------------------------------------
def test_plan_sorts_into_prefixes():
    plan = plan_depth("m", torch.tensor([1, 3, 2, 3]), 4, 3)
    assert plan.order.tolist() == [1, 3, 2, 0] and plan.counts == [4, 3, 2]
    assert not plan_depth("m", torch.tensor([2, 2]), 2, 3).per_sample
    with pytest.raises(ValueError, match=r"m: `depth` expected values in \[2, 3\].*got 1"):
        plan_depth("m", torch.tensor([1, 3]), 2, 3, min_depth=2)


# --------------------------------------------------------------------------------------------------
# The toy through the scaffold
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("depth", [None, 1, 2])
def test_toy_matches_plain_torch(toy, depth):
    x, t = inputs()
    out = toy(x, t, depth=depth)
    torch.testing.assert_close(out, reference(toy, x, t, depth or 2), rtol=1e-5, atol=1e-5)
    assert toy.depths_run == [depth or 2]


@torch.no_grad()
def test_toy_per_sample_depth_equals_solo_runs(toy):
    x, t = inputs(5)
    depth = torch.tensor([1, 2, 1, 2, 2])
    out = toy(x, t, depth=depth)
    for i, d in enumerate(depth.tolist()):
        torch.testing.assert_close(out[i : i + 1], toy(x[i : i + 1], t[i : i + 1], depth=d), rtol=1e-5, atol=1e-5)
    # block 0 on all 5 samples, block 1 on the 3 deepest: a mixed next norm (block 1's and the head's)
    assert toy.depths_run[0] == 2


@torch.no_grad()
def test_toy_exit_cache_records_and_replays(toy):
    x, t = inputs()
    cache = ExitCache([1, 2])
    with pytest.raises(ValueError, match="no value recorded for depth 1"):
        toy(x, t, depth=1, exit_cache=cache)
    full = toy(x, t, exit_cache=cache)
    assert cache.has(1) and not cache.has(2)  # full depth records only the exits below it
    torch.testing.assert_close(toy(x, t, depth=1, exit_cache=cache), full, rtol=1e-5, atol=1e-5)
    assert (toy(x, t, depth=1) - full).abs().max() > 1e-3  # dropping the block differs: the cache did the work
    with pytest.raises(ValueError, match="Toy: `exit_cache` expected an int depth"):
        toy(x, t, depth=torch.tensor([1, 2, 1, 2]), exit_cache=cache)


def test_toy_input_checks_name_the_family(toy):
    x, t = inputs()
    with pytest.raises(ValueError, match=r"Toy: `x` expected shape \(B, 2, 4, 4\)"):
        toy(x[:, :1], t)
    with pytest.raises(ValueError, match="Toy: `y` expected None"):
        toy(x, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Toy: `depth` expected values in \[1, 2\]"):
        toy(x, t, depth=3)


@torch.no_grad()
def test_toy_samples_with_every_exit_policy(toy):
    noise, _ = inputs(3, seed=5)
    kw = dict(sampler="ddim", steps=4, graphs=False)
    full = eekernels.sample(toy, noise, None, **kw)
    toy.depths_run.clear()
    drop = eekernels.sample(toy, noise, None, schedule=ExitSchedule.piecewise([2, 1], total_depth=2), **kw)
    assert set(toy.depths_run) == {1, 2}
    toy.depths_run.clear()
    cached = eekernels.sample(toy, noise, None, schedule=ExitSchedule.periodic(2, 1, 2), exit_policy="cache", **kw)
    assert toy.depths_run == [2, 1, 2, 1]
    for out in (full, drop, cached):
        assert out.shape == noise.shape and torch.isfinite(out).all()
    assert not torch.equal(full, drop)


# --------------------------------------------------------------------------------------------------
# Carry and NextNorm
# --------------------------------------------------------------------------------------------------
def test_next_norm_mix_and_rows():
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    mixed = NextNorm(EPS, shift=a, scale=a).mix(NextNorm(EPS, shift=b, scale=b), 1, 3)
    assert mixed.shift.tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
    assert NextNorm(EPS, shift=a, scale=b).rows(2).scale.shape == (2, 3)
    with pytest.raises(ValueError, match="NextNorm.mix: `other` expected the same affine weight"):
        NextNorm(EPS, weight=torch.ones(3)).mix(NextNorm(EPS, weight=torch.ones(3)), 1, 2)
    with pytest.raises(ValueError, match="add_and_norm: `gate` expected None"):
        add_and_norm(a, b, a, None)
    c = Carry(torch.arange(6.0).view(3, 2), None)
    assert c.rows(3) is c and c.rows(1).x.tolist() == [[0.0, 1.0]] and c.rows(1).h is None


# --------------------------------------------------------------------------------------------------
# The one timestep embedding: bit for bit the upstream formulas (facebookresearch/DiT, baofff/U-ViT, diffusers)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, shift, flip", [(256, 0, True), (72, 0, True), (256, 1, True), (33, 1, False), (320, 1, True)])
def test_timestep_embedding_is_upstream_bit_for_bit(dim, shift, flip):
    import math

    from eekernels.models._layers import timestep_embedding

    t = torch.rand(7) * 999
    half = dim // 2
    # facebookresearch/DiT and baofff/U-ViT (shift 0), diffusers' get_timestep_embedding (any shift): the same order
    exponent = -math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32)
    exponent = exponent / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    assert torch.equal(timestep_embedding(t, dim, freq_shift=shift, flip_sin_to_cos=flip), emb)
