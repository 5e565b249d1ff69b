"""U-Net score network: diffusers' ``UNet2DModel`` family on eekernels ops, with early exit by resolution level.

Architecture (diffusers ``UNet2DModel``, ``time_embedding_type="positional"``):
``conv_in`` -> down blocks (``DownBlock2D`` / ``AttnDownBlock2D``: ResnetBlock2D [+ attention] x
``layers_per_block``, then a stride-2 conv, except the last) -> ``UNetMidBlock2D`` (resnet, [attention,
resnet] ...) -> up blocks (``UpBlock2D`` / ``AttnUpBlock2D``: ``layers_per_block + 1`` resnets on
``cat([h, skip])`` [+ attention], then nearest x2 + conv, except the last) -> GroupNorm + SiLU -> ``conv_out``.
Built on ``eekernels.ops.group_norm_act`` (every GroupNorm with its SiLU, and the ``"scale_shift"`` time
modulation, in one op), ``linear_act`` (time MLP with its SiLU, fused QKV, attention output),
``F.conv2d`` and ``F.scaled_dot_product_attention``. ``UNet.from_diffusers`` converts a diffusers
module, or its state dict plus config dict.

Data flow choices (same function as diffusers, fewer launches):
- the ``time_emb_proj`` of every resnet is one GEMM on ``silu(emb)``; its rows are laid out level by level
  (level 0's down and up resnets, then level 1's, ..., then the mid block's), so the resnets of the first
  ``depth`` levels use a contiguous row prefix and a truncated call projects only those;
- ``to_q``, ``to_k``, ``to_v`` are one GEMM.

Early exit (``depth``; L = ``num_blocks`` = the number of down blocks = resolution levels):
Level l (0 = full resolution) consists of down block l, up block ``L-1-l`` (the up block that works at
level l's resolution) and, for l = L-1, the mid block. ``depth = d`` evaluates levels 0..d-1:
- ``conv_in`` and down blocks 0..d-1 run; down block d-1 runs its resnets/attentions but not its
  downsampler (for d = L it has none anyway).
- Levels d..L-1, the mid block and their up blocks are skipped.
- The up block of level d-1 normally receives ``deep``: the output of the up block of level d, which ends
  with that block's upsampler (for d = L: the mid block's output). It is concatenated with level d-1's
  skips inside that up block's first resnet. At truncated depth ``deep`` is replaced by zeros of its
  shape ``(B, block_out_channels[d], H_{d-1}, W_{d-1})``; everything from the up block of level d-1 on
  (its skips, the remaining up blocks, ``conv_norm_out``, ``conv_out``) runs unchanged.
- Why zeros there: ``deep`` is exactly what the skipped part contributes. Replacing it with zero keeps every
  weight of the run levels in place and gives the network the function that ASE fine-tuning trains
  under the schedule ("skipped levels contribute zero", the fine-tuned setting). Zeroing anything
  earlier (e.g. a skip) would also remove the work of levels that ran.
- ``depth = L`` (or None) is exactly diffusers' function.

``exit_cache`` (``eekernels.models.cache.ExitCache``, DeepCache-style, int depth only): at full depth the
model stores, for every ``d`` in ``cache.depths`` with ``d < L``, that call's ``deep`` tensor for level
``d-1``; a truncated call at depth ``d`` uses the stored tensor instead of zeros (same batch shape required).
With an unchanged input the truncated cached call therefore equals the full call.

Per-sample depth (LongTensor (B,), values in [1, L]): the batch is sorted by depth, descending
(``scaffold.plan_depth``), so level l runs on a contiguous prefix of the sorted batch: no wasted FLOPs and
no gather per block. In the up block of level l, the rows whose depth is exactly l+1 get zeros as
``deep`` and the deeper rows get the level below's output (one ``cat``). Outputs come back in the caller's
order, and each sample equals its solo run at its depth. This costs one host sync per forward (copying the
sorted depths to the host to size each level's prefix, and to validate them); a tensor whose values are
all equal runs as that int, in caller order. An int depth costs no sync. A depth tensor together with
``exit_cache`` is an error (one trajectory, one depth).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.models import convert
from eekernels.models._layers import copy_into, timestep_embedding, warn_nonfinite
from eekernels.models.scaffold import ScoreModel
from eekernels.ops import group_norm_act, linear_act

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)
TIME_SCALE_SHIFT = ("default", "scale_shift")


# Named configs (diffusers' google/ddpm-* checkpoints); the CLI offers the names as choices.
_DDPM = dict(in_channels=3, out_channels=3, layers_per_block=2, attention_head_dim=None, downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)
UNET_CONFIGS = {
    # google/ddpm-cifar10-32 (35.7M parameters)
    "DDPM-CIFAR10-32": dict(_DDPM, sample_size=32, block_out_channels=(128, 256, 256, 256),
                            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # google/ddpm-{cat,church,bedroom,celebahq}-256 (113.7M parameters)
    "DDPM-256": dict(_DDPM, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
}


def _err(name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"UNet: `{name}` expected {expected}, got {got!r}")


def _block_type(name: str) -> str:
    # diffusers' get_down_block/get_up_block accept a "UNetRes" prefix and strip it.
    return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def _gn_act(norm: nn.GroupNorm, x, activation="silu", scale=None, shift=None):
    # nn.GroupNorm only holds the parameters (diffusers' names); the op does the work.
    return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, scale=scale, shift=shift,
                          activation=activation, eps=norm.eps)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """diffusers ResnetBlock2D: GN+SiLU, conv3x3, + time (add or scale/shift), GN+SiLU, conv3x3, + shortcut."""

    def __init__(self, cin, cout, groups, eps, time_scale_shift="default", output_scale_factor=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.scale_shift = time_scale_shift == "scale_shift"
        self.output_scale_factor = float(output_scale_factor)
        self.temb_width = 2 * cout if self.scale_shift else cout  # columns of the shared time projection

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, cin, H, W); temb: (B, temb_width), this block's slice of the shared time projection."""
        h = _conv(self.conv1, _gn_act(self.norm1, x))
        if self.scale_shift:
            scale, shift = temb.chunk(2, dim=1)
            h = _gn_act(self.norm2, h, scale=scale, shift=shift)
        else:
            h = _gn_act(self.norm2, h + temb[:, :, None, None])
        h = _conv(self.conv2, h)
        skip = x if self.conv_shortcut is None else _conv(self.conv_shortcut, x)
        out = skip + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class AttnBlock(nn.Module):
    """diffusers Attention as used in UNet2D blocks: [GN], fused QKV, SDPA over H*W tokens, proj, + residual."""

    def __init__(self, channels, head_dim, groups, eps, rescale_output_factor=1.0):
        super().__init__()
        head_dim = channels if head_dim is None else head_dim
        self.heads = channels // head_dim
        self.head_dim = head_dim
        inner = self.heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None
        self.to_qkv = nn.Linear(channels, 3 * inner)
        self.to_out = nn.Linear(inner, channels)
        self.rescale_output_factor = float(rescale_output_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = x if self.group_norm is None else _gn_act(self.group_norm, x, activation=None)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = linear_act(h, self.to_qkv.weight, self.to_qkv.bias)
        q, k, v = qkv.view(B, H * W, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, head_dim)
        a = a.transpose(1, 2).reshape(B, H * W, self.heads * self.head_dim)
        out = linear_act(a, self.to_out.weight, self.to_out.bias)
        out = out.transpose(1, 2).reshape(B, C, H, W) + x
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


class Level(nn.Module):
    """Resnets [+ attentions] of one down or up block, plus its resampling conv (diffusers Down/UpBlock2D)."""

    def __init__(self, resnets, attentions=None, downsample=None, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.downsample = downsample  # stride-2 conv3x3 (diffusers Downsample2D, padding 0 pads right/bottom)
        self.upsample = upsample  # conv3x3 after nearest x2 (diffusers Upsample2D)

    def layers(self):
        attns = self.attentions if self.attentions is not None else [None] * len(self.resnets)
        return zip(self.resnets, attns)


class TimeMLP(nn.Module):
    """diffusers TimestepEmbedding: linear_1, SiLU, linear_2."""

    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class UNet(ScoreModel):
    """diffusers UNet2DModel (positional time, optional class embedding) with early exit by resolution level.

    Constructor arguments are diffusers' ``UNet2DModel`` config names; see the module docstring for the
    early-exit semantics. ``null_class`` (optional): the label index used as the classifier-free-guidance
    null label; it must be the last embedding (``num_class_embeds - 1``), labels are then
    ``0..num_classes - 1`` with ``num_classes = num_class_embeds - 1`` (DiT's convention).
    """

    family = "UNet"
    prediction = "epsilon"  # the noise, as diffusers' DDPM checkpoints (their scheduler's default prediction_type)
    fixed_size = False  # any H, W divisible by input_multiple (2 ** (num_blocks - 1))

    def __init__(
        self,
        sample_size=None,
        in_channels=3,
        out_channels=3,
        center_input_sample=False,
        time_embedding_type="positional",
        time_embedding_dim=None,
        freq_shift=0,
        flip_sin_to_cos=True,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(224, 448, 672, 896),
        layers_per_block=2,
        mid_block_scale_factor=1.0,
        downsample_padding=1,
        downsample_type="conv",
        upsample_type="conv",
        act_fn="silu",
        attention_head_dim=8,
        norm_num_groups=32,
        attn_norm_num_groups=None,
        norm_eps=1e-5,
        resnet_time_scale_shift="default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=None,
        null_class=None,
    ):
        super().__init__()
        down_block_types = tuple(_block_type(b) for b in down_block_types)
        up_block_types = tuple(_block_type(b) for b in up_block_types)
        boc = tuple(int(c) for c in block_out_channels)
        L = len(boc)
        # ---- config checks: anything this implementation does not compute is an error, never ignored
        for name, got, ok in (
            ("down_block_types", down_block_types, DOWN_BLOCKS),
            ("up_block_types", up_block_types, UP_BLOCKS),
        ):
            bad = [b for b in got if b not in ok]
            if bad:
                raise _err(name, f"block types among the supported {ok}", bad)
        if len(down_block_types) != L or len(up_block_types) != L or L < 1:
            raise _err("down_block_types/up_block_types", f"{L} each (one per block_out_channels entry)",
                       (down_block_types, up_block_types))
        checks = (
            ("mid_block_type", mid_block_type, MID_BLOCKS),
            ("time_embedding_type", time_embedding_type, ("positional",)),
            ("resnet_time_scale_shift", resnet_time_scale_shift, TIME_SCALE_SHIFT),
            ("act_fn", act_fn, ("silu", "swish")),
            ("downsample_type", downsample_type, ("conv",)),
            ("upsample_type", upsample_type, ("conv",)),
            ("class_embed_type", class_embed_type, (None,)),
        )
        for name, got, ok in checks:
            if got not in ok:
                raise _err(name, f"one of the supported {ok}", got)
        if num_class_embeds is None and null_class is not None:
            raise _err("null_class", "None for an unconditional model (num_class_embeds None)", null_class)
        if null_class is not None and null_class != num_class_embeds - 1:
            raise _err("null_class", f"None or the last label index {num_class_embeds - 1}", null_class)

        self.num_blocks = L
        self.min_depth = 1
        self.input_multiple = 2 ** (L - 1)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.learn_sigma = False
        self.input_size = sample_size
        self.block_out_channels = boc
        self.center_input_sample = bool(center_input_sample)
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.freq_shift = freq_shift
        self.null_class = null_class
        self.num_classes = None if num_class_embeds is None else num_class_embeds - (null_class is not None)
        self.config = dict(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            center_input_sample=center_input_sample, time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift, flip_sin_to_cos=flip_sin_to_cos, down_block_types=down_block_types,
            mid_block_type=mid_block_type, up_block_types=up_block_types, block_out_channels=boc,
            layers_per_block=layers_per_block, mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, attn_norm_num_groups=attn_norm_num_groups, norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift, add_attention=add_attention,
            num_class_embeds=num_class_embeds, null_class=null_class,
        )
        G, eps, tss = norm_num_groups, norm_eps, resnet_time_scale_shift
        temb_dim = time_embedding_dim or boc[0] * 4

        # ---- input, time and class embeddings
        self.conv_in = nn.Conv2d(in_channels, boc[0], 3, padding=1)
        self.time_embedding = TimeMLP(boc[0], temb_dim)
        self.class_embedding = nn.Embedding(num_class_embeds, temb_dim) if num_class_embeds is not None else None

        # ---- down blocks (level l), up blocks (up_blocks[i] works at level L-1-i), mid block
        def res(cin, cout, osf=1.0):
            return ResBlock(cin, cout, G, eps, tss, osf)

        def attn(c, groups=G, osf=1.0):
            return AttnBlock(c, attention_head_dim, groups, eps, osf)

        self.down_blocks = nn.ModuleList()
        for l, kind in enumerate(down_block_types):
            cin, cout = boc[max(l - 1, 0)], boc[l]
            resnets = [res(cin if j == 0 else cout, cout) for j in range(layers_per_block)]
            attns = [attn(cout) for _ in resnets] if kind == "AttnDownBlock2D" else None
            down = nn.Conv2d(cout, cout, 3, stride=2, padding=downsample_padding) if l < L - 1 else None
            self.down_blocks.append(Level(resnets, attns, downsample=down))
        self.downsample_padding = downsample_padding

        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(up_block_types):
            l = L - 1 - i
            cout, prev, skip_in = boc[l], boc[min(l + 1, L - 1)], boc[max(l - 1, 0)]
            n = layers_per_block + 1
            resnets = [res((prev if j == 0 else cout) + (skip_in if j == n - 1 else cout), cout) for j in range(n)]
            attns = [attn(cout) for _ in resnets] if kind == "AttnUpBlock2D" else None
            up = nn.Conv2d(cout, cout, 3, padding=1) if l > 0 else None
            self.up_blocks.append(Level(resnets, attns, upsample=up))

        self.mid_block = None
        if mid_block_type is not None:
            c, osf = boc[-1], mid_block_scale_factor
            # diffusers: the mid attention has a GroupNorm with attn_norm_num_groups, else with the resnet
            # groups only under "default" time conditioning.
            mid_groups = attn_norm_num_groups if attn_norm_num_groups is not None else (G if tss == "default" else None)
            attns = [attn(c, mid_groups, osf)] if add_attention else None
            self.mid_block = Level([res(c, c, osf), res(c, c, osf)], attns)

        # ---- one time projection for every resnet, rows level by level (see module docstring)
        self._temb_ends = []  # row end of the projection needed for depth d (index d - 1)
        offset = 0
        for l in range(L):
            for r in list(self.down_blocks[l].resnets) + list(self.up_blocks[L - 1 - l].resnets):
                r.temb_offset = offset
                offset += r.temb_width
            self._temb_ends.append(offset)
        if self.mid_block is not None:
            for r in self.mid_block.resnets:
                r.temb_offset = offset
                offset += r.temb_width
            self._temb_ends[-1] = offset
        self.time_emb_proj = nn.Linear(temb_dim, offset)

        # ---- output
        self.conv_norm_out = nn.GroupNorm(G, boc[0], eps=eps)
        self.conv_out = nn.Conv2d(boc[0], out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    # ---------------------------------------------------------------------------------------------
    # Forward: U-Net's early-exit rule (by resolution level; see the module docstring)
    # ---------------------------------------------------------------------------------------------
    def forward_sorted(self, x, t, y, plan, exit_cache):
        """The depth-sorted batch in the model's dtype (x is cast to it): level l on the first runs[l] rows."""
        L = self.num_blocks
        # runs[l]: leading (sorted) rows that run level l; runs[L]: rows that reach the mid block.
        runs = plan.counts + [0] * (L - plan.depth) + [plan.counts[-1] if plan.depth == L else 0]
        return self._forward(x.to(self.dtype), t, y, runs, plan.depth, exit_cache)

    def _forward(self, x, t, y, runs, max_depth, cache):
        """runs[l]: how many leading rows run level l (non-increasing); runs[L]: rows that run the mid block."""
        L = self.num_blocks
        if self.center_input_sample:
            x = 2 * x - 1.0

        # ---- time (and class) embedding; silu(emb) is all the resnets use
        te = timestep_embedding(t, self.block_out_channels[0], freq_shift=self.freq_shift,
                                  flip_sin_to_cos=self.flip_sin_to_cos).to(x.dtype)
        mlp = self.time_embedding
        h = linear_act(te, mlp.linear_1.weight, mlp.linear_1.bias, activation="silu")
        if self.class_embedding is None:
            emb = linear_act(h, mlp.linear_2.weight, mlp.linear_2.bias, activation="silu")
        else:
            emb = linear_act(h, mlp.linear_2.weight, mlp.linear_2.bias) + self.class_embedding(y)
            emb = F.silu(emb)
        end = self._temb_ends[max_depth - 1]
        temb = linear_act(emb, self.time_emb_proj.weight[:end], self.time_emb_proj.bias[:end])

        def resnet(r, h):
            return r(h, temb[: h.shape[0], r.temb_offset: r.temb_offset + r.temb_width])

        # ---- down: level l on the first runs[l] rows; its downsampler only for rows that go deeper
        h = _conv(self.conv_in, x)
        skips = [h]
        for l in range(L):
            blk = self.down_blocks[l]
            h = h[: runs[l]]
            for r, a in blk.layers():
                h = resnet(r, h)
                h = a(h) if a is not None else h
                skips.append(h)
            if blk.downsample is not None and runs[l + 1] > 0:
                h = h[: runs[l + 1]]
                if self.downsample_padding == 0:  # diffusers Downsample2D pads right/bottom by one
                    h = F.pad(h, (0, 1, 0, 1))
                h = _conv(blk.downsample, h)
                skips.append(h)
            if runs[l + 1] == 0:
                break

        # ---- mid
        if runs[L] > 0 and self.mid_block is not None:
            h = resnet(self.mid_block.resnets[0], h)
            for r, a in zip(self.mid_block.resnets[1:], self.mid_block.attentions or [None]):
                h = a(h) if a is not None else h
                h = resnet(r, h)

        # ---- up: level l's block takes `deep` (the level below's upsampled output; zeros or cached when
        # truncated) concatenated with its skips; rows runs[l+1]: runs[l] stopped at level l and get zeros.
        deep = h if runs[L] > 0 else None
        for l in reversed(range(L)):
            if runs[l] == 0:
                continue
            blk = self.up_blocks[L - 1 - l]
            rows, n_deep = runs[l], runs[l + 1]
            if n_deep < rows:
                skip = skips[-1]
                shape = (rows - n_deep, blk.resnets[0].conv1.weight.shape[1] - skip.shape[1], *skip.shape[2:])
                if cache is not None:  # int depth: all rows stopped here
                    fill = cache.load(l + 1)
                    if fill.shape != shape:
                        raise _err("exit_cache", f"a value of shape {shape} for depth {l + 1}", tuple(fill.shape))
                    fill = fill.to(skip.dtype)
                else:
                    fill = skip.new_zeros(shape)
                deep = fill if n_deep == 0 else torch.cat([deep, fill])
            h = deep
            for r, a in blk.layers():
                h = resnet(r, torch.cat([h, skips.pop()], dim=1))
                h = a(h) if a is not None else h
            if blk.upsample is not None:
                h = _conv(blk.upsample, F.interpolate(h, scale_factor=2.0, mode="nearest"))
                if cache is not None and max_depth == L and l in cache.depths:
                    cache.store(l, h)  # deep input of level l - 1: what depth l replaces
            deep = h

        # ---- out
        return _conv(self.conv_out, _gn_act(self.conv_norm_out, h))

    # ---------------------------------------------------------------------------------------------
    # Loading from diffusers
    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, module_or_state_dict, config: Mapping | None = None, *, null_class=None) -> "UNet":
        """Convert a diffusers ``UNet2DModel`` (or its ``state_dict()`` with its ``config`` dict).

        ``config``, when given with a module, replaces the module's config. Unsupported options raise
        ``ValueError``; so do missing, unexpected or mis-shaped weights. The result is in eval mode with the
        weights' dtype.
        """
        if isinstance(module_or_state_dict, nn.Module):
            state = module_or_state_dict.state_dict()
            config = dict(module_or_state_dict.config if config is None else config)
        elif isinstance(module_or_state_dict, Mapping):
            state = dict(module_or_state_dict)
            if config is None:
                raise _err("config", "the UNet2DModel config dict when converting a state dict", None)
            config = dict(config)
        else:
            raise _err("module_or_state_dict", "a diffusers UNet2DModel or its state dict",
                       type(module_or_state_dict).__name__)
        kwargs = convert.unet_config_kwargs(config)
        warn_nonfinite("UNet.from_diffusers", state)
        model = cls(**kwargs, null_class=null_class)
        state = convert.diffusers_unet_to_ours(model, state)
        first = next(iter(state.values()))
        model.to(dtype=first.dtype, device=first.device)
        copy_into("UNet.from_diffusers", model.state_dict(), state)  # named missing/unexpected/mis-shaped keys
        return model.eval()
