"""PixArt-α / PixArt-Σ (adaLN-single text-to-image DiT, T5 captions, learned sigma) with early exit.

The forward (the scaffold's by-depth loop, ``scaffold.ScoreModel.forward_sorted``):
1. patch tokens plus the 2-D sin-cos position table of the latent's grid (any H, W divisible by the patch;
   positions scaled to the training grid as PixArt's ``base_size`` / ``interpolation_scale`` do); the caption
   tokens through ``y_embedder.y_proj`` (Linear, tanh-GELU fused into the GEMM, Linear), once per forward;
2. adaLN-single: ONE timestep MLP (plus, for PixArt-α 1024, the resolution and aspect-ratio embeddings) gives
   ``t_emb`` (B, D), ONE ``t_block`` GEMM gives the (B, 6D) modulation every block shares, and ONE add gives
   all active blocks' modulations ``t6 + scale_shift_table_i`` at once, as (B, D) views (the tables of all
   blocks are stacked in ``adaLN_scale_shift`` (L, 6, D), so the active ones are a prefix);
3. per block: self-attention on the modulated norm (computed by the block before), ``x += gate_msa * attn``;
   cross-attention to the caption (padding masked), whose residual add is fused with the MLP's modulated
   norm (``gated_residual_norm``); fc1 with its tanh-GELU epilogue (``linear_act``), fc2, and a second
   ``gated_residual_norm`` that already computes the NEXT block's (or the final layer's) modulated norm;
4. the final layer's modulated norm (``final_layer.scale_shift_table + t_emb``), the linear, unpatchify.

Early exit (ASE): ``blocks[:depth]`` run, then the final layer on that hidden state (as DiT).

PixArt-Σ's self-attention options (PixArt-sigma's ``AttentionKVCompress``; off in every released checkpoint and
named config): ``qk_norm`` (a LayerNorm over the whole width on q and on k) and ``kv_compress_config`` (the keys
and values of the blocks in ``kv_compress_layer`` downsampled on the token grid by ``scale_factor``: "uniform"
/ "ave" / "uniform_every" sampling add no weights, "conv" a depthwise strided conv and a LayerNorm per block).
diffusers' ``PixArtTransformer2DModel`` has neither, so a model using them has no diffusers layout.

Conventions (diffusers' ``PixArtTransformer2DModel``, PixArt-alpha's ``PixArtMS``): ``t`` in [0, 1000); the
output is (B, 2C, H, W): epsilon then the learned variance interpolation. The caption mask: True/1 a token,
False/0 padding; padding keys get -10000 added to their scores (diffusers' bias; PixArt-alpha drops them,
which is the same to float precision), so a caption that is all padding attends uniformly, never NaN.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.models import _layers as L
from eekernels.models.condition import TextCondition
from eekernels.models.convert import pixart as convert
from eekernels.models.scaffold import Carry, NextNorm, ScoreModel, add_and_norm
from eekernels.ops import gated_residual_norm, modulated_layer_norm

# --------------------------------------------------------------------------------------------------
# Configs: PixArt-XL/2 (28 blocks, 1152 wide, 16 heads, patch 2, T5-XXL captions of 4096 features)
# --------------------------------------------------------------------------------------------------
# Every release: no QK-norm, no KV compression (PixArt-sigma's configs: qk_norm = False, kv_compress = False,
# the 2K ones included).
_XL = dict(patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
           caption_channels=4096, learn_sigma=True, qk_norm=False, kv_compress_config=None)
PIXART_CONFIGS = {
    # PixArt-alpha's PixArt-XL-2-{256x256,512x512}.pth: 120 caption tokens; position scale 1 (PixArt-alpha's
    # scripts/inference.py `lewei_scale`; diffusers' default max(sample_size // 64, 1) for these sizes).
    "PixArt-XL/2-256": dict(_XL, sample_size=32, interpolation_scale=1.0, model_max_length=120,
                            use_additional_conditions=False),
    "PixArt-XL/2-512": dict(_XL, sample_size=64, interpolation_scale=1.0, model_max_length=120,
                            use_additional_conditions=False),
    # PixArt-XL-2-1024-MS: PixArtMS with the resolution / aspect-ratio embeddings (diffusers' sample_size 128).
    "PixArt-XL/2-1024": dict(_XL, sample_size=128, interpolation_scale=2.0, model_max_length=120,
                             use_additional_conditions=True),
    # PixArt-Sigma-XL-2-1024-MS: 300 caption tokens, no additional conditions, position scale 2
    # (diffusers' scripts/convert_pixart_sigma_to_diffusers.py: {256: 0.5, 512: 1, 1024: 2, 2048: 4}).
    "PixArt-Sigma-XL/2-1024": dict(_XL, sample_size=128, interpolation_scale=2.0, model_max_length=300,
                                   use_additional_conditions=False),
}

EPS = 1e-6  # every LayerNorm of PixArt (blocks and final layer)
LAYOUTS = ("original", "diffusers")
#: Padding keys' score bias (diffusers' ``(1 - mask) * -10000``).
MASK_BIAS = -10000.0
#: PixArt-sigma's KV-compression samplings (``AttentionKVCompress.downsample_2d``), all implemented.
KV_SAMPLINGS = ("uniform", "ave", "uniform_every", "conv")
_KV_KEYS = ("sampling", "scale_factor", "kv_compress_layer")
#: nn.LayerNorm's default eps: PixArt-sigma's ``q_norm`` / ``k_norm`` and the "conv" sampling's ``norm``.
ATTN_NORM_EPS = 1e-5


def kv_compress_plan(where: str, kv_compress_config, depth: int):
    """``(sampling, scale_factor, layers)`` of a PixArt-sigma ``kv_compress_config`` ({'sampling', 'scale_factor',
    'kv_compress_layer'}), or None when it compresses nothing (None, ``scale_factor`` 1 or no layers: what
    PixArt-sigma then runs). A ValueError naming the entry for anything PixArt-sigma would not run as written:
    an unknown sampling or key, a scale that ``int()`` would truncate, a layer outside ``[0, depth)``, or
    compression with ``sampling`` None."""
    if kv_compress_config is None:
        return None
    name = "kv_compress_config"
    if not isinstance(kv_compress_config, dict):
        raise ValueError(f"{where}: `{name}` expected None or a dict with keys {_KV_KEYS}, got "
                         f"{type(kv_compress_config).__name__}")
    unknown = sorted(set(kv_compress_config) - set(_KV_KEYS), key=str)
    missing = [k for k in _KV_KEYS if k not in kv_compress_config]
    if unknown or missing:
        raise ValueError(f"{where}: `{name}` expected the keys {_KV_KEYS}, got unknown {unknown}, missing {missing}")
    sampling, scale, layers = (kv_compress_config[k] for k in _KV_KEYS)
    if sampling is not None and sampling not in KV_SAMPLINGS:
        raise ValueError(f"{where}: `{name}['sampling']` expected one of {KV_SAMPLINGS} or None, got {sampling!r} "
                         "(not a PixArt-sigma KV-compression sampling; not implemented)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != int(scale) or scale < 1:
        raise ValueError(f"{where}: `{name}['scale_factor']` expected an integer >= 1, got {scale!r}")
    scale = int(scale)
    if not isinstance(layers, (list, tuple, set, frozenset)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth for i in layers):
        raise ValueError(f"{where}: `{name}['kv_compress_layer']` expected a list of block indices in [0, {depth}), "
                         f"got {layers!r}")
    if scale == 1 or not layers:
        return None
    if sampling is None:
        raise ValueError(f"{where}: `{name}['sampling']` expected one of {KV_SAMPLINGS} to compress blocks "
                         f"{sorted(layers)} by {scale}, got None")
    return sampling, scale, tuple(sorted(set(layers)))


def pixart_pos_embed(dim: int, h: int, w: int, base_size: int, interpolation_scale: float,
                     device=None) -> torch.Tensor:
    """PixArt's 2-D sin-cos table for an ``h`` x ``w`` patch grid, (1, h*w, dim) float32: row ``i`` / column ``j``
    at ``arange(n) / (n / base_size) / interpolation_scale`` (float32), the first half of the features embedding
    the column, each half ``[sin, cos]`` with float64 frequencies (diffusers' ``get_2d_sincos_pos_embed`` and
    PixArt-alpha's numpy one)."""
    if dim % 4:
        raise ValueError(f"PixArt: the hidden size expected a multiple of 4 (2-D sin-cos positions), got {dim}")
    gh = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale
    gw = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4.0)
    omega = 1.0 / 10000 ** omega

    def one_axis(p):  # (h*w,) -> (h*w, dim/2): [sin, cos]
        out = torch.outer(p.double(), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = gh.repeat_interleave(w), gw.repeat(h)  # token i*w + j
    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()[None]


# --------------------------------------------------------------------------------------------------
# Modules, named as PixArt-alpha's (x_embedder.proj, t_embedder.mlp, t_block.1, y_embedder.y_proj.fc1/fc2,
# y_embedder.y_embedding, csize_embedder / ar_embedder, blocks.i.{attn.qkv/proj, cross_attn.q_linear/kv_linear/
# proj, mlp.fc1/fc2}, final_layer.{linear, scale_shift_table}), so the original layout maps key for key; the
# blocks' scale_shift_tables are stacked in PixArt.adaLN_scale_shift.
# --------------------------------------------------------------------------------------------------
class Embedder(nn.Module):
    """Sinusoid of each value (256 features, diffusers' ``Timesteps(256, flip_sin_to_cos=True, 0)``) then
    Linear-SiLU-Linear: ``t_embedder`` (one value per sample) and PixArt-α 1024's ``csize_embedder`` /
    ``ar_embedder`` (k values per sample -> k * out features, concatenated)."""

    def __init__(self, out_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, v: torch.Tensor, dtype) -> torch.Tensor:
        B = v.shape[0]
        freq = L.timestep_embedding(v.reshape(-1), self.frequency_embedding_size)
        return self.mlp(freq.to(dtype)).reshape(B, -1)


class CaptionProjection(nn.Module):
    """timm's ``Mlp`` as PixArt-alpha's ``y_proj``: fc1 (caption width -> D) with its tanh-GELU fused into the
    GEMM (``linear_act``), fc2 (D -> D)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(caption_channels, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, tokens):
        return L.mlp(tokens, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, "gelu_tanh")


class CaptionEmbedder(nn.Module):
    """``y_proj``: Linear-GELU(tanh)-Linear from the caption width to D; ``y_embedding``: the learned null caption
    (``model_max_length`` x caption width, a buffer as in PixArt-alpha), or None (a diffusers checkpoint)."""

    def __init__(self, caption_channels: int, hidden_size: int, model_max_length: int | None):
        super().__init__()
        self.y_proj = CaptionProjection(caption_channels, hidden_size)
        null = None if model_max_length is None else torch.empty(model_max_length, caption_channels)
        self.register_buffer("y_embedding", null)


class CrossAttention(nn.Module):
    """PixArt-alpha's ``MultiHeadCrossAttention``: q from the image tokens, k and v (``kv_linear``, features
    ordered (2, heads, head_dim)) from the caption tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: (n, N, D) image tokens; c: (n, L, D) projected caption; bias: (n, 1, 1, L) additive key mask or None.
        Returns (n, N, D) in x's dtype."""
        n, N, D = x.shape
        H = self.num_heads
        q = F.linear(x, self.q_linear.weight, self.q_linear.bias).view(n, N, H, D // H).transpose(1, 2)
        kv = F.linear(c, self.kv_linear.weight, self.kv_linear.bias).view(n, c.shape[1], 2, H, D // H)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        return F.linear(o.transpose(1, 2).reshape(n, N, D), self.proj.weight, self.proj.bias).to(x.dtype)


class KVCompressAttention(L.Attention):
    """PixArt-sigma's ``AttentionKVCompress``: timm self-attention (``qkv`` features ordered (3, D)) with
    ``q_norm`` / ``k_norm`` (LayerNorms over the whole width, before the heads split) when ``qk_norm``, and the
    keys and values (after ``k_norm``) downsampled on the h x w token grid by ``scale`` when ``sampling`` is set:
    "uniform" keeps every ``scale``-th row and column (h, w multiples of ``scale``); "ave" is PixArt-sigma's
    nearest interpolation to 1/``scale``, the same rows and columns cut to floor(h/scale) x floor(w/scale);
    "uniform_every" keeps every ``scale``-th token (h*w a multiple of ``scale``); "conv" is ``sr`` (a depthwise
    ``scale`` x ``scale`` conv of stride ``scale``) then the LayerNorm ``norm``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, sampling: str | None, scale: int):
        super().__init__(dim, num_heads, True)
        self.sampling, self.scale = sampling, scale
        self.q_norm = nn.LayerNorm(dim, eps=ATTN_NORM_EPS) if qk_norm else None
        self.k_norm = nn.LayerNorm(dim, eps=ATTN_NORM_EPS) if qk_norm else None
        if sampling == "conv":
            self.sr = nn.Conv2d(dim, dim, scale, stride=scale, groups=dim)
            self.norm = nn.LayerNorm(dim, eps=ATTN_NORM_EPS)
            with torch.no_grad():  # PixArt-sigma's init: an average
                self.sr.weight.fill_(1.0 / scale ** 2)
                self.sr.bias.zero_()

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """h: (B, N, D) tokens of the ``grid`` (rows, columns) -> (B, N, D) in h's dtype (under autocast the GEMMs
        and the conv run in the autocast dtype, the LayerNorms in float32; q, k, v are cast to the GEMM's dtype)."""
        B, N, D = h.shape
        qkv = F.linear(h, self.qkv.weight, self.qkv.bias).view(B, N, 3, D)
        dt = qkv.dtype
        q, k, v = qkv.unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(dt), self.k_norm(k).to(dt)
        if self.sampling is not None:
            k, v = self._compress(k, grid).to(dt), self._compress(v, grid).to(dt)
        H = self.num_heads
        q, k, v = (z.reshape(B, z.shape[1], H, D // H).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return F.linear(o.transpose(1, 2).reshape(B, N, D), self.proj.weight, self.proj.bias).to(h.dtype)

    def _compress(self, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, D) -> (B, n, D), the grid's tokens kept (or pooled) by the sampling."""
        (gh, gw), s = grid, self.scale
        B, _, D = z.shape
        if self.sampling == "uniform_every":
            return z[:, ::s]
        z = z.reshape(B, gh, gw, D)
        if self.sampling == "conv":
            return self.norm(self.sr(z.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
        return z[:, :gh - gh % s:s, :gw - gw % s:s].reshape(B, -1, D)  # "uniform" / "ave"


class PixArtBlock(nn.Module):
    """One adaLN-single block; its ``scale_shift_table`` is row i of ``PixArt.adaLN_scale_shift``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, eps: float, qk_norm: bool = False,
                 sampling: str | None = None, scale: int = 1):
        super().__init__()
        #: KVCompressAttention (it takes the token grid) only where an option is on: else timm's attention.
        self.grid_attn = qk_norm or sampling is not None
        self.attn = (KVCompressAttention(hidden_size, num_heads, qk_norm, sampling, scale) if self.grid_attn
                     else L.Attention(hidden_size, num_heads, True))
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.mlp = L.Mlp(hidden_size, int(hidden_size * mlp_ratio), "gelu_tanh")
        self.eps = eps

    def forward(self, carry: Carry, inputs: dict, next_norm: NextNorm) -> Carry:
        """``x + gate_msa * attn(h)``, ``x + cross_attn(x, caption)``, then
        ``x + gate_mlp * mlp(modulate(norm(x), shift_mlp, scale_mlp))``.

        ``carry.h`` is ``modulate(norm(x), shift_msa, scale_msa)``, computed by the block before; the
        cross-attention residual add also computes the MLP's modulated norm, the last one ``next_norm`` of
        its result (the next block's or the final layer's).
        """
        gate_msa, shift_mlp, scale_mlp, gate_mlp = inputs["mod"]
        a = self.attn(carry.h, inputs["grid"]) if self.grid_attn else self.attn(carry.h)
        x = torch.addcmul(carry.x, gate_msa[:, None], a)
        x, h = gated_residual_norm(x, self.cross_attn(x, inputs["context"], inputs["bias"]), None,
                                   shift_mlp, scale_mlp, self.eps)
        return Carry(*add_and_norm(x, self.mlp(h), gate_mlp, next_norm))


class FinalLayer(nn.Module):
    """``scale_shift_table`` (2, D): shift and scale added to ``t_emb``; the linear to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.empty(2, hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)


# --------------------------------------------------------------------------------------------------
# PixArt
# --------------------------------------------------------------------------------------------------
class PixArt(ScoreModel):
    """PixArt-α / Σ with early exit: ``model(x, t, y, depth)`` runs ``blocks[:depth]``.

    ``x`` (B, in_channels, H, W) latents, H and W multiples of the patch; ``t`` (B,) in [0, 1000); ``y`` a
    ``TextCondition`` with ``tokens`` (B, L, caption_channels) (T5 states), ``mask`` (B, L) (True: token) or
    None, and, for PixArt-α 1024 (``use_additional_conditions``), ``extra["resolution"]`` (B, 2) (image height,
    width in pixels) and ``extra["aspect_ratio"]`` (B, 1) (height / width). Returns (B, out_channels, H, W).

    ``sample_size``: the latent side of the training grid (positions of other grids are scaled to it);
    ``interpolation_scale``: PixArt's ``lewei_scale`` (None: diffusers' default ``max(sample_size // 64, 1)``);
    ``model_max_length``: rows of the learned null caption ``y_embedding`` (None: the model has none);
    ``qk_norm``, ``kv_compress_config``: PixArt-Σ's self-attention options (PixArt-sigma's names and meaning; see
    ``KVCompressAttention`` and ``kv_compress_plan``). ``self.kv_compress_config`` is what runs: None when
    nothing is compressed, else the config with its layers sorted.
    """

    family = "PixArt"
    condition = "text"
    prediction = "epsilon"
    fixed_size = False
    condition_extras: dict = {}

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        learn_sigma: bool = True,
        out_channels: int | None = None,
        use_additional_conditions: bool = False,
        interpolation_scale: float | None = None,
        model_max_length: int | None = 120,
        eps: float = EPS,
        qk_norm: bool = False,
        kv_compress_config: dict | None = None,
    ):
        super().__init__()
        D = hidden_size
        if D % num_heads:
            raise ValueError(f"PixArt: `num_heads` expected to divide hidden_size={D}, got {num_heads}")
        if depth < 1:
            raise ValueError(f"PixArt: `depth` expected >= 1 blocks, got {depth}")
        if sample_size % patch_size:
            raise ValueError(f"PixArt: `sample_size` expected a multiple of patch_size={patch_size}, got {sample_size}")
        if use_additional_conditions and D % 3:
            raise ValueError(f"PixArt: `hidden_size` expected a multiple of 3 with use_additional_conditions "
                             f"(resolution: 2 x D/3 features, aspect ratio: D/3), got {D}")
        if interpolation_scale is None:
            interpolation_scale = float(max(sample_size // 64, 1))
        if not interpolation_scale > 0:
            raise ValueError(f"PixArt: `interpolation_scale` expected > 0, got {interpolation_scale}")
        if not isinstance(qk_norm, bool):
            raise ValueError(f"PixArt: `qk_norm` expected a bool, got {qk_norm!r}")
        plan = kv_compress_plan("PixArt", kv_compress_config, depth)
        self.sample_size, self.patch_size, self.in_channels = sample_size, patch_size, in_channels
        self.hidden_size, self.num_heads, self.num_blocks, self.min_depth = D, num_heads, depth, 1
        self.min_reuse_depth = 0  # depth 0 with an exit cache: no block runs
        self.mlp_ratio, self.caption_channels = mlp_ratio, caption_channels
        if out_channels is None:
            out_channels = 2 * in_channels if learn_sigma else in_channels
        self.out_channels = out_channels
        self.learn_sigma = out_channels == 2 * in_channels
        self.use_additional_conditions = bool(use_additional_conditions)
        self.interpolation_scale, self.model_max_length, self.eps = float(interpolation_scale), model_max_length, eps
        self.base_size = sample_size // patch_size
        self.token_dim, self.pooled_dim = caption_channels, None
        self.condition_extras = {"resolution": (2,), "aspect_ratio": (1,)} if use_additional_conditions else {}
        self.input_size, self.input_multiple = None, patch_size
        self.num_classes, self.null_class = None, None
        self.source_layout = "original"  # what state_dict_in() writes by default: the layout a loader read
        self._pos_cache: dict = {}
        self.qk_norm, self._kv_plan = qk_norm, plan
        self.kv_compress_config = None if plan is None else dict(zip(_KV_KEYS, (plan[0], plan[1], list(plan[2]))))

        self.x_embedder = L.PatchEmbed(patch_size, in_channels, D)
        self.register_buffer("pos_embed", pixart_pos_embed(D, self.base_size, self.base_size, self.base_size,
                                                           self.interpolation_scale))
        self.t_embedder = Embedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = CaptionEmbedder(caption_channels, D, model_max_length)
        if use_additional_conditions:
            self.csize_embedder, self.ar_embedder = Embedder(D // 3), Embedder(D // 3)
        self.blocks = nn.ModuleList(
            PixArtBlock(D, num_heads, mlp_ratio, eps, qk_norm, *(plan[:2] if plan and i in plan[2] else (None, 1)))
            for i in range(depth))
        self.final_layer = FinalLayer(D, patch_size, out_channels)
        #: every block's scale_shift_table (6, D), stacked: one add gives all active blocks' modulations.
        self.adaLN_scale_shift = nn.Parameter(torch.empty(depth, 6, D))
        self.initialize_weights()

    # ---------------------------------------------------------------- init and parameter views
    def initialize_weights(self) -> None:
        """PixArt-alpha's init: xavier linears with zero biases, N(0, 0.02) embedders, t_block and caption MLP,
        zero cross-attention output and final linear, scale-shift tables and null caption ~ N(0, 1/width)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        normal = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                  self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        if self.use_additional_conditions:
            normal += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2], self.ar_embedder.mlp[0],
                       self.ar_embedder.mlp[2]]
        for m in normal:
            nn.init.normal_(m.weight, std=0.02)
        for b in self.blocks:
            nn.init.zeros_(b.cross_attn.proj.weight)
            nn.init.zeros_(b.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        D = self.hidden_size
        with torch.no_grad():
            self.adaLN_scale_shift.copy_(torch.randn(self.adaLN_scale_shift.shape) / D ** 0.5)
            self.final_layer.scale_shift_table.copy_(torch.randn(2, D) / D ** 0.5)
            if self.y_embedder.y_embedding is not None:
                self.y_embedder.y_embedding.copy_(torch.randn(self.y_embedder.y_embedding.shape)
                                                  / self.caption_channels ** 0.5)

    def block_scale_shift_table(self, i: int) -> torch.Tensor:
        """A view (not a copy) of block i's (6, D) ``scale_shift_table`` inside the stacked parameter."""
        return self.adaLN_scale_shift[i]

    # ---------------------------------------------------------------- conditions
    def null_condition(self, batch: int, length: int, device=None, dtype=None):
        """The unconditional caption for classifier-free guidance: the learned ``y_embedding`` (what PixArt
        was trained to take for a dropped caption), ``batch`` copies, mask all ones; ``length`` must be its
        row count (120 for PixArt-α, 300 for Σ). PixArt-α 1024's extras are not included: CFG's
        ``cond.cat(null)`` needs them on both halves, so add ``extra=`` the conditional ones."""
        null = self.y_embedder.y_embedding
        if null is None:
            raise ValueError("PixArt: this model has no learned null caption (`y_embedder.y_embedding`; diffusers' "
                             "converters drop it); pass the negative-prompt embeddings (the T5 states of the empty "
                             "prompt) as the unconditional TextCondition")
        if length != null.shape[0]:
            raise ValueError(f"PixArt.null_condition: `length` expected {null.shape[0]} (the learned null caption's "
                             f"tokens; pad the captions to it), got {length}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"PixArt.null_condition: `batch` expected a positive int, got {batch!r}")
        device = null.device if device is None else device
        tokens = null.detach().to(device=device, dtype=dtype or null.dtype)[None].repeat(batch, 1, 1)
        return TextCondition(tokens, torch.ones(batch, length, dtype=torch.bool, device=device))

    def _check(self, y):
        if self.use_additional_conditions:
            missing = [k for k in ("resolution", "aspect_ratio") if y.extra.get(k) is None]
            if missing:
                raise ValueError(f"PixArt: `y.extra` expected {missing} (PixArt-α 1024's additional conditions: "
                                 "resolution (B, 2) = image height, width; aspect_ratio (B, 1) = height / width), "
                                 f"got keys {sorted(y.extra)}")

    def check_grid(self, h: int, w: int) -> None:
        """A patch grid (``h`` x ``w`` patches) the KV compression can take (PixArt-sigma fails on the others),
        else ValueError; the forward checks it, callers can before any work."""
        if self._kv_plan is None:
            return
        sampling, s, _ = self._kv_plan
        if sampling == "uniform":
            ok, want = h % s == 0 and w % s == 0, f"patch-grid sides that are multiples of {s}"
        elif sampling == "uniform_every":
            ok, want = (h * w) % s == 0, f"a patch count that is a multiple of {s}"
        else:
            ok, want = h >= s and w >= s, f"patch-grid sides of at least {s}"
        if not ok:
            p = self.patch_size
            raise ValueError(f"PixArt: `x` expected {want} (kv_compress_config: {sampling!r} sampling by {s}; "
                             f"patch {p}), got H, W = {h * p}, {w * p} (a {h} x {w} grid)")

    def pos_table(self, h: int, w: int, device) -> torch.Tensor:
        """(1, h*w, D) float32 positions of an h x w patch grid: the stored table for the training grid, else
        computed (once per grid and device) on ``device``."""
        if (h, w) == (self.base_size, self.base_size):
            return self.pos_embed
        key = (h, w, str(device))
        table = self._pos_cache.get(key)
        if table is None:
            table = pixart_pos_embed(self.hidden_size, h, w, self.base_size, self.interpolation_scale, device)
            self._pos_cache[key] = table
        return table

    # ---------------------------------------------------------------- the scaffold's hooks
    def embed(self, x, t, y, depth):
        """Patch tokens, the projected caption and its mask bias, and the modulations of the ``depth`` active
        blocks and of the final layer as (B, D) chunks."""
        self._check(y)
        B, D, dt = x.shape[0], self.hidden_size, x.dtype
        depth = max(depth, 1)  # depth 0 (no block, exit cache): block 0's entry norm is still formed (unused)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        self.check_grid(h, w)
        # pos first: the sum takes its contiguous layout, not the patches' transposed one.
        tokens = self.pos_table(h, w, x.device).to(dt) + self.x_embedder(x).to(dt)
        yp = self.y_embedder.y_proj
        c = yp(y.tokens.to(yp.fc1.weight.dtype)).to(dt)
        bias = None
        if y.mask is not None:
            bias = torch.zeros(y.mask.shape, dtype=dt, device=x.device).masked_fill_(~y.mask, MASK_BIAS)[:, None, None]
        t_emb = self.t_embedder(t, dt)
        if self.use_additional_conditions:
            t_emb = t_emb + torch.cat([self.csize_embedder(y.extra["resolution"], dt),
                                       self.ar_embedder(y.extra["aspect_ratio"], dt)], dim=1)
        lin = self.t_block[1]
        t6 = F.linear(F.silu(t_emb), lin.weight, lin.bias)
        # One add for every active block: (B, depth, 6, D); chunk 6i + k is block i's k-th (B, D) modulation.
        mods = (t6.view(B, 1, 6, D) + self.adaLN_scale_shift[:depth]).to(dt)
        final = (self.final_layer.scale_shift_table[None] + t_emb[:, None]).to(dt)
        chunks = mods.view(B, 6 * depth, D).unbind(1)
        cond = dict(chunks=chunks, final=(final[:, 0], final[:, 1]), context=c, bias=bias, grid=(h, w))
        return Carry(tokens, modulated_layer_norm(tokens, chunks[0], chunks[1], self.eps)), cond

    def block_inputs(self, cond, i, n):
        ch = cond["chunks"]
        bias = cond["bias"]
        return dict(mod=[v[:n] for v in ch[6 * i + 2: 6 * i + 6]], context=cond["context"][:n],
                    bias=None if bias is None else bias[:n], grid=cond["grid"])

    def entry_norm(self, cond, j):
        return NextNorm(self.eps, shift=cond["chunks"][6 * j], scale=cond["chunks"][6 * j + 1])

    def head_norm(self, cond):
        shift, scale = cond["final"]
        return NextNorm(self.eps, shift=shift, scale=scale)

    def head(self, h, cond):
        return self.final_layer.linear(h)

    def unembed(self, out, cond):
        """(B, h*w, p*p*C) with features ordered (p, q, C) -> (B, C, h*p, w*p)."""
        (h, w), p, C = cond["grid"], self.patch_size, self.out_channels
        out = out.reshape(out.shape[0], h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(out.shape[0], C, h * p, w * p)

    # ---------------------------------------------------------------- constructors and layouts
    @classmethod
    def from_config(cls, name: str, **overrides) -> "PixArt":
        """A randomly initialized model of a named config (``PIXART_CONFIGS``), e.g. ``"PixArt-Sigma-XL/2-1024"``."""
        if name not in PIXART_CONFIGS:
            raise ValueError(f"PixArt: unknown config {name!r}; known: {sorted(PIXART_CONFIGS)}")
        return cls(**{**PIXART_CONFIGS[name], **overrides})

    def _original_views(self) -> dict:
        """``{PixArt-alpha key: view}`` of the stacked per-block scale-shift tables."""
        return {f"blocks.{i}.scale_shift_table": self.adaLN_scale_shift[i] for i in range(self.num_blocks)}

    def state_dict_in(self, layout: str | None = None) -> dict:
        """This model's weights in ``layout``: "original" (PixArt-alpha / PixArt-sigma: ``load_state_dict`` of
        ``PixArt`` / ``PixArtMS``, ``pos_embed`` and ``y_embedder.y_embedding`` included when the model has a
        null caption) or "diffusers" (``PixArtTransformer2DModel.load_state_dict(strict=True)``; no null caption
        or position table, which diffusers does not hold; refused for a model with ``qk_norm`` or KV compression,
        which diffusers' model has no option for). Default: the layout the model was loaded from. Tensors are
        detached copies."""
        layout = self.source_layout if layout is None else layout
        if layout not in LAYOUTS:
            raise ValueError(f"PixArt.state_dict_in: `layout` expected one of {LAYOUTS}, got {layout!r}")
        if layout == "diffusers" and (self.qk_norm or self.kv_compress_config is not None):
            on = [k for k, v in (("qk_norm", self.qk_norm), ("kv_compress_config", self.kv_compress_config)) if v]
            raise ValueError(f"PixArt.state_dict_in: `layout` 'diffusers' cannot hold this model's {on} "
                             "(diffusers' PixArtTransformer2DModel has no such option); use layout='original'")
        state = {k: v for k, v in self.state_dict().items() if k != convert.OWN_MARKER}
        state.update(self._original_views())
        state = {k: v.detach().clone() for k, v in state.items()}
        if layout == "diffusers":
            state = convert.original_to_diffusers("PixArt.state_dict_in", state)
        return state

    @classmethod
    def from_checkpoint(cls, path_or_state, *, num_heads: int | None = None, which: str | None = None,
                        sample_size: int | None = None, interpolation_scale: float | None = None,
                        config=None, **overrides) -> "PixArt":
        """Load the PixArt-alpha / PixArt-sigma layout (``PixArt-XL-2-1024-MS.pth``: ``{"state_dict": ...}``), the
        diffusers layout, or this class's own ``state_dict()``; a path (``.safetensors`` via the safetensors
        package, else ``torch.load(weights_only=True)``) or a dict. The layout is detected from the keys; the
        configuration comes from the tensor shapes, the heads from the named configs (``num_heads=`` else).

        Sample size and position scale: read from the checkpoint's ``pos_embed`` (the original and own layouts
        hold the training grid's table; the scale is the one of 0.5, 1, 2, 4 that reproduces it), else from
        ``sample_size=`` / ``interpolation_scale=``, else diffusers' defaults (128, ``max(sample_size // 64,
        1)``).

        PixArt-Σ's self-attention options: ``qk_norm`` and "conv" KV compression are read from the weights
        (``blocks.i.attn.q_norm`` / ``attn.sr``); the KV samplings without weights ("uniform", "ave",
        "uniform_every") only from ``config`` (the checkpoint's PixArt-sigma training config: a dict of its
        variables or the path of its ``.py`` file, see ``convert.pixart.read_config``) or ``qk_norm=`` /
        ``kv_compress_config=``, which win over ``config``. Either must agree with the weights (ValueError
        naming the option). Without them a weightless compression cannot be seen: it runs uncompressed. Eval mode.
        """
        where = "PixArt.from_checkpoint"
        state = L.load_state(where, path_or_state, which)
        layout = convert.detect_layout(where, state)
        if layout == "diffusers":
            state = convert.diffusers_to_original(where, state)
        cfg = convert.pixart_config(where, state, num_heads, PIXART_CONFIGS)
        given = {} if config is None else convert.read_config(where, config)
        given.update((k, overrides.pop(k)) for k in ("qk_norm", "kv_compress_config") if k in overrides)
        _take_options(where, cfg, given)
        pos = state.get("pos_embed")
        if pos is not None:
            sample_size, interpolation_scale = _grid_of(where, pos, cfg, sample_size, interpolation_scale)
        cfg.update(sample_size=128 if sample_size is None else sample_size, interpolation_scale=interpolation_scale)
        model = cls(**{**cfg, **overrides})
        targets = dict(model.state_dict(keep_vars=True))
        if layout != "own":
            del targets[convert.OWN_MARKER]
            targets.update(model._original_views())
        if pos is None:
            del targets["pos_embed"]  # computed from the configuration
        L.copy_into(where, targets, state)
        model.source_layout = "diffusers" if layout == "diffusers" else "original"
        return model.eval()

    @classmethod
    def from_diffusers(cls, module_or_state_dict, **overrides) -> "PixArt":
        """Load diffusers' ``PixArtTransformer2DModel`` (a module, or its state dict; a path reads as in
        ``from_checkpoint``). From a module its config is checked and used (heads, sample size, position scale,
        additional conditions); from a state dict the configuration comes from the tensor shapes and the
        named configs (``num_heads=``, ``sample_size=``, ``interpolation_scale=`` override). diffusers holds no
        null caption: ``null_condition`` then raises (pass negative-prompt embeddings). Eval mode;
        ``state_dict_in()`` writes diffusers keys.
        """
        where = "PixArt.from_diffusers"
        for option in ("qk_norm", "kv_compress_config", "config"):
            if overrides.get(option):
                raise ValueError(f"{where}: `{option}` expected unset (diffusers' PixArtTransformer2DModel has no "
                                 f"QK-norm or KV compression), got {overrides[option]!r}; use PixArt.from_checkpoint "
                                 "on the PixArt-sigma checkpoint")
        if isinstance(module_or_state_dict, nn.Module):
            config = dict(module_or_state_dict.config)
            checks = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate", norm_elementwise_affine=False,
                          attention_bias=True, attention_type="default", norm_eps=EPS)
            bad = {k: config.get(k) for k, v in checks.items() if config.get(k, v) != v}
            if config.get("caption_channels") is None:
                bad["caption_channels"] = None
            inner = config["num_attention_heads"] * config["attention_head_dim"]
            if config.get("cross_attention_dim") != inner:
                bad["cross_attention_dim"] = config.get("cross_attention_dim")
            for option in ("qk_norm", "kv_compress", "kv_compress_config"):  # none in diffusers 0.42; never ignored
                if config.get(option):
                    bad[option] = config[option]
            if bad:
                raise ValueError(f"{where}: expected a PixArt config ({checks}, caption_channels set, "
                                 f"cross_attention_dim = heads * head_dim = {inner}), got {bad}")
            state = dict(module_or_state_dict.state_dict())
            overrides = {"num_heads": config["num_attention_heads"], "sample_size": config["sample_size"],
                         "interpolation_scale": module_or_state_dict.pos_embed.interpolation_scale, **overrides}
        else:
            state = L.load_state(where, module_or_state_dict)
        if convert.detect_layout(where, state) != "diffusers":
            raise ValueError(f"{where}: expected the diffusers layout (`transformer_blocks.0.attn1.to_q.weight`...), "
                             "got another; use PixArt.from_checkpoint")
        model = cls.from_checkpoint(state, **overrides)
        model.source_layout = "diffusers"
        return model


def _take_options(where: str, cfg: dict, given: dict) -> None:
    """Put the caller's ``qk_norm`` / ``kv_compress_config`` into ``cfg`` (what the weights show), checking that
    they agree with the weights: QK-norm and "conv" compression have weights, the other samplings none."""
    if "qk_norm" in given:
        q = given["qk_norm"]
        if not isinstance(q, bool):
            raise ValueError(f"{where}: `qk_norm` expected a bool, got {q!r}")
        if q != cfg["qk_norm"]:
            raise ValueError(f"{where}: `qk_norm` is {q}, but the checkpoint {'holds' if cfg['qk_norm'] else 'has no'} "
                             "PixArt-sigma's QK-norm weights (`blocks.i.attn.q_norm` / `k_norm`)")
    if "kv_compress_config" in given:
        depth = cfg["depth"]
        want = kv_compress_plan(where, given["kv_compress_config"], depth)
        have = kv_compress_plan(where, cfg["kv_compress_config"], depth)  # "conv" or None
        if want != have and (have is not None or want[0] == "conv"):
            held = (f"'conv' compression of blocks {list(have[2])} by {have[1]}" if have else
                    "no 'conv' compression weights")
            raise ValueError(f"{where}: `kv_compress_config` {given['kv_compress_config']!r} does not fit the "
                             f"checkpoint, whose `blocks.i.attn.sr` / `attn.norm` weights say {held}")
        cfg["kv_compress_config"] = given["kv_compress_config"]


_SCALES = (0.5, 1.0, 2.0, 4.0)


def _grid_of(where: str, pos: torch.Tensor, cfg: dict, sample_size, interpolation_scale):
    """``(sample_size, interpolation_scale)`` from a checkpoint's ``pos_embed`` (1, g*g, D)."""
    D, p = cfg["hidden_size"], cfg["patch_size"]
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != D:
        raise ValueError(f"{where}: checkpoint key 'pos_embed' expected shape (1, grid*grid, {D}), got "
                         f"{tuple(pos.shape)}")
    g = L.square_grid(where, pos.shape[1])
    if sample_size is not None and sample_size != g * p:
        raise ValueError(f"{where}: `sample_size` {sample_size} does not fit the checkpoint's pos_embed (a {g} x {g} "
                         f"grid of patch {p}: sample_size {g * p})")
    if interpolation_scale is None:
        ref = pos.detach().float().cpu()[0]
        for s in _SCALES:
            if torch.allclose(pixart_pos_embed(D, g, g, g, s)[0], ref, atol=1e-4, rtol=0):
                interpolation_scale = s
                break
        else:
            raise ValueError(f"{where}: the checkpoint's pos_embed is not PixArt's sin-cos table at any position "
                             f"scale {_SCALES}; pass interpolation_scale=")
    return g * p, interpolation_scale

