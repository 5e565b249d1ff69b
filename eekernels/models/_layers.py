"""Pieces shared by the score networks: embeddings, attention, patches, the transformer sub-modules,
autocast and checkpoint loading (the input checks, depth plan and forward loop are in ``scaffold.py``).

The model files (``dit.py``, ``uvit.py``, ``unet.py``) build on these. The modules here (``PatchEmbed``,
``Attention``, ``Mlp``) keep the parameter names of facebookresearch/DiT and baofff/U-ViT (both timm's), so
checkpoints map key for key.
"""
from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from eekernels.ops import linear_act


# --------------------------------------------------------------------------------------------------
# Timestep and position embeddings
# --------------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0,
                       flip_sin_to_cos: bool = True) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t * f), sin(t * f)]`` (``[sin, cos]`` with ``flip_sin_to_cos=False``), with
    ``f_i = exp(-log(max_period) * i / (dim/2 - freq_shift))``; a zero column is appended for odd ``dim``.

    t: (B,) float timesteps, fractional allowed, used as given. Returns (B, dim) float32. The operation order
    is that of facebookresearch/DiT and diffusers' ``get_timestep_embedding``, so float32 results agree bit for
    bit. ``freq_shift=0``: facebookresearch/DiT and U-ViT (GLIDE); diffusers' DiT and UNet2DModel use
    ``Timesteps(flip_sin_to_cos, downscale_freq_shift)``: ``freq_shift=1`` for DiT.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT fixed 2-D sin-cos position embedding, (grid*grid, dim) float32 (computed in float64)."""
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: `dim` expected a multiple of 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos):  # (M,) -> (M, dim/2): [sin, cos]
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gh, gw = torch.meshgrid(coords, coords, indexing="ij")  # row index h, column index w
    # DiT's grid is meshgrid(w, h) stacked, and its first half embeds grid[0] = the column coordinate.
    emb = torch.cat([one_axis(gw.reshape(-1)), one_axis(gh.reshape(-1))], dim=1)
    return emb.float()


# --------------------------------------------------------------------------------------------------
# Autocast: GEMMs in the autocast dtype, the residual stream and the fused norms in the stream's dtype
# --------------------------------------------------------------------------------------------------
def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs GEMMs in on x's device, or None outside autocast.

    The fused ops do not autocast (they reject a bfloat16 shift with a float32 x on purpose), so the models
    cast at their boundaries: GEMM outputs go back to the residual stream's dtype, as with plain torch
    under autocast, where ``x + gate * attn(...)`` promotes to float32.
    """
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


# --------------------------------------------------------------------------------------------------
# Attention, MLP and patches
# --------------------------------------------------------------------------------------------------
def attention(h: torch.Tensor, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads: int) -> torch.Tensor:
    """timm-layout self-attention: qkv features ordered (3, heads, head_dim). h: (B, N, D) -> (B, N, D) in h's
    dtype (under autocast the GEMMs run in the autocast dtype and the result is cast back)."""
    B, N, D = h.shape
    qkv = F.linear(h, qkv_weight, qkv_bias).view(B, N, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, hd)
    return F.linear(o.transpose(1, 2).reshape(B, N, D), proj_weight, proj_bias).to(h.dtype)


def mlp(h: torch.Tensor, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation: str) -> torch.Tensor:
    """fc1 with its activation fused into the GEMM (``linear_act``), then fc2. h: (B, N, D) -> (B, N, D) in h's
    dtype; under autocast both GEMMs run in the autocast dtype (``linear_act`` takes one dtype, so cast here)."""
    dt = autocast_dtype(h)
    if dt is None:
        return F.linear(linear_act(h, fc1_weight, fc1_bias, activation), fc2_weight, fc2_bias)
    fc1_bias = None if fc1_bias is None else fc1_bias.to(dt)  # as autocast's F.linear casts its bias
    a = linear_act(h.to(dt), fc1_weight.to(dt), fc1_bias, activation)
    return F.linear(a, fc2_weight, fc2_bias).to(h.dtype)


def patchify(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Conv patch embedding (kernel = stride = patch). x: (B, C, H, W) -> (B, H/p * W/p, D)."""
    p = weight.shape[-1]
    return F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) with features ordered (p, q, C) -> (B, C, h*p, w*p); square grids."""
    B, N, _ = x.shape
    g = math.isqrt(N)
    x = x.reshape(B, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, g * patch, g * patch)


# --------------------------------------------------------------------------------------------------
# Modules shared by DiT and U-ViT (timm names: proj, qkv, fc1, fc2)
# --------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv patch embedding (kernel = stride = patch): (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return patchify(x, self.proj.weight, self.proj.bias)


class Attention(nn.Module):
    """timm-layout multi-head self-attention (fused qkv, optional qkv bias)."""

    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):
        return attention(h, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.num_heads)


class Mlp(nn.Module):
    """fc1 with its activation fused into the GEMM (``linear_act``), then fc2."""

    def __init__(self, dim, hidden, activation):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation = activation

    def forward(self, h):
        return mlp(h, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation)


# --------------------------------------------------------------------------------------------------
# Checkpoint loading: clear errors for a non-checkpoint, a missing key, an unexpected key, a bad shape
# --------------------------------------------------------------------------------------------------
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def read_checkpoint(model: str, obj):
    """``obj`` itself, or the object saved in the file at path ``obj`` (read with ``serialization.safe_load``:
    ``weights_only=True`` plus a small allowlist; a file needing any other global is refused, unexecuted)."""
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        from eekernels.serialization import load_any  # .safetensors: the safetensors package, no pickle

        return load_any(obj, where=model)
    return obj


def checkpoint_args(obj) -> dict:
    """The ``args`` a facebookresearch/DiT ``train.py`` checkpoint holds (an argparse Namespace), as a dict."""
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def load_state(model: str, obj, which: str | None = None) -> dict:
    """A flat ``{name: tensor}`` state dict from a path or a dict.

    Paths are read with ``serialization.safe_load`` (``torch.load(weights_only=True)`` with an allowlist).
    Training checkpoints holding several state dicts (DiT's ``{"model", "ema", "opt", "args"}``) give
    ``which`` (default: "ema" if present, else "model"). Tensors holding NaN/Inf are named in a warning.
    """
    obj = read_checkpoint(model, obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{model}: expected a state dict (dict of tensors) or a checkpoint path, "
                         f"got {type(obj).__name__}")
    nested = [k for k in ("ema", "model", "state_dict") if isinstance(obj.get(k), dict)]
    if which is not None:
        if not isinstance(obj.get(which), dict):
            raise ValueError(f"{model}: `which` expected one of the checkpoint's state dicts {nested}, got {which!r}")
        obj = obj[which]
    elif nested:
        obj = obj[nested[0]]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{model}: expected a state dict of tensors; entries {bad[:5]} are not tensors "
                         f"(keys: {list(obj)[:8]}...)")
    state = {}
    for k, v in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        state[k] = v
    warn_nonfinite(model, state)
    return state


def warn_nonfinite(model: str, state: dict) -> None:
    """``warnings.warn`` naming every floating tensor of ``state`` that holds NaN or Inf (a broken checkpoint)."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"{model}: checkpoint tensor(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} hold NaN/Inf "
                      f"values ({len(bad)} tensor(s)); the model's outputs will not be finite", stacklevel=3)


def require(model: str, state: dict, key: str) -> torch.Tensor:
    """``state[key]``, or a ValueError naming the missing key and what the checkpoint holds instead."""
    if key not in state:
        near = [k for k in state if k.split(".")[0] == key.split(".")[0]][:5]
        raise ValueError(f"{model}: checkpoint is missing key {key!r} "
                         f"({'similar keys: ' + str(near) if near else 'first keys: ' + str(list(state)[:5])})")
    return state[key]


def count_blocks(model: str, state: dict, key: str) -> int:
    """How many blocks ``state`` holds: ``key.format(i)`` present for i = 0, 1, ... (at least one, else ValueError)."""
    n = 0
    while key.format(n) in state:
        n += 1
    if n == 0:
        require(model, state, key.format(0))
    return n


def square_grid(model: str, positions: int, extras: int = 0) -> int:
    """The side of the square patch grid of ``pos_embed``'s ``positions`` (``extras`` non-patch tokens first)."""
    grid = math.isqrt(max(positions, 0))
    if positions < 1 or grid * grid != positions:
        after = f" (after {extras} extra tokens)" if extras else ""
        raise ValueError(f"{model}: pos_embed has {positions} patch positions{after}; expected a square grid")
    return grid


def known_heads(model: str, configs: dict, depth: int, width: int, width_key: str, num_heads) -> int:
    """``num_heads`` if given, else the heads of the named config with this depth and width (else ValueError)."""
    if num_heads:
        return num_heads
    for cfg in configs.values():
        if cfg["depth"] == depth and cfg[width_key] == width:
            return cfg["num_heads"]
    raise ValueError(f"{model}: cannot infer num_heads for depth={depth}, {width_key}={width} "
                     f"(not a known config: {sorted(configs)}); pass num_heads=")


def copy_into(model: str, targets: dict, state: dict, *, ignore=()) -> None:
    """Copy ``state[k]`` into ``targets[k]`` (parameters or views of them) for every key; strict.

    Raises ValueError for missing keys, unexpected keys (except those starting with ``ignore`` entries)
    and shape mismatches, before writing anything.
    """
    missing = [k for k in targets if k not in state]
    if missing:
        raise ValueError(f"{model}: checkpoint is missing {len(missing)} key(s): {missing[:6]}")
    extra = [k for k in state if k not in targets and not any(k.startswith(p) for p in ignore)]
    if extra:
        raise ValueError(f"{model}: checkpoint has {len(extra)} unexpected key(s) for this architecture: {extra[:6]}")
    for k, dst in targets.items():
        if tuple(state[k].shape) != tuple(dst.shape):
            raise ValueError(f"{model}: checkpoint key {k!r} has shape {tuple(state[k].shape)}, "
                             f"expected {tuple(dst.shape)} for this configuration")
    with torch.no_grad():
        for k, dst in targets.items():
            dst.copy_(state[k])
