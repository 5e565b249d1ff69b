"""The plain-torch baseline of each model that every benchmark and test compares against.

``dit_forward`` runs an eekernels ``DiT``'s weights through facebookresearch/DiT's forward written in plain
torch (``F.*`` and SDPA, none of eekernels' ops), truncated the ASE reference code's way: ``blocks[:depth]``
then the final layer. A per-sample ``depth`` tensor runs every sample through the deepest depth and picks
each sample's hidden state after its own block (``torch.where``), doing all the work: the naive baseline.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction

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


def _linear_macs(module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_part_macs(block, tokens: int) -> tuple[int, int]:
    """(attention, MLP) multiply-adds of one diffusers DiT block on one sample of ``tokens`` tokens: the attention's
    q/k/v/out projections plus its two N x N products (2 N^2 D: ``torch.utils.flop_counter`` does not see SDPA's
    CPU kernel, so they are counted here by shape), and the MLP's linears. The per-sample adaLN modulation (one
    D x 6D linear per sample, about 1/(2N) of a block) is left out, as eekernels' own block count leaves it out."""
    attn = block.attn1
    return (tokens * _linear_macs(attn) + 2 * tokens * tokens * attn.inner_dim, tokens * _linear_macs(block.ff))


class DiffusersCacheDiT(nn.Module):
    """An eekernels ``DiT``'s weights in diffusers' ``DiTTransformer2DModel`` (``DiT.to_diffusers``) under one of
    diffusers' caches, callable as a ``sample()`` model (``model(x, t, y)``; eps and learned sigma as the DiT's):
    the training-free peers at counted compute.

    ``config``: a diffusers cache config applied with its own ``apply_*`` (``FirstBlockCacheConfig``,
    ``TaylorSeerCacheConfig``, ``MagCacheConfig``, ``FasterCacheConfig``), or None (plain diffusers, no hook). A
    trajectory starts when ``t`` does not decrease from the last call: the hooks' state is reset then, as a
    pipeline resets it per run; one cache context holds the whole batch (a CFG batch is one call).

    ``block_counts()`` gives (blocks run, blocks of full depth) since construction, in block FLOPs: each block
    call's attention (counted at its query projection: a skipped or predicted block, or a predicted attention,
    never calls it) and its MLP (at its output linear) are weighted by their share of the block's multiply-adds
    (:func:`block_part_macs`; on glyph-dit attention 0.4, MLP 0.6) and by the rows they ran on over the rows of
    the call (a CFG batch's 2B). So a block run whole on the whole batch counts 1, FasterCache's conditional
    half alone 1/2, and a block whose attention FasterCache reuses counts its MLP only. Work outside the blocks
    (embedding, final layer, FasterCache's FFTs of the output) is not counted, as for every other row.

    FasterCache (``FasterCacheConfig``; build one with :func:`fastercache_config`) is applied to a copy of the
    config on which the wrapper sets what is a fact of this model rather than a choice: the current timestep
    callback (this call's ``t``), ``tensor_format="BCHW"`` and the batched inputs' names (``hidden_states``,
    ``timestep``, ``class_labels``: the wrapper passes them as keywords). diffusers' FasterCache takes a CFG batch
    as [uncond; cond] and keeps the second half when it skips the unconditional branch; ``sample()`` calls the
    model with [cond; uncond]. A call is a CFG batch when its rows are even, both halves of ``x`` and ``t`` are
    equal and the second half of ``y`` is the null class (as ``sample()`` builds it); its halves are swapped on
    the way in and back on the way out. Any other call is refused (``ValueError`` naming ``y``), unless the
    config says ``is_guidance_distilled`` (no unconditional branch: nothing is split or swapped).

    TaylorSeer's default module patterns end in ``attn`` (FLUX's names) and match nothing in the DiT (``attn1``):
    :func:`taylorseer_config` names the DiT's attention and MLP modules, the outputs TaylorSeer forecasts.
    """

    def __init__(self, model, config=None):
        super().__init__()
        self.net = model.to_diffusers()
        self.config = config
        for a in ("num_classes", "null_class", "in_channels", "num_blocks", "learn_sigma", "input_size"):
            setattr(self, a, getattr(model, a))
        self._run, self._possible = Fraction(0), 0
        self._last_t = self._t = self._rows = None
        self._faster = False
        blk = self.net.transformer_blocks[0]
        attn, mlp = block_part_macs(blk, (model.input_size // model.patch_size) ** 2)
        self.part_shares = (Fraction(attn, attn + mlp), Fraction(mlp, attn + mlp))  # (attention, MLP) of a block
        for blk in self.net.transformer_blocks:
            blk.attn1.to_q.register_forward_hook(self._counter(self.part_shares[0]))
            last = [m for m in blk.ff.modules() if isinstance(m, nn.Linear)][-1]
            last.register_forward_hook(self._counter(self.part_shares[1]))
        if config is not None:
            from diffusers import hooks

            apply = {hooks.FirstBlockCacheConfig: hooks.apply_first_block_cache,
                     hooks.TaylorSeerCacheConfig: hooks.apply_taylorseer_cache,
                     hooks.MagCacheConfig: hooks.apply_mag_cache,
                     hooks.FasterCacheConfig: hooks.apply_faster_cache}.get(type(config))
            if apply is None:
                raise ValueError("DiffusersCacheDiT: `config` expected a FirstBlockCacheConfig, TaylorSeerCacheConfig, "
                                 f"MagCacheConfig or FasterCacheConfig, got {type(config).__name__}")
            if isinstance(config, hooks.FasterCacheConfig):  # its callbacks are set on a copy: the input is kept
                self._faster = True
                config = dataclasses.replace(
                    config, current_timestep_callback=lambda: self._t, tensor_format="BCHW",
                    _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"])
                self.applied_config = config
            apply(self.net, config)
            self._new_trajectory()

    def _counter(self, share):
        def count(module, args, output):
            self._run += share * Fraction(args[0].shape[0], self._rows)

        return count

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

    def block_counts(self) -> tuple[float, int]:
        return float(self._run), self._possible

    def _is_cfg_batch(self, x, t, y) -> bool:
        """[cond; uncond] as ``sample()`` builds it: even rows, equal halves of x and t, the null class after."""
        h = x.shape[0] // 2
        return (x.shape[0] % 2 == 0 and h > 0 and bool((y[h:] == self.null_class).all()) and torch.equal(x[:h], x[h:])
                and torch.equal(t[:h], t[h:]))

    def forward(self, x, t, y=None, depth=None):
        if depth is not None:
            raise ValueError(f"{type(self).__name__}: `depth` expected None (the cache decides what runs), got "
                             f"{depth!r}")
        if y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        swap = self._faster and not self.applied_config.is_guidance_distilled
        if swap and not self._is_cfg_batch(x, t, y):
            raise ValueError(f"{type(self).__name__}: FasterCache skips the unconditional half of a CFG batch: `y` "
                             f"expected [labels; null class {self.null_class}] with x's halves equal (sample() with "
                             f"cfg_scale != 1), got y={y.tolist()} for x of {x.shape[0]} rows")
        t0 = float(t.reshape(-1)[0])
        if self._last_t is not None and t0 >= self._last_t:
            self._new_trajectory()
        self._last_t = self._t = t0
        self._rows = x.shape[0]
        self._possible += self.num_blocks
        if not swap:
            return self.net(hidden_states=x, timestep=t, class_labels=y).sample
        h = x.shape[0] // 2
        x, t, y = (torch.cat([v[h:], v[:h]]) for v in (x, t, y))  # diffusers' order: [uncond; cond]
        out = self.net(hidden_states=x, timestep=t, class_labels=y).sample
        return torch.cat([out[h:], out[:h]])


def taylorseer_config(cache_interval: int, warmup: int, order: int = 1):
    """diffusers' ``TaylorSeerCacheConfig`` for the DiT in diffusers' layout: every block's attention and MLP
    output forecast (order ``order``, float32 factors) between full steps every ``cache_interval`` steps after
    ``warmup`` full steps."""
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=cache_interval, disable_cache_before_step=warmup, max_order=order,
                                 taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"])


def fastercache_config(uncond_every: int, uncond_below: float, attention_every: int | None = None,
                       attention_below: float = -1.0):
    """diffusers' ``FasterCacheConfig`` for the DiT in diffusers' layout: at calls with ``t < uncond_below`` the
    unconditional half of the CFG batch runs only every ``uncond_every``-th call (counted from the trajectory's
    first), the other calls forecast it from the conditional half (FasterCache's CFG-cache: the low- and
    high-frequency difference of the last full call); at calls where the unconditional half is skipped and
    ``t < attention_below``, each block's self-attention (``transformer_blocks.N.attn1``) runs only every
    ``attention_every``-th call and is extrapolated from its last two outputs otherwise (None: always runs).
    diffusers' other defaults are kept (0.5 attention weight, 1.1 frequency weights in its t ranges).
    :class:`DiffusersCacheDiT` sets the timestep callback, tensor format and batched input names."""
    from diffusers.hooks import FasterCacheConfig

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if not count(uncond_every):
        raise ValueError(f"fastercache_config: `uncond_every` expected an int >= 1, got {uncond_every!r}")
    if attention_every is not None and not count(attention_every):
        raise ValueError(f"fastercache_config: `attention_every` expected None or an int >= 1, got {attention_every!r}")
    return FasterCacheConfig(unconditional_batch_skip_range=uncond_every,
                             unconditional_batch_timestep_skip_range=(-1, float(uncond_below)),
                             spatial_attention_block_skip_range=attention_every,
                             spatial_attention_timestep_skip_range=(-1, float(attention_below)),
                             spatial_attention_block_identifiers=(r"^transformer_blocks\.\d+\.attn1$",))


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
