"""FLUX.1 (black-forest-labs: double-stream MMDiT blocks, then single-stream parallel blocks) with early exit.

Inputs follow the scaffold: ``x`` is the (B, 16, H, W) image latent (H, W even), packed inside into 2x2-patch
tokens of 64 features exactly as diffusers' ``FluxPipeline._pack_latents`` does, and the output is unpacked
back; ``t`` = sigma * 1000 (the flow time in [0, 1000), 1000 = noise); ``y`` a ``TextCondition`` with the T5
``tokens`` (B, L, 4096), the CLIP ``pooled`` (B, 768) and, for guidance-distilled configs (FLUX.1-dev),
``extra["guidance"]`` (B,): the guidance scale (e.g. 3.5; multiplied by 1000 inside, as diffusers and BFL do).
The output is the velocity (``prediction = "flow"``). ``y.mask`` (optional) hides padded text tokens as attention
keys, as diffusers does with an ``attention_mask``; FluxPipeline passes none (FLUX attends to T5 padding), so
pass ``mask=None`` for the released behaviour.

The forward (``Flux.forward_sorted``):
1. packed image tokens -> ``img_in``; text tokens -> ``txt_in``; ``vec`` = time_in(t) + guidance_in(g) +
   vector_in(pooled); the 3-axis RoPE table for ids (text: zeros; image: (0, row, col) on the packed grid);
2. per double block, for each stream: modulated LayerNorm (computed by the block before), the QKV GEMM, QK RMSNorm
   and RoPE fused (``qk_norm_rope``, giving the (B, H, N, Dh) layout SDPA takes), joint attention over
   [text; image], the output projection, ``gated_residual_norm`` (gated residual + the MLP's modulated norm),
   the MLP (tanh-GELU fused into its first GEMM, ``linear_act``) and a second ``gated_residual_norm`` that
   already computes the NEXT block's (or the head's) modulated norm;
3. per single block on [text; image]: ONE GEMM (``linear1``) gives Q, K, V and the MLP input, QK norm + RoPE,
   attention, tanh-GELU on the MLP part, ``linear2`` on [attention; MLP] and the gated residual (+ next norm);
4. the head (``final_layer``: adaLN then linear) on the image tokens, then unpacking.

Early exit (output side): depth d counts blocks in execution order. ``d <= num_layers`` runs
``double_blocks[:d]`` and no single block; a larger d runs every double block and ``single_blocks[:d -
num_layers]``; then the head on the image stream. A double block that is the last one for some samples skips its
text stream's MLP for them (nothing reads it). Per-sample depth (sorted prefixes) and the exit cache
(``img_L - img_d`` recorded at full depth) are supported.

The parameters carry the black-forest-labs names (``double_blocks.i.img_attn.qkv``, ``single_blocks.i.linear1``,
...), so an original checkpoint loads key for key; diffusers' layout is converted by ``convert.flux``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.models import _layers as L
from eekernels.models.convert import flux as convert_flux
from eekernels.models.condition import TextCondition
from eekernels.models.scaffold import Carry, NextNorm, ScoreModel, add_and_norm, cache_mode
from eekernels.ops import gated_residual_norm, modulated_layer_norm, qk_norm_rope

EPS = 1e-6  # every LayerNorm and QK RMSNorm of FLUX.1

# --------------------------------------------------------------------------------------------------
# Configs (black-forest-labs/flux src/flux/util.py; diffusers' FluxTransformer2DModel configs)
# --------------------------------------------------------------------------------------------------
_FLUX1 = dict(latent_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
              axes_dims_rope=(16, 56, 56))
FLUX_CONFIGS = {
    "FLUX.1-dev": dict(_FLUX1, guidance_embeds=True),
    "FLUX.1-schnell": dict(_FLUX1, guidance_embeds=False),
}
LAYOUTS = ("original", "diffusers")


# --------------------------------------------------------------------------------------------------
# Modules (black-forest-labs names, so the original checkpoints map key for key)
# --------------------------------------------------------------------------------------------------
class MLPEmbedder(nn.Module):
    """in_layer, SiLU, out_layer."""

    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, v):
        return self.out_layer(F.silu(self.in_layer(v)))


class RMSScale(nn.Module):
    """The weight of a per-head RMSNorm (named ``scale`` as in black-forest-labs)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.query_norm = RMSScale(head_dim)
        self.key_norm = RMSScale(head_dim)


class SelfAttention(nn.Module):
    """One stream's fused QKV projection, QK norm weights and output projection."""

    def __init__(self, dim, head_dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """adaLN projection of ``silu(vec)``: ``mult`` chunks of D, each (shift, scale, gate)."""

    def __init__(self, dim, mult):
        super().__init__()
        self.lin = nn.Linear(dim, mult * dim)


def _gelu_mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _mlp(seq: nn.Sequential, h):
    return L.mlp(h, seq[0].weight, seq[0].bias, seq[2].weight, seq[2].bias, "gelu_tanh")


def _heads(qkv: torch.Tensor, heads: int):
    """(B, N, 3D) GEMM output -> q, k views (B, N, H, Dh) and v as (B, H, N, Dh)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, -1).unbind(2)
    return q, k, v.transpose(1, 2)


def _sdpa(q, k, v, mask):
    """Attention (B, H, S, Dh) -> (B, S, H * Dh)."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Joint attention over [text; image] with separate weights per stream; adaLN-Zero on both."""

    def __init__(self, dim, heads, head_dim, mlp_hidden):
        super().__init__()
        self.heads = heads
        self.img_mod, self.txt_mod = Modulation(dim, 6), Modulation(dim, 6)
        self.img_attn, self.txt_attn = SelfAttention(dim, head_dim), SelfAttention(dim, head_dim)
        self.img_mlp, self.txt_mlp = _gelu_mlp(dim, mlp_hidden), _gelu_mlp(dim, mlp_hidden)

    def _qkv(self, attn: SelfAttention, h, cos, sin):
        q, k, v = _heads(F.linear(h, attn.qkv.weight, attn.qkv.bias), self.heads)
        q, k = qk_norm_rope(q, k, attn.norm.query_norm.scale, attn.norm.key_norm.scale, cos, sin, eps=EPS)
        return q, k, v

    def forward(self, img: Carry, txt: Carry, img_mod, txt_mod, rope, mask, next_img: NextNorm,
                next_txt: NextNorm | None, n_next: int):
        """``img``, ``txt``: n samples' streams with their normed inputs in ``.h``; ``img_mod``/``txt_mod``:
        (gate_msa, shift_mlp, scale_mlp, gate_mlp), each (n, D). ``next_img`` (n samples) and ``next_txt``
        (the n' = ``n_next`` <= n samples that go on; None: none) are the norms after this block. Returns the image
        Carry (n samples) and the text Carry (n' samples, None when n' = 0)."""
        n, L_txt = img.x.shape[0], txt.x.shape[1]
        cos, sin = rope  # (L + N, Dh); the text ids are zeros, so its rotation is the identity: skipped
        tq, tk, tv = self._qkv(self.txt_attn, txt.h, None, None)
        iq, ik, iv = self._qkv(self.img_attn, img.h, cos[L_txt:], sin[L_txt:])
        o = _sdpa(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), mask)
        dt = img.x.dtype
        gate_msa, shift_mlp, scale_mlp, gate_mlp = img_mod
        x, h = gated_residual_norm(img.x, F.linear(o[:, L_txt:], self.img_attn.proj.weight,
                                                   self.img_attn.proj.bias).to(dt),
                                   gate_msa, shift_mlp, scale_mlp, EPS)
        img = Carry(*add_and_norm(x, _mlp(self.img_mlp, h).to(dt), gate_mlp, next_img))
        if next_txt is None:  # no sample reads this block's text stream
            return img, None
        m = n_next
        gate_msa, shift_mlp, scale_mlp, gate_mlp = (v[:m] for v in txt_mod)
        delta = F.linear(o[:m, :L_txt], self.txt_attn.proj.weight, self.txt_attn.proj.bias).to(dt)
        x, h = gated_residual_norm(txt.x[:m], delta, gate_msa, shift_mlp, scale_mlp, EPS)
        txt = Carry(*add_and_norm(x, _mlp(self.txt_mlp, h).to(dt), gate_mlp, next_txt))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP on [text; image]: ``linear1`` is the QKV and MLP-in GEMM in one."""

    def __init__(self, dim, heads, head_dim, mlp_hidden):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.linear1 = nn.Linear(dim, 3 * dim + mlp_hidden)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(head_dim)
        self.modulation = Modulation(dim, 3)

    def forward(self, carry: Carry, gate, rope, mask, next_norm: NextNorm) -> Carry:
        a = F.linear(carry.h, self.linear1.weight, self.linear1.bias)
        q, k, v = _heads(a[..., : 3 * self.dim], self.heads)
        q, k = qk_norm_rope(q, k, self.norm.query_norm.scale, self.norm.key_norm.scale, *rope, eps=EPS)
        o = _sdpa(q, k, v, mask)
        mlp = F.gelu(a[..., 3 * self.dim:], approximate="tanh")
        out = F.linear(torch.cat([o, mlp], -1), self.linear2.weight, self.linear2.bias)
        return Carry(*add_and_norm(carry.x, out.to(carry.x.dtype), gate, next_norm))


class LastLayer(nn.Module):
    """adaLN (``shift, scale`` = ``adaLN_modulation.1(silu(vec))``) then the linear to packed patches."""

    def __init__(self, dim, out_features):
        super().__init__()
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


# --------------------------------------------------------------------------------------------------
# Packing and RoPE
# --------------------------------------------------------------------------------------------------
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) with features ordered (C, 2, 2): diffusers' ``_pack_latents``."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), 4 * C)


def unpack_latents(tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    B, _, F4 = tokens.shape
    C = F4 // 4
    return tokens.reshape(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def rope_table(axes_dims, theta: float, text_len: int, rows: int, cols: int, device) -> tuple:
    """``(cos, sin)``, each (text_len + rows * cols, sum(axes_dims)) float32, for the ids FLUX uses: zeros for the
    text tokens, (0, row, col) for the image tokens in row-major order. Per axis of width a: frequencies
    ``theta ** (-2i / a)``, angles ``pos * freq`` in float64, each cos/sin repeated twice (interleaved pairs)."""
    r = torch.arange(rows, dtype=torch.float64, device=device)
    c = torch.arange(cols, dtype=torch.float64, device=device)
    img = torch.stack([torch.zeros(rows, cols, dtype=torch.float64, device=device),
                       r[:, None].expand(rows, cols), c[None, :].expand(rows, cols)], -1).reshape(-1, 3)
    ids = torch.cat([torch.zeros(text_len, 3, dtype=torch.float64, device=device), img])
    angles = []
    for i, a in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, a, 2, dtype=torch.float64, device=device) / a)
        angles.append(torch.outer(ids[:, i], freqs))
    ang = torch.cat(angles, -1).repeat_interleave(2, dim=-1)
    return ang.cos().float(), ang.sin().float()


# --------------------------------------------------------------------------------------------------
# FLUX
# --------------------------------------------------------------------------------------------------
class Flux(ScoreModel):
    """FLUX.1 transformer with early exit: ``model(x, t, y, depth)``; depth counts double then single blocks."""

    family = "FLUX"
    condition = "text"
    prediction = "flow"
    #: The flow solvers' unshifted grid: BFL's get_schedule and FluxPipeline's linspace(1, 0, N + 1), read by
    #: ``eekernels.samplers.model_solver_options`` (the scheduler's default linspace(1, 1/1000, N) differs).
    sigma_grid = "flux"
    fixed_size = False
    input_multiple = 2
    input_size = None
    num_classes = None
    null_class = None
    learn_sigma = False
    min_depth = 1
    min_reuse_depth = 0  # no block: the whole stack's part from the exit cache

    def __init__(
        self,
        latent_channels: int = 16,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope=(16, 56, 56),
        mlp_ratio: float = 4.0,
        theta: float = 10000.0,
    ):
        super().__init__()
        for name, v in (("latent_channels", latent_channels), ("num_layers", num_layers),
                        ("num_single_layers", num_single_layers), ("attention_head_dim", attention_head_dim),
                        ("num_attention_heads", num_attention_heads), ("joint_attention_dim", joint_attention_dim),
                        ("pooled_projection_dim", pooled_projection_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FLUX: `{name}` expected a positive int, got {v!r}")
        axes = tuple(axes_dims_rope)
        if len(axes) != 3 or sum(axes) != attention_head_dim or any(a % 2 or a < 2 for a in axes):
            raise ValueError(f"FLUX: `axes_dims_rope` expected 3 even widths summing to attention_head_dim="
                             f"{attention_head_dim}, got {axes}")
        if attention_head_dim % 2:
            raise ValueError(f"FLUX: `attention_head_dim` expected an even number (RoPE pairs), got {attention_head_dim}")
        D = attention_head_dim * num_attention_heads
        mlp_hidden = int(D * mlp_ratio)
        self.in_channels = latent_channels
        self.out_channels = latent_channels if out_channels is None else out_channels
        self.hidden_size, self.num_heads, self.head_dim = D, num_attention_heads, attention_head_dim
        self.num_double, self.num_single = num_layers, num_single_layers
        self.num_blocks = num_layers + num_single_layers
        self.token_dim, self.pooled_dim = joint_attention_dim, pooled_projection_dim
        self.guidance_embeds = bool(guidance_embeds)
        self.condition_extras = {"guidance": ()} if guidance_embeds else {}
        self.axes_dims_rope, self.theta = axes, float(theta)
        self.source_layout = "original"  # what state_dict_in() writes by default: the layout a loader read

        self.img_in = nn.Linear(4 * latent_channels, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(pooled_projection_dim, D)
        if guidance_embeds:
            self.guidance_in = MLPEmbedder(256, D)
        self.txt_in = nn.Linear(joint_attention_dim, D)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(D, num_attention_heads, attention_head_dim, mlp_hidden) for _ in range(num_layers))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(D, num_attention_heads, attention_head_dim, mlp_hidden)
            for _ in range(num_single_layers))
        self.final_layer = LastLayer(D, 4 * self.out_channels)

    def config(self) -> dict:
        """The constructor arguments of this model."""
        return dict(latent_channels=self.in_channels, out_channels=self.out_channels, num_layers=self.num_double,
                    num_single_layers=self.num_single, attention_head_dim=self.head_dim,
                    num_attention_heads=self.num_heads, joint_attention_dim=self.token_dim,
                    pooled_projection_dim=self.pooled_dim, guidance_embeds=self.guidance_embeds,
                    axes_dims_rope=self.axes_dims_rope,
                    mlp_ratio=self.double_blocks[0].img_mlp[0].out_features / self.hidden_size, theta=self.theta)

    def null_condition(self, batch, length, device=None, dtype=None):
        raise ValueError("FLUX: no null condition: FLUX has no learned unconditional embedding. For true CFG pass "
                         "the negative prompt's T5 tokens and CLIP pooled embedding as the unconditional "
                         "TextCondition; FLUX.1-dev is guidance-distilled: set y.extra['guidance'] instead")

    # ---------------------------------------------------------------- embedding
    def _embed(self, x, t, y: TextCondition):
        """Image and text streams, ``silu(vec)``, the RoPE table and the attention mask (or None)."""
        name = self.family
        B, _, H, W = x.shape
        w = self.img_in.weight
        dt = x.dtype  # the residual streams' dtype (under autocast the GEMMs run in bfloat16, the streams do not)
        img = self.img_in(pack_latents(x)).to(dt)
        txt = self.txt_in(y.tokens.to(dt)).to(dt)
        vec = self.time_in(L.timestep_embedding(t, 256).to(w.dtype))
        g = y.extra.get("guidance")
        if self.guidance_embeds:
            if g is None:
                raise ValueError(f"{name}: `y.extra['guidance']` expected a ({B},) tensor of guidance scales "
                                 "(this FLUX config is guidance-distilled, e.g. 3.5 for FLUX.1-dev), got None")
            if g.dtype == torch.bool or g.is_complex():
                raise ValueError(f"{name}: `y.extra['guidance']` expected a real (float) tensor, got {g.dtype}")
            if g.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(g).all()):
                raise ValueError(f"{name}: `y.extra['guidance']` expected finite guidance scales, got "
                                 f"{g.tolist()}")  # checked where it costs no host sync (a CPU tensor)
            vec = vec + self.guidance_in(L.timestep_embedding(g.float() * 1000.0, 256).to(w.dtype))
        vec = vec + self.vector_in(y.pooled.to(dt))
        rope = rope_table(self.axes_dims_rope, self.theta, txt.shape[1], H // 2, W // 2, x.device)
        mask = None
        if y.mask is not None:  # a key mask over the text tokens; image tokens always attend
            keys = torch.cat([y.mask, torch.ones(B, img.shape[1], dtype=torch.bool, device=x.device)], 1)
            mask = keys[:, None, None, :]
        return img, txt, F.silu(vec), rope, mask

    def _double_mod(self, i, sv):
        blk = self.double_blocks[i]
        dt = sv.dtype
        img = F.linear(sv, blk.img_mod.lin.weight, blk.img_mod.lin.bias).to(dt).chunk(6, 1)
        txt = F.linear(sv, blk.txt_mod.lin.weight, blk.txt_mod.lin.bias).to(dt).chunk(6, 1)
        return img, txt

    def _single_mod(self, j, sv):
        lin = self.single_blocks[j].modulation.lin
        return F.linear(sv, lin.weight, lin.bias).to(sv.dtype).chunk(3, 1)

    def head(self, h):
        return self.final_layer.linear(h)

    # ---------------------------------------------------------------- the forward
    def forward_sorted(self, x, t, y, plan, exit_cache):
        """The by-depth loop over both block lists (see the module docstring), on the depth-sorted batch."""
        d, counts = plan.depth, plan.counts
        B, _, H, W = x.shape
        img, txt, sv, rope, mask = self._embed(x, t, y)
        dt = img.dtype
        sv = sv.to(dt)
        L_txt = txt.shape[1]
        nd = self.num_double
        record, replay = cache_mode(exit_cache, d, self.num_blocks)

        lin = self.final_layer.adaLN_modulation[1]
        shift, scale = F.linear(sv, lin.weight, lin.bias).to(dt).chunk(2, 1)  # black-forest-labs order
        head_norm = NextNorm(EPS, shift=shift, scale=scale)
        mods = {}

        def mod(i):  # block i's modulation for the counts[i] samples it runs on, computed once
            if i not in mods:
                n = counts[i]
                mods[i] = self._double_mod(i, sv[:n]) if i < nd else self._single_mod(i - nd, sv[:n])
            return mods[i]

        def entry(i, stream):  # the NextNorm block i starts with (stream: 0 image, 1 text; single: either)
            m = mod(i)
            m = m[stream] if i < nd else m
            return NextNorm(EPS, shift=m[0], scale=m[1])

        def next_norm(i, n, n_next, stream):  # after block i - 1, for n samples (n_next go on to block i)
            if n_next == 0:
                return head_norm.rows(n)
            norm = entry(i, stream)
            return norm.rows(n) if n_next == n else norm.mix(head_norm, n_next, n)

        if d:  # depth 0 (exit cache): no block runs, no block's norm is needed
            i0 = entry(0, 0)
            img_c = Carry(img, modulated_layer_norm(img, i0.shift, i0.scale, EPS))
            t0 = entry(0, 1)
            txt_c = Carry(txt, modulated_layer_norm(txt, t0.shift, t0.scale, EPS))
        seq = None  # the single-stream Carry over [text; image]
        snapshots, outs = {}, []
        img_x = img
        if record and 0 in exit_cache.depths:  # depth 0: the whole stack's part
            snapshots[0] = img
        for i in range(d):
            n, n_next = counts[i], (counts[i + 1] if i + 1 < d else 0)
            if i < nd:
                m_img, m_txt = mod(i)
                blk = self.double_blocks[i]
                nxt_img = next_norm(i + 1, n, n_next, 0)
                if n_next == 0:
                    nxt_txt = None
                elif i + 1 < nd:
                    nxt_txt = entry(i + 1, 1).rows(n_next)
                else:
                    nxt_txt = entry(i + 1, 0).rows(n_next)  # the first single block's norm
                img_c, txt_c = blk(img_c.rows(n), txt_c.rows(n), m_img[2:], m_txt[2:], rope,
                                   None if mask is None else mask[:n], nxt_img, nxt_txt, n_next)
                if n_next < n and not replay:
                    outs.append(self.head(img_c.h[n_next:n]))
                img_x = img_c.x
                if i + 1 == nd and n_next > 0:  # into the single stream: [text; image]
                    seq = Carry(torch.cat([txt_c.x, img_c.x[:n_next]], 1), torch.cat([txt_c.h, img_c.h[:n_next]], 1))
            else:
                gate = mod(i)[2]
                blk = self.single_blocks[i - nd]
                seq = blk(seq.rows(n), gate, rope, None if mask is None else mask[:n], next_norm(i + 1, n, n_next, 0))
                if n_next < n and not replay:
                    outs.append(self.head(seq.h[n_next:n, L_txt:]))
                img_x = seq.x[:, L_txt:]
            if record and (i + 1) in exit_cache.depths:
                snapshots[i + 1] = img_x
        if record:
            for k, x_k in snapshots.items():
                if k < self.num_blocks:
                    exit_cache.store(k, img_x - x_k)
        if replay:  # truncated: add what the skipped blocks added to the image stream at the last full call
            _, h = add_and_norm(img_x, exit_cache.load(d).to(img_x.dtype), None, head_norm)
            outs = [self.head(h)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs[::-1])
        return unpack_latents(out, H, W)

    # ---------------------------------------------------------------- constructors and write-back
    @classmethod
    def from_config(cls, name: str, **overrides) -> "Flux":
        """A randomly initialized model of a named config (``FLUX_CONFIGS``), e.g. ``"FLUX.1-dev"``."""
        if name not in FLUX_CONFIGS:
            raise ValueError(f"FLUX: unknown config {name!r}; known: {sorted(FLUX_CONFIGS)}")
        return cls(**{**FLUX_CONFIGS[name], **overrides})

    @classmethod
    def from_checkpoint(cls, path_or_state, *, axes_dims_rope=None, **overrides) -> "Flux":
        """Load a black-forest-labs checkpoint (``flux1-dev.safetensors``: ``double_blocks.i...``; a
        ``model.diffusion_model.`` prefix is taken off) or a diffusers-layout one (``transformer_blocks.i...``),
        detected from the keys; a path (``.safetensors`` or a ``torch.save`` file, read without running code)
        or a state dict (not modified). The config comes from the tensor shapes; the RoPE axes are
        (16, 56, 56) for head dim 128, else pass ``axes_dims_rope=``. Returns the model in eval mode;
        ``state_dict_in()`` writes the layout that was read."""
        where = f"{cls.family}.from_checkpoint"
        state = convert_flux.strip_prefixes(L.load_state(where, path_or_state))
        layout = convert_flux.detect_layout(where, state)
        if layout == "diffusers":
            state = convert_flux.diffusers_to_original(where, state)
        return cls._from_original(where, state, layout, axes_dims_rope, overrides)

    @classmethod
    def from_diffusers(cls, module_or_state_dict, *, axes_dims_rope=None, **overrides) -> "Flux":
        """From diffusers' ``FluxTransformer2DModel`` (its config is used) or its state dict (config from the
        shapes, as ``from_checkpoint``). Returns the model in eval mode."""
        where = f"{cls.family}.from_diffusers"
        if isinstance(module_or_state_dict, nn.Module):
            config = getattr(module_or_state_dict, "config", None)
            if config is None:
                raise ValueError(f"{where}: expected a diffusers FluxTransformer2DModel (with a .config) or a "
                                 f"state dict, got {type(module_or_state_dict).__name__}")
            if config.get("patch_size", 1) != 1:
                raise ValueError(f"{where}: config patch_size expected 1 (FLUX packs 2x2 latent patches before "
                                 f"the transformer), got {config['patch_size']}")
            if axes_dims_rope is None:
                axes_dims_rope = tuple(config["axes_dims_rope"])
            state = dict(module_or_state_dict.state_dict())
        else:
            state = L.load_state(where, module_or_state_dict)
        if convert_flux.detect_layout(where, state) != "diffusers":
            raise ValueError(f"{where}: expected the diffusers layout (`x_embedder.weight`, "
                             "`transformer_blocks.0...`), got the black-forest-labs one; use Flux.from_checkpoint")
        orig = convert_flux.diffusers_to_original(where, state)
        return cls._from_original(where, orig, "diffusers", axes_dims_rope, overrides)

    @classmethod
    def _from_original(cls, where, state, layout, axes_dims_rope, overrides) -> "Flux":
        cfg = convert_flux.flux_config(where, state, axes_dims_rope)
        model = cls(**{**cfg, **overrides})
        L.copy_into(where, dict(model.state_dict(keep_vars=True)), state)
        model.source_layout = layout
        return model.eval()

    def state_dict_in(self, layout: str | None = None) -> dict:
        """This model's weights as new tensors in ``layout``: "original" (black-forest-labs; loads into
        ``flux.model.Flux``) or "diffusers" (``FluxTransformer2DModel.load_state_dict``). Default: the layout
        it was loaded from ("original" for a fresh model)."""
        layout = self.source_layout if layout is None else layout
        if layout not in LAYOUTS:
            raise ValueError(f"{self.family}: `layout` expected one of {LAYOUTS}, got {layout!r}")
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if layout == "diffusers":
            state = convert_flux.original_to_diffusers(f"{self.family}.state_dict_in", state)
        return state

