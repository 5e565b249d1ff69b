"""The plain-torch baseline of each model that every benchmark and test compares against.

``dit_forward`` runs an eekernels ``DiT``'s weights through facebookresearch/DiT's forward written in plain
torch (``F.*`` and SDPA, none of eekernels' ops), truncated the ASE reference code's way: ``blocks[:depth]``
then the final layer. A per-sample ``depth`` tensor runs every sample through the deepest depth and picks
each sample's hidden state after its own block (``torch.where``), doing all the work: the naive baseline.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _modulate(h, shift, scale, eps):
    return F.layer_norm(h, h.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def _block(m, i, h, c):
    """DiT block ``i`` of model ``m`` on tokens ``h`` (B, N, D) under conditioning ``c`` (B, D), plain torch."""
    B, N, D = h.shape
    H, blk = m.num_heads, m.blocks[i]
    w, b = m.block_adaLN(i)
    s1, c1, g1, s2, c2, g2 = F.linear(c, w, b).chunk(6, dim=1)
    a = _modulate(h, s1, c1, m.eps)
    qkv = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(B, N, D)
    h = h + g1[:, None] * F.linear(a, blk.attn.proj.weight, blk.attn.proj.bias)
    mlp = blk.mlp
    a = F.linear(_modulate(h, s2, c2, m.mlp_norm_eps), mlp.fc1.weight, mlp.fc1.bias)
    a = F.gelu(a, approximate="tanh") if mlp.activation == "gelu_tanh" else getattr(F, mlp.activation)(a)
    return h + g2[:, None] * F.linear(a, mlp.fc2.weight, mlp.fc2.bias)


def dit_forward(m, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, depth=None) -> torch.Tensor:
    """An eekernels ``DiT`` ``m`` in plain torch: x (B, C, H, W), t (B,), y (B,) labels or None (the null class).

    ``depth``: None (all blocks), an int (``blocks[:depth]``), or a LongTensor (B,) of per-sample depths (all
    samples run to the deepest, each keeps its state after its own block). Returns (B, out_channels, H, W).
    """
    per_sample = isinstance(depth, torch.Tensor)
    if per_sample and depth.shape != (x.shape[0],):
        raise ValueError(f"dit_forward: `depth` expected shape ({x.shape[0]},), got {tuple(depth.shape)}")
    from eekernels.models._layers import timestep_embedding

    p, te = m.patch_size, m.t_embedder
    h = F.conv2d(x, m.x_embedder.proj.weight, m.x_embedder.proj.bias, stride=p)
    h = h.flatten(2).transpose(1, 2) + m.pos_embed.to(x.dtype)
    freq = timestep_embedding(t, te.frequency_embedding_size, freq_shift=te.freq_shift)
    c = te.mlp(freq.to(x.dtype))
    if m.y_embedder is not None:
        if y is None:
            y = torch.full((x.shape[0],), m.null_class, dtype=torch.long, device=x.device)
        c = c + m.y_embedder.embedding_table(y)
    c = F.silu(c)
    if per_sample:
        picked = torch.zeros_like(h)
        for i in range(int(depth.max())):  # the reference picks the depth on the host too
            h = _block(m, i, h, c)
            picked = torch.where((depth == i + 1)[:, None, None], h, picked)
        h = picked
    else:
        for i in range(m.num_blocks if depth is None else int(depth)):
            h = _block(m, i, h, c)
    w, b = m.final_adaLN()
    shift, scale = F.linear(c, w, b).chunk(2, dim=1)
    out = m.final_layer.linear(_modulate(h, shift, scale, m.eps))
    B, N, _ = out.shape
    g, C = int(N**0.5), m.out_channels
    return out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)


class TorchDiT(nn.Module):
    """An eekernels DiT's weights behind :func:`dit_forward`, callable as a score network (same parameters).

    ``depth`` per call as in :func:`dit_forward`. With ``schedule``, the model picks its own depth from
    ``t.item()`` at every call, as the ASE reference code does (one host sync per step).
    """

    def __init__(self, model, schedule=None):
        super().__init__()
        self.m, self.schedule = model, schedule
        for a in ("num_classes", "null_class", "in_channels", "num_blocks", "learn_sigma", "input_size"):
            setattr(self, a, getattr(model, a))

    def forward(self, x, t, y=None, depth=None):
        if self.schedule is not None:
            depth = int(self.schedule.depth(t[:1].float()).item())  # the ASE reference code's per-step sync
        return dit_forward(self.m, x, t, y, depth)


def randomized(model):
    """Random weights everywhere, in eval mode (DiT zero-initializes adaLN and the output layer: gates would be 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


class DiffusersCacheDiT(nn.Module):
    """An eekernels ``DiT``'s weights in diffusers' ``DiTTransformer2DModel`` (``DiT.to_diffusers``) under one of
    diffusers' caches, callable as a ``sample()`` model (``model(x, t, y)``; eps and learned sigma as the DiT's):
    the training-free peers at counted compute.

    ``config``: a diffusers cache config applied with its own ``apply_*`` (``FirstBlockCacheConfig``,
    ``TaylorSeerCacheConfig``, ``MagCacheConfig``), or None (plain diffusers, no hook). A trajectory starts when
    ``t`` does not decrease from the last call: the hooks' state is reset then, as a pipeline resets it per run;
    one cache context holds the whole batch (a CFG batch is one call). ``block_counts()`` gives (blocks run,
    blocks of full depth) since construction, counted at each block's attention query projection (a skipped or
    predicted block, or a predicted attention, never calls it).

    TaylorSeer's default module patterns end in ``attn`` (FLUX's names) and match nothing in the DiT (``attn1``):
    :func:`taylorseer_config` names the DiT's attention and MLP modules, the outputs TaylorSeer forecasts.
    """

    def __init__(self, model, config=None):
        super().__init__()
        self.net = model.to_diffusers()
        self.config = config
        for a in ("num_classes", "null_class", "in_channels", "num_blocks", "learn_sigma", "input_size"):
            setattr(self, a, getattr(model, a))
        self._run = self._possible = 0
        self._last_t = None
        for blk in self.net.transformer_blocks:
            blk.attn1.to_q.register_forward_hook(self._count)
        if config is not None:
            from diffusers import hooks

            apply = {hooks.FirstBlockCacheConfig: hooks.apply_first_block_cache,
                     hooks.TaylorSeerCacheConfig: hooks.apply_taylorseer_cache,
                     hooks.MagCacheConfig: hooks.apply_mag_cache}.get(type(config))
            if apply is None:
                raise ValueError("DiffusersCacheDiT: `config` expected a FirstBlockCacheConfig, TaylorSeerCacheConfig "
                                 f"or MagCacheConfig, got {type(config).__name__}")
            apply(self.net, config)
            self._new_trajectory()

    def _count(self, *_):
        self._run += 1

    def _new_trajectory(self):
        if self.config is None:
            return
        from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

        HookRegistry.check_if_exists_or_initialize(self.net).reset_stateful_hooks(recurse=True)
        _set_cache_context(self.net, CacheContext("cond"))  # one context: the CFG halves are one batch

    def states(self, hook_type) -> list:
        """The current states of the hooks of ``hook_type`` under the model (e.g. MagCache's, for its ratios)."""
        from diffusers.hooks.hooks import HookRegistry, StateManager

        out, registry = [], HookRegistry.check_if_exists_or_initialize(self.net)
        for child in (registry, *registry._get_child_registries()):
            for hook in child.hooks.values():
                if isinstance(hook, hook_type):
                    out += [a.get_state() for a in vars(hook).values() if isinstance(a, StateManager)]
        return out

    def block_counts(self) -> tuple[int, int]:
        return self._run, self._possible

    def forward(self, x, t, y=None, depth=None):
        if depth is not None:
            raise ValueError(f"{type(self).__name__}: `depth` expected None (the cache decides what runs), got "
                             f"{depth!r}")
        t0 = float(t.reshape(-1)[0])
        if self._last_t is not None and t0 >= self._last_t:
            self._new_trajectory()
        self._last_t = t0
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        self._possible += self.num_blocks
        return self.net(x, t, class_labels=y).sample


def taylorseer_config(cache_interval: int, warmup: int, order: int = 1):
    """diffusers' ``TaylorSeerCacheConfig`` for the DiT in diffusers' layout: every block's attention and MLP
    output forecast (order ``order``, float32 factors) between full steps every ``cache_interval`` steps after
    ``warmup`` full steps."""
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=cache_interval, disable_cache_before_step=warmup, max_order=order,
                                 taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])


class FirstBlockCacheDiT(DiffusersCacheDiT):
    """The training-free adaptive peer: :class:`DiffusersCacheDiT` under diffusers' First Block Cache
    (``FirstBlockCacheConfig(threshold)``).

    FirstBlockCache runs the first block at every call and the rest only when the first block's residual moved
    by more than ``threshold`` (relative mean absolute change) since the last full call; otherwise it adds the
    cached residual of the other blocks. The decision is one per call for the whole batch (a CFG batch
    included), taken on the host. ``threshold=None`` runs plain diffusers (no hook).
    """

    def __init__(self, model, threshold: float | None):
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise ValueError(f"FirstBlockCacheDiT: `threshold` expected a float >= 0 or None, got {threshold!r}")
        config = None
        if threshold is not None:
            from diffusers.hooks import FirstBlockCacheConfig

            config = FirstBlockCacheConfig(threshold=float(threshold))
        super().__init__(model, config)
        self.threshold = threshold
