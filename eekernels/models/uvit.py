"""U-ViT (baofff/U-ViT: time and label tokens, long skips between in_blocks and out_blocks) with early exit.

Blocks are pre-norm: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``, and each out block first merges
its encoder skip, ``x = skip_linear(cat([x, skip]))``. The forward fuses every residual add into the
following LayerNorm (``gated_residual_norm`` with the affine weight and no gate) where that norm comes
next, and the fc1 GELU into its GEMM (``linear_act``).

Early exit (ASE): ``depth`` counts the blocks whose attention and MLP run, in the order in_blocks, mid_block,
out_blocks. in_blocks and mid_block always run (``min_depth = len(in_blocks) + 1``);
``out_blocks[:depth - len(in_blocks) - 1]`` run fully; every later out block applies only its
``skip_linear``, then the output head (norm, decoder_pred, optional conv) runs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from eekernels.models import _layers as L
from eekernels.models import convert
from eekernels.models.scaffold import Carry, NextNorm, ScoreModel, add_and_norm, cache_mode
from eekernels.ops import layer_norm

# --------------------------------------------------------------------------------------------------
# Configs (baofff/U-ViT configs/*.py; ``depth`` as there: len(in_blocks) = len(out_blocks) = depth // 2)
# --------------------------------------------------------------------------------------------------
UVIT_CONFIGS = {
    # configs/cifar10_uvit.py (unconditional, 32x32 pixels)
    "U-ViT-S/2": dict(input_size=32, patch_size=2, in_channels=3, embed_dim=512, depth=12, num_heads=8,
                      qkv_bias=False, mlp_time_embed=False, num_classes=None, conv=True),
    # configs/imagenet256_uvit.py (ImageNet 256, 32x32x4 latents)
    "U-ViT-L/2": dict(input_size=32, patch_size=2, in_channels=4, embed_dim=1024, depth=20, num_heads=16,
                      qkv_bias=False, mlp_time_embed=False, num_classes=1000, conv=True),
    # configs/imagenet256_uvit_huge.py (ImageNet 256, 32x32x4 latents)
    "U-ViT-H/2": dict(input_size=32, patch_size=2, in_channels=4, embed_dim=1152, depth=28, num_heads=16,
                      qkv_bias=False, mlp_time_embed=False, num_classes=1000, conv=False),
    # configs/imagenet512_uvit_huge.py (ImageNet 512, 64x64x4 latents)
    "U-ViT-H/4": dict(input_size=64, patch_size=4, in_channels=4, embed_dim=1152, depth=28, num_heads=16,
                      qkv_bias=False, mlp_time_embed=False, num_classes=1000, conv=False),
}


# --------------------------------------------------------------------------------------------------
# Modules (named as baofff/U-ViT, so checkpoints map key for key; PatchEmbed, Attention and Mlp are the
# timm-layout ones in _layers, shared with DiT)
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block; out blocks also hold the ``skip_linear`` that merges the encoder skip."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = L.Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = L.Mlp(dim, int(dim * mlp_ratio), "gelu")  # erf GELU, as timm's nn.GELU()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def merge_skip(self, x, skip):
        """``skip_linear(cat([x, skip]))`` in x's dtype (under autocast the GEMM gives the autocast dtype)."""
        return self.skip_linear(torch.cat([x, skip], dim=-1)).to(x.dtype)

    def forward(self, carry: Carry, next_norm: NextNorm | None = None) -> Carry:
        """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``; each add fused with the norm after it
        (``carry.h``, when given, is ``norm1(x)``; ``next_norm`` None: the result is not normed)."""
        x, h = carry.x, carry.h
        if h is None:
            h = layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        x, h = add_and_norm(x, self.attn(h), None, NextNorm.of(self.norm2))
        return Carry(*add_and_norm(x, self.mlp(h), None, next_norm))


# --------------------------------------------------------------------------------------------------
# U-ViT
# --------------------------------------------------------------------------------------------------
class UViT(ScoreModel):
    """U-ViT with early exit over its decoder blocks: ``model(x, t, y, depth)``."""

    family = "UViT"
    prediction = "epsilon"  # baofff's models predict the noise

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        embed_dim: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int | None = 1000,
        null_class_embedding: bool = True,
        conv: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"UViT: `num_heads` expected to divide embed_dim={embed_dim}, got {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"UViT: `input_size` expected a multiple of patch_size={patch_size}, got {input_size}")
        if depth < 2:
            raise ValueError(f"UViT: `depth` expected >= 2 (depth // 2 in_blocks and out_blocks), got {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.out_channels, self.learn_sigma = in_channels, False
        # baofff's class-conditional models hold one more label row, the CFG null label (index num_classes).
        self.num_classes = num_classes or None
        self.null_class = num_classes if num_classes and null_class_embedding else None
        n = depth // 2
        self.num_blocks = 2 * n + 1  # in_blocks + mid_block + out_blocks
        self.min_depth = n + 1  # in_blocks and mid_block always run

        self.patch_embed = L.PatchEmbed(patch_size, in_channels, embed_dim)
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed else nn.Identity()
        )
        self.label_emb = (nn.Embedding(num_classes + bool(null_class_embedding), embed_dim)
                          if self.num_classes else None)
        self.extras = 2 if self.num_classes else 1  # [label token,] time token, then patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (input_size // patch_size) ** 2, embed_dim))
        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(n))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(n))
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """baofff's init: truncated-normal(0.02) linears and pos_embed, zero biases, unit LayerNorms."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- forward: U-ViT's early-exit rule
    def forward_sorted(self, x, t, y, plan, exit_cache):
        """Encoder blocks on every sample; out blocks merge their skip for every sample, then run attention and
        MLP on the depth-sorted prefix that goes on. Exit cache: ``x_L - skip_only(x_j)`` per exit depth j."""
        B, n_in = x.shape[0], len(self.in_blocks)
        tokens = self.patch_embed(x)
        time_token = self.time_embed(L.timestep_embedding(t, self.embed_dim).to(tokens.dtype))[:, None]
        extra = [time_token] if self.label_emb is None else [self.label_emb(y)[:, None], time_token]
        carry = Carry(torch.cat(extra + [tokens], dim=1) + self.pos_embed)

        # in_blocks and mid_block: every sample; each residual add is fused into the next norm1.
        encoder = list(self.in_blocks) + [self.mid_block]
        skips = []
        for i, block in enumerate(encoder):
            carry = block(carry, NextNorm.of(encoder[i + 1].norm1) if i + 1 < len(encoder) else None)
            if block is not self.mid_block:
                skips.append(carry.x)

        record, replay = cache_mode(exit_cache, plan.depth, self.num_blocks)
        snapshots = {}
        x, h = carry.x, None
        for k, block in enumerate(self.out_blocks):
            j = n_in + 1 + k
            if record and j in exit_cache.depths:
                snapshots[j] = x
            x = block.merge_skip(x, skips[n_in - 1 - k])
            n = plan.counts[j] if j < plan.depth else 0
            if n == 0:
                continue
            last_full = n == B and k == len(self.out_blocks) - 1 and not replay
            out = block(Carry(x[:n]), NextNorm.of(self.norm) if last_full else None)
            x, h = (out.x if n == B else torch.cat([out.x, x[n:]])), out.h

        if record:
            for j, x_j in snapshots.items():
                exit_cache.store(j, x - self._skip_only(x_j, skips, j - n_in - 1))
        if replay:  # truncated: add what the skipped blocks added at the last full call
            _, h = add_and_norm(x, exit_cache.load(plan.depth).to(x.dtype), None, NextNorm.of(self.norm))
        elif h is None:
            h = layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)
        out = self.decoder_pred(h[:, self.extras:])  # LayerNorm is per token: dropping extras first is exact
        return self.final_layer(L.unpatchify(out, self.patch_size, self.in_channels))

    def _skip_only(self, x, skips, start):
        """The truncated path from out block ``start`` on: only the skip_linears."""
        n_in = len(self.in_blocks)
        for k in range(start, len(self.out_blocks)):
            x = self.out_blocks[k].merge_skip(x, skips[n_in - 1 - k])
        return x

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_config(cls, name: str, **overrides) -> "UViT":
        """A randomly initialized U-ViT of a named config (``UVIT_CONFIGS``), e.g. ``"U-ViT-H/2"``."""
        if name not in UVIT_CONFIGS:
            raise ValueError(f"UViT: unknown config {name!r}; known: {sorted(UVIT_CONFIGS)}")
        return cls(**{**UVIT_CONFIGS[name], **overrides})

    @classmethod
    def from_checkpoint(cls, state_dict_or_path, num_heads: int | None = None, *, which: str | None = None,
                        **overrides) -> "UViT":
        """Load the baofff/U-ViT layout (``nnet.pth`` / ``nnet_ema.pth``, or this class's ``state_dict()``).

        Width, depth, patch, channels, MLP ratio, qkv bias, time MLP, label table, conv head and input size
        come from the tensor shapes; the heads from the known configs (``UVIT_CONFIGS``) or ``num_heads``.
        A label table of R rows is read as R - 1 classes plus the CFG null label (pass
        ``null_class_embedding=False`` for R classes without one). The model comes back in eval mode.
        """
        where = "UViT.from_checkpoint"
        state = L.load_state(where, state_dict_or_path, which)
        cfg = convert.uvit_config(where, state, num_heads, UVIT_CONFIGS, overrides.get("null_class_embedding", True))
        model = cls(**{**cfg, **overrides})
        L.copy_into(where, dict(model.state_dict(keep_vars=True)), state)
        return model.eval()
