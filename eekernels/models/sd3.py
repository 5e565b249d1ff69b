"""SD3 / SD3.5 (MMDiT, Stability AI) with early exit: joint attention over an image and a text stream.

The forward (``SD3.forward_sorted``, the scaffold's by-depth loop with a second stream):
1. patch tokens plus the position table cropped to the latent's grid (``pos_embed_max_size``, any H, W);
   the caption tokens through ``context_embedder``; ``temb`` = timestep MLP(sinusoid(t)) + pooled-text MLP;
2. ONE GEMM gives the adaLN modulations of every active block (both streams) and of the final layer: their
   weights are stacked in ``adaLN_weight``, final layer first, so the active ones are a row prefix;
3. per block: joint attention (the image and text q, k, v concatenated along the sequence; SD3.5's per-head
   QK RMSNorm through ``qk_norm_rope``), then per stream ``gated_residual_norm`` (gated residual + the MLP's
   modulated norm), fc1 with its tanh-GELU epilogue (``linear_act``), fc2, and a second ``gated_residual_norm``
   that already computes the NEXT block's (or the final layer's) modulated norm. SD3.5's dual-attention blocks
   (``dual_attention_layers``, diffusers' ``SD35AdaLayerNormZeroX``) add a second self-attention on the image
   stream, on ``norm(x)`` modulated with its own shift/scale, gated into the residual after the joint one;
4. the final layer's modulated norm (fused into the last block), the linear and unpatchify (any H, W).

Early exit (ASE): ``joint_blocks[:depth]`` run, then the final layer on the image stream. The text stream's
output of the last block that runs is never used, so it is not computed (the model's own last block is
``context_pre_only`` and has none); with a per-sample depth, block i updates the text stream only for the
samples that go on to block i + 1.

Conventions (diffusers' ``SD3Transformer2DModel``): ``t`` = sigma * 1000; the output is the flow velocity.
There is no learned null condition: classifier-free guidance uses the caller's negative-prompt embeddings.
Every caption token is attended (padding included, as Stability AI's and diffusers' code do), so a
``TextCondition`` mask is refused rather than silently ignored.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.models import _layers as L
from eekernels.models.convert import sd3 as convert
from eekernels.models.scaffold import Carry, NextNorm, ScoreModel, add_and_norm, cache_mode
from eekernels.ops import gated_residual_norm, modulated_layer_norm, qk_norm_rope

# --------------------------------------------------------------------------------------------------
# Configs: the released models' transformer/config.json (diffusers' SD3Transformer2DModel arguments)
# --------------------------------------------------------------------------------------------------
_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
               joint_attention_dim=4096, pooled_projection_dim=2048)
SD3_CONFIGS = {
    # stabilityai/stable-diffusion-3-medium-diffusers
    "SD3-medium": dict(_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None),
    # stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention in blocks 0-12)
    "SD3.5-medium": dict(_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    # stabilityai/stable-diffusion-3.5-large (and -large-turbo: the same transformer config)
    "SD3.5-large": dict(_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm"),
}

EPS = 1e-6  # every LayerNorm and the QK RMSNorm of SD3 / SD3.5
LAYOUTS = ("original", "diffusers")


def sd3_pos_embed(dim: int, max_size: int, base_size: int) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos table, (1, max_size**2, dim) float32: positions ``arange(M) / (M / base_size)``
    on both axes, the first half of the features embedding the column coordinate, each half ``[sin, cos]``
    (diffusers' ``get_2d_sincos_pos_embed(dim, M, base_size=sample_size // patch)``)."""
    if dim % 4:
        raise ValueError(f"SD3: the hidden size expected a multiple of 4 (2-D sin-cos positions), got {dim}")
    pos = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(p):  # (M*M,) -> (M*M, dim/2): [sin, cos]
        out = torch.outer(p.double(), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    emb = torch.cat([one_axis(cols.reshape(-1)), one_axis(rows.reshape(-1))], dim=1)
    return emb.float()[None]


# --------------------------------------------------------------------------------------------------
# Modules, named as Stability AI's mmditx.py (joint_blocks.i.{x_block,context_block}.{attn,attn2,mlp}), so the
# original layout maps key for key; the adaLN projections are stacked in SD3.adaLN_weight.
# --------------------------------------------------------------------------------------------------
class _Weight(nn.Module):
    """A per-head RMSNorm's weight (``ln_q`` / ``ln_k``), applied by ``qk_norm_rope``."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class MMAttention(nn.Module):
    """One stream's attention projections: ``qkv`` (q, k, v rows), ``proj`` (None: ``context_pre_only``) and
    SD3.5's per-head RMSNorm weights ``ln_q`` / ``ln_k`` (None: no QK-norm)."""

    def __init__(self, dim, num_heads, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.ln_q = _Weight(head_dim) if qk_norm else None
        self.ln_k = _Weight(head_dim) if qk_norm else None

    def heads(self, h: torch.Tensor):
        """q, k, v (B, H, N, Dh) of normed tokens h (B, N, D); q and k RMS-normed per head when QK-norm is on."""
        B, N, D = h.shape
        qkv = F.linear(h, self.qkv.weight, self.qkv.bias).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.unbind(2)  # (B, N, H, Dh) views, last dim contiguous
        if self.ln_q is not None:
            q, k = qk_norm_rope(q, k, self.ln_q.weight.to(q.dtype), self.ln_k.weight.to(k.dtype), eps=EPS)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k, v.transpose(1, 2)

    def project(self, o: torch.Tensor, dtype) -> torch.Tensor:
        return F.linear(o, self.proj.weight, self.proj.bias).to(dtype)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, N, Dh = o.shape
    return o.transpose(1, 2).reshape(B, N, H * Dh)


class XBlock(nn.Module):
    """The image stream of a joint block: attention, SD3.5's optional second self-attention, the MLP."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm, dual):
        super().__init__()
        self.attn = MMAttention(dim, num_heads, qk_norm)
        self.attn2 = MMAttention(dim, num_heads, qk_norm) if dual else None
        self.mlp = L.Mlp(dim, int(dim * mlp_ratio), "gelu_tanh")


class ContextBlock(nn.Module):
    """The text stream of a joint block; ``pre_only`` (the model's last block): q, k, v only."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm, pre_only):
        super().__init__()
        self.attn = MMAttention(dim, num_heads, qk_norm, pre_only=pre_only)
        self.mlp = None if pre_only else L.Mlp(dim, int(dim * mlp_ratio), "gelu_tanh")


class JointBlock(nn.Module):
    """One MMDiT block; its adaLN weights are rows of ``SD3.adaLN_weight``."""

    def __init__(self, dim, num_heads, mlp_ratio, qk_norm, dual, pre_only):
        super().__init__()
        self.x_block = XBlock(dim, num_heads, mlp_ratio, qk_norm, dual)
        self.context_block = ContextBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only)
        self.dual = dual
        self.pre_only = pre_only

    def forward(self, carry: Carry, ctx: Carry, mod: dict, keep: int, next_norm: NextNorm,
                next_ctx_norm: NextNorm | None):
        """``carry``: the image stream (x, its normed input); ``ctx``: the text stream (c, its normed input), the
        same n samples. ``mod``: this block's (n, D) modulations by name. ``keep``: how many leading samples'
        text stream the next block needs (0: none; its text output is then not computed). Returns the image
        Carry (with ``next_norm`` of its result) and the text Carry for the first ``keep`` samples (or None)."""
        x, h = carry.x, carry.h
        N = x.shape[1]
        xa = self.x_block.attn
        if self.dual:  # SD35AdaLayerNormZeroX: norm(x) modulated a second time, for the image self-attention
            h2 = modulated_layer_norm(x, mod["shift_msa2"], mod["scale_msa2"], EPS)
        q, k, v = xa.heads(h)
        qc, kc, vc = self.context_block.attn.heads(ctx.h)
        o = F.scaled_dot_product_attention(torch.cat([q, qc], 2), torch.cat([k, kc], 2), torch.cat([v, vc], 2))
        o = _merge_heads(o)  # (n, N + L, D): image tokens first
        a = xa.project(o[:, :N], x.dtype)
        if self.dual:
            x = torch.addcmul(x, mod["gate_msa"][:, None], a)
            a = self.x_block.attn2.project(_merge_heads(F.scaled_dot_product_attention(*self.x_block.attn2.heads(h2))),
                                           x.dtype)
            gate = mod["gate_msa2"]
        else:
            gate = mod["gate_msa"]
        x, hm = gated_residual_norm(x, a, gate, mod["shift_mlp"], mod["scale_mlp"], EPS)
        out = Carry(*add_and_norm(x, self.x_block.mlp(hm), mod["gate_mlp"], next_norm))
        if keep == 0:
            return out, None
        if self.pre_only:
            raise ValueError("SD3: the context_pre_only block has no text-stream output (internal: keep must be 0)")
        cb, c = self.context_block, ctx.x[:keep]
        ac = cb.attn.project(o[:keep, N:], c.dtype)
        c, hcm = gated_residual_norm(c, ac, mod["c_gate_msa"][:keep], mod["c_shift_mlp"][:keep],
                                     mod["c_scale_mlp"][:keep], EPS)
        return out, Carry(*add_and_norm(c, cb.mlp(hcm), mod["c_gate_mlp"][:keep], next_ctx_norm))


class Embedder(nn.Module):
    """Linear-SiLU-Linear (``t_embedder`` on the 256-feature timestep sinusoid, ``y_embedder`` on pooled text)."""

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, v):
        return self.mlp(v.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """The linear to patches; its modulated norm's adaLN rows are ``SD3.adaLN_weight[:2D]`` (shift, scale)."""

    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.linear = nn.Linear(dim, patch * patch * out_channels)


_X_MODS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
_X2_MODS = ("shift_msa2", "scale_msa2", "gate_msa2")
_C_MODS = tuple("c_" + m for m in _X_MODS)


# --------------------------------------------------------------------------------------------------
# SD3
# --------------------------------------------------------------------------------------------------
class SD3(ScoreModel):
    """SD3 / SD3.5 MMDiT with early exit: ``model(x, t, y, depth)`` runs ``joint_blocks[:depth]``.

    ``x`` (B, in_channels, H, W) latents, H and W multiples of the patch with at most ``pos_embed_max_size``
    patches a side; ``t`` = sigma * 1000; ``y`` a ``TextCondition`` with ``tokens`` (B, L, joint_attention_dim)
    (CLIP-L/G + T5 hidden states) and ``pooled`` (B, pooled_projection_dim), no mask. Returns the velocity.
    Constructor arguments are diffusers' ``SD3Transformer2DModel``'s (plus ``mlp_ratio``, 4 in every release).
    """

    family = "SD3"
    condition = "text"
    accepts_mask = False  # attends to every caption token (forward refuses `y.mask`); the trainer drops masks
    prediction = "flow"
    fixed_size = False
    condition_extras: dict = {}

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int | None = None,
        pooled_projection_dim: int = 2048,
        out_channels: int | None = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers=(),
        qk_norm: str | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        D = num_attention_heads * attention_head_dim
        if num_layers < 1:
            raise ValueError(f"SD3: `num_layers` expected >= 1 blocks, got {num_layers}")
        if caption_projection_dim is not None and caption_projection_dim != D:
            raise ValueError(f"SD3: `caption_projection_dim` expected the hidden size num_attention_heads * "
                             f"attention_head_dim = {D} (the text stream shares the blocks' width), got "
                             f"{caption_projection_dim}")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3: `qk_norm` expected None (SD3) or 'rms_norm' (SD3.5), got {qk_norm!r}")
        dual = tuple(sorted({int(i) for i in dual_attention_layers}))
        if any(i < 0 or i >= num_layers for i in dual):
            raise ValueError(f"SD3: `dual_attention_layers` expected block indices in [0, {num_layers}), got {dual}")
        if not pos_embed_max_size or pos_embed_max_size < 1:
            raise ValueError(f"SD3: `pos_embed_max_size` expected a positive int (every released SD3 / SD3.5 sets "
                             f"it), got {pos_embed_max_size!r}")
        self.sample_size, self.patch_size, self.in_channels = sample_size, patch_size, in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.hidden_size, self.num_heads, self.head_dim = D, num_attention_heads, attention_head_dim
        self.num_blocks, self.min_depth, self.min_reuse_depth = num_layers, 1, 0
        self.joint_attention_dim, self.pooled_projection_dim = joint_attention_dim, pooled_projection_dim
        self.token_dim, self.pooled_dim = joint_attention_dim, pooled_projection_dim
        self.pos_embed_max_size, self.dual_attention_layers, self.qk_norm = pos_embed_max_size, dual, qk_norm
        self.mlp_ratio = mlp_ratio
        self.input_size, self.input_multiple = None, patch_size
        self.learn_sigma, self.num_classes, self.null_class = False, None, None
        self.source_layout = "original"  # what state_dict_in() writes by default: the layout a loader read

        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, D, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sd3_pos_embed(D, pos_embed_max_size, sample_size // patch_size))
        self.t_embedder = Embedder(256, D)
        self.y_embedder = Embedder(pooled_projection_dim, D)
        self.context_embedder = nn.Linear(joint_attention_dim, D)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, num_attention_heads, mlp_ratio, qk_norm is not None, i in dual, i == num_layers - 1)
            for i in range(num_layers)
        )
        self.final_layer = FinalLayer(D, patch_size, self.out_channels)
        # Stacked adaLN, in (D,)-chunks: the final layer's 2 (shift, scale), then per block the image stream's
        # 6 (9 with dual attention) and the text stream's 6 (2: shift, scale, for the context_pre_only block).
        self._chunks, at = [], 2
        for i in range(num_layers):
            nx, nc = 9 if i in dual else 6, 2 if i == num_layers - 1 else 6
            self._chunks.append((at, nx, at + nx, nc))
            at += nx + nc
        self.adaLN_weight = nn.Parameter(torch.empty(at * D, D))
        self.adaLN_bias = nn.Parameter(torch.empty(at * D))
        self.initialize_weights()

    @property
    def blocks(self):
        """The joint blocks (what ``depth`` counts)."""
        return self.joint_blocks

    # ---------------------------------------------------------------- init and parameter views
    def initialize_weights(self) -> None:
        """xavier linears, N(0, 0.02) embedders, zero adaLN and output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for p in (self.adaLN_weight, self.adaLN_bias, self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def _rows(self, start: int, count: int):
        D = self.hidden_size
        return self.adaLN_weight[start * D:(start + count) * D], self.adaLN_bias[start * D:(start + count) * D]

    def block_adaLN(self, i: int) -> dict:
        """Views (not copies) of block i's adaLN rows: ``{"x": (weight, bias), "context": (weight, bias)}``, in
        Stability AI's chunk order (x: shift, scale, gate of attention, of the MLP, then of attn2; the
        context_pre_only block's text stream: shift, scale)."""
        xo, nx, co, nc = self._chunks[i]
        return {"x": self._rows(xo, nx), "context": self._rows(co, nc)}

    def final_adaLN(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the final layer's adaLN (2D, D) weight and (2D,) bias (shift, scale)."""
        return self._rows(0, 2)

    # ---------------------------------------------------------------- forward
    def null_condition(self, batch: int, length: int, device=None, dtype=None):
        raise ValueError("SD3: there is no learned null condition; pass the negative-prompt embeddings (the text "
                         "encoders' output for the empty or negative prompt, tokens and pooled) as the "
                         "unconditional TextCondition")

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre ``h`` x ``w`` crop of the (M, M) position table, (1, h*w, D)."""
        M = self.pos_embed_max_size
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.view(M, M, -1)[top:top + h, left:left + w]
        return table.reshape(1, h * w, -1)

    def _check(self, x, y):
        H, W = x.shape[-2:]
        h, w, M = H // self.patch_size, W // self.patch_size, self.pos_embed_max_size
        if h > M or w > M:
            raise ValueError(f"SD3: `x` expected at most pos_embed_max_size={M} patches a side (H, W <= "
                             f"{M * self.patch_size}), got {tuple(x.shape)}")
        if y.mask is not None:
            raise ValueError("SD3: `y.mask` expected None: SD3 attends to every caption token, padding included "
                             "(as Stability AI's and diffusers' code do); pass the padded embeddings without a mask")
        return h, w

    def embed(self, x, t, y, depth):
        """Both streams, their first normed inputs, and in one GEMM the modulations of the ``depth`` active
        blocks and of the final layer, as (B, D) chunks."""
        h, w = self._check(x, y)
        B, D, dt = x.shape[0], self.hidden_size, x.dtype
        # pos_embed first: the sum takes its contiguous layout, not the patches' transposed one.
        tokens = self.cropped_pos_embed(h, w).to(dt) + L.patchify(x, self.x_embedder.proj.weight,
                                                                  self.x_embedder.proj.bias).to(dt)
        ctx = self.context_embedder
        c = F.linear(y.tokens.to(ctx.weight.dtype), ctx.weight, ctx.bias).to(dt)
        temb = self.t_embedder(L.timestep_embedding(t, 256)) + self.y_embedder(y.pooled)
        xo, nx, co, nc = self._chunks[depth - 1]
        rows = (co + nc) * D
        mods = F.linear(F.silu(temb), self.adaLN_weight[:rows], self.adaLN_bias[:rows]).to(dt)
        chunks = mods.view(B, co + nc, D).unbind(1)
        cond = dict(chunks=chunks, grid=(h, w))
        first = self._chunks[0]
        carry = Carry(tokens, modulated_layer_norm(tokens, chunks[first[0]], chunks[first[0] + 1], EPS))
        ctx_carry = Carry(c, modulated_layer_norm(c, chunks[first[2]], chunks[first[2] + 1], EPS))
        return carry, ctx_carry, cond

    def block_inputs(self, cond, i, n) -> dict:
        ch = cond["chunks"]
        xo, nx, co, nc = self._chunks[i]
        names = _X_MODS + (_X2_MODS if nx == 9 else ())
        mod = {name: ch[xo + j][:n] for j, name in enumerate(names)}
        if nc == 6:
            mod.update({name: ch[co + j][:n] for j, name in enumerate(_C_MODS)})
        return mod

    def entry_norm(self, cond, j) -> NextNorm:
        xo = self._chunks[j][0]
        return NextNorm(EPS, shift=cond["chunks"][xo], scale=cond["chunks"][xo + 1])

    def context_norm(self, cond, j) -> NextNorm:
        co = self._chunks[j][2]
        return NextNorm(EPS, shift=cond["chunks"][co], scale=cond["chunks"][co + 1])

    def head_norm(self, cond) -> NextNorm:
        return NextNorm(EPS, shift=cond["chunks"][0], scale=cond["chunks"][1])

    def head(self, h, cond):
        return self.final_layer.linear(h)

    def unembed(self, out, cond):
        """(B, h*w, p*p*C) with features ordered (p, q, C) -> (B, C, h*p, w*p)."""
        (h, w), p, C = cond["grid"], self.patch_size, self.out_channels
        out = out.reshape(out.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(out.shape[0], C, h * p, w * p)

    def forward_sorted(self, x, t, y, plan, exit_cache):
        """The scaffold's by-depth loop with the text stream carried along (see the module docstring).

        Block i runs on the first ``plan.counts[i]`` samples; those whose depth is i + 1 leave through the head
        right after it; the text stream is updated only for the samples block i + 1 runs on. Exit cache: the
        full-depth call stores ``x_L - x_k`` (image stream) per exit depth k; a call at depth k adds it back.
        """
        d, counts = plan.depth, plan.counts
        carry, ctx, cond = self.embed(x, t, y, d)
        record, replay = cache_mode(exit_cache, d, self.num_blocks)
        snapshots, outs = {}, []
        if record and 0 in exit_cache.depths:  # depth 0: the whole stack's part
            snapshots[0] = carry.x
        for i, block in zip(range(d), self.joint_blocks):
            n, n_next = counts[i], (counts[i + 1] if i + 1 < d else 0)
            keep = n_next if not block.pre_only else 0
            next_ctx = self.context_norm(cond, i + 1).rows(keep) if keep else None
            carry, ctx = block(carry.rows(n), ctx.rows(n), self.block_inputs(cond, i, n), keep,
                               self._next_norm(cond, i + 1, n_next, n), next_ctx)
            if n_next < n and not replay:  # samples n_next..n exit here
                outs.append(self.head(carry.h[n_next:n], cond))
            if record and (i + 1) in exit_cache.depths:
                snapshots[i + 1] = carry.x
        return self.exit_outputs(carry, snapshots, outs, record, replay, d, cond, exit_cache)

    # ---------------------------------------------------------------- constructors and layouts
    @classmethod
    def from_config(cls, name: str, **overrides) -> "SD3":
        """A randomly initialized model of a named config (``SD3_CONFIGS``), e.g. ``"SD3.5-medium"``."""
        if name not in SD3_CONFIGS:
            raise ValueError(f"SD3: unknown config {name!r}; known: {sorted(SD3_CONFIGS)}")
        return cls(**{**SD3_CONFIGS[name], **overrides})

    def _original_views(self) -> dict:
        """``{Stability AI key: view}`` of the stacked adaLN rows: the final layer's and each block's streams."""
        views = {"final_layer.adaLN_modulation.1": self.final_adaLN()}
        for i in range(self.num_blocks):
            rows = self.block_adaLN(i)
            views[f"joint_blocks.{i}.x_block.adaLN_modulation.1"] = rows["x"]
            views[f"joint_blocks.{i}.context_block.adaLN_modulation.1"] = rows["context"]
        return {f"{k}.{name}": v for k, (w, b) in views.items() for name, v in (("weight", w), ("bias", b))}

    def state_dict_in(self, layout: str | None = None) -> dict:
        """This model's weights in ``layout``: "original" (Stability AI, loads into ``mmditx.py`` / ComfyUI-style
        tools as the ``model.diffusion_model.`` part) or "diffusers" (``SD3Transformer2DModel.load_state_dict``).
        Default: the layout the model was loaded from. Tensors are detached copies."""
        layout = self.source_layout if layout is None else layout
        if layout not in LAYOUTS:
            raise ValueError(f"SD3.state_dict_in: `layout` expected one of {LAYOUTS}, got {layout!r}")
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("adaLN_")}
        state.update(self._original_views())
        state = {k: v.detach().clone() for k, v in state.items()}
        if layout == "diffusers":
            state = convert.original_to_diffusers("SD3.state_dict_in", state)
        return state

    @classmethod
    def from_checkpoint(cls, path_or_state, *, attention_head_dim: int | None = None, which: str | None = None,
                        **overrides) -> "SD3":
        """Load the Stability AI layout (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``: the
        ``model.diffusion_model.`` part of a single file), the diffusers layout, or this class's own
        ``state_dict()``; a path (``.safetensors`` via the safetensors package, else ``torch.load(weights_only=
        True)``) or a dict. The layout is detected from the keys; the configuration comes from the tensor shapes
        (``attention_head_dim`` only matters without QK-norm: default 64, as released). Eval mode.
        """
        where = "SD3.from_checkpoint"
        state = convert.strip_prefixes(L.load_state(where, path_or_state, which))
        if "adaLN_weight" in state:
            layout = "own"
        else:
            layout = convert.detect_layout(where, state)
            if layout == "diffusers":
                state = convert.diffusers_to_original(where, state)
        cfg = convert.sd3_config(where, state, attention_head_dim)
        model = cls(**{**cfg, **overrides})
        targets = dict(model.state_dict(keep_vars=True))
        if layout != "own":
            del targets["adaLN_weight"], targets["adaLN_bias"]
            targets.update(model._original_views())
        L.copy_into(where, targets, state)
        model.source_layout = "diffusers" if layout == "diffusers" else "original"
        return model.eval()

    @classmethod
    def from_diffusers(cls, module_or_state_dict, **overrides) -> "SD3":
        """Load diffusers' ``SD3Transformer2DModel`` (a module, or its state dict; a path reads as in
        ``from_checkpoint``). From a module its config is checked and used (``sample_size`` too); from a state
        dict the configuration comes from the tensor shapes. Eval mode; ``state_dict_in()`` writes diffusers keys.
        """
        where = "SD3.from_diffusers"
        if isinstance(module_or_state_dict, nn.Module):
            config = dict(module_or_state_dict.config)
            if not config.get("pos_embed_max_size"):
                raise ValueError(f"{where}: expected a config with pos_embed_max_size set (every released SD3 / "
                                 f"SD3.5 has it), got {config.get('pos_embed_max_size')!r}")
            if config.get("qk_norm") not in (None, "rms_norm"):
                raise ValueError(f"{where}: qk_norm expected None or 'rms_norm', got {config.get('qk_norm')!r}")
            state = dict(module_or_state_dict.state_dict())
            overrides = {"sample_size": config.get("sample_size", 128),
                         "attention_head_dim": config["attention_head_dim"], **overrides}
        else:
            state = L.load_state(where, module_or_state_dict)
        if convert.detect_layout(where, state) != "diffusers":
            raise ValueError(f"{where}: expected the diffusers layout (`transformer_blocks.0...`), got the Stability "
                             "AI layout; use SD3.from_checkpoint")
        head_dim = overrides.pop("attention_head_dim", None)
        model = cls.from_checkpoint(convert.diffusers_to_original(where, state), attention_head_dim=head_dim,
                                    **overrides)
        model.source_layout = "diffusers"
        return model

