"""The model scaffold: what every score network with early exit shares.

A family is a :class:`ScoreModel` subclass that declares three things:
- its blocks, each a module with a real ``forward`` (transformer blocks take and return a :class:`Carry`);
- its early-exit rule: the generic by-depth loop below (a sample that stops after block ``i`` leaves through
  the head there, as DiT), or its own ``forward_sorted`` (U-ViT's skip path, U-Net's levels);
- its checkpoint converters: public functions in ``eekernels/models/convert/``.

The scaffold owns the rest: the input checks, the per-sample depth plan (the batch sorted by depth so that
block ``i`` runs on a contiguous prefix), the exit cache (record at full depth, replay when truncated) and
the by-depth forward loop. A family using the generic loop provides ``blocks`` and the hooks ``embed``,
``block_inputs``, ``entry_norm``, ``head_norm``, ``head`` and ``unembed`` (see ``ScoreModel.forward_sorted``).

Fusion: each transformer block ends with ``gated_residual_norm``, which adds its residual AND computes the
norm the next block (or the head) starts with. The next norm travels as a :class:`NextNorm`; its output
rides along in ``Carry.h``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from eekernels.models.condition import TextCondition, check_text_condition  # noqa: F401 (re-exported)
from eekernels.ops import gated_residual_norm


# --------------------------------------------------------------------------------------------------
# What passes from block to block
# --------------------------------------------------------------------------------------------------
@dataclass
class Carry:
    """The residual stream ``x`` (B, N, D) and ``h``: the next block's normed input, computed by the block
    before (None: not computed yet)."""

    x: torch.Tensor
    h: torch.Tensor | None = None

    def rows(self, n: int) -> "Carry":
        """The first ``n`` (deepest, once depth-sorted) samples."""
        if n == self.x.shape[0]:
            return self
        return Carry(self.x[:n], None if self.h is None else self.h[:n])


@dataclass
class NextNorm:
    """The norm the next block (or the head) starts with: ``norm(x) * (1 + scale) + shift`` with per-sample
    (B, D) ``shift``/``scale`` (adaLN), or the affine ``weight``/``bias`` of a LayerNorm."""

    eps: float
    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> "NextNorm":
        return cls(norm.eps, weight=norm.weight, bias=norm.bias)

    def rows(self, n: int) -> "NextNorm":
        """The first ``n`` samples' modulation."""
        return replace(self, shift=None if self.shift is None else self.shift[:n],
                       scale=None if self.scale is None else self.scale[:n])

    def mix(self, other: "NextNorm", n_next: int, n: int) -> "NextNorm":
        """This norm for samples ``[0, n_next)``, ``other`` for ``[n_next, n)`` (those that exit here)."""
        if self.weight is not other.weight or self.bias is not other.bias or self.eps != other.eps:
            raise ValueError("NextNorm.mix: `other` expected the same affine weight, bias and eps (only the "
                             "per-sample shift/scale can differ between samples)")
        def cat(a, b):
            return None if a is None else torch.cat([a[:n_next], b[n_next:n]])
        return replace(self, shift=cat(self.shift, other.shift), scale=cat(self.scale, other.scale))


def add_and_norm(x, delta, gate, norm: NextNorm | None):
    """``x + gate * delta`` and the next norm of it, in one ``gated_residual_norm``; ``(x + delta, None)`` when
    no norm follows (ungated only)."""
    if norm is None:
        if gate is not None:
            raise ValueError("add_and_norm: `gate` expected None when no norm follows, got a tensor")
        return x + delta, None
    return gated_residual_norm(x, delta, gate, norm.shift, norm.scale, norm.eps, weight=norm.weight, bias=norm.bias)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------
def check_finite_t(model: str, t: torch.Tensor) -> None:
    """ValueError for NaN/Inf timesteps, where that costs no host sync: a CPU ``t`` (also what a Python number
    becomes for CPU inputs). A CUDA ``t`` is not read: checking it would sync every forward (and break
    CUDA-graph capture)."""
    if t.device.type != "cpu" or not t.is_floating_point() or torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)]
        raise ValueError(f"{model}: `t` expected finite timesteps, got {bad.numel()} NaN/Inf value(s) "
                         f"(first: {bad[0].item()})")


def check_inputs(model: str, x, t, y, *, in_channels: int, input_size, num_classes, null_class, multiple=1):
    """Validate (x, t, y); return t as a (B,) tensor and y as a (B,) LongTensor or None (never host-syncs).

    ``input_size``: the side x must have (None: any side that is a multiple of ``multiple``).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{model}: `x` expected a (B, C, H, W) tensor, got {got}")
    B, C, H, W = x.shape
    if C != in_channels or (input_size is not None and (H != input_size or W != input_size)):
        side = "H, W" if input_size is None else f"{input_size}, {input_size}"
        raise ValueError(f"{model}: `x` expected shape (B, {in_channels}, {side}), got {tuple(x.shape)}")
    if H % multiple or W % multiple:
        raise ValueError(f"{model}: `x` expected H and W divisible by {multiple} (the model's total "
                         f"downsampling), got {tuple(x.shape)}")
    if not isinstance(t, torch.Tensor):
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise ValueError(f"{model}: `t` expected a number or a ({B},) tensor, got {type(t).__name__}")
        if not math.isfinite(t):  # checked on the host, whatever x's device
            raise ValueError(f"{model}: `t` expected a finite timestep, got {t}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,) or t.dtype == torch.bool:
        raise ValueError(f"{model}: `t` expected shape ({B},) or a scalar, got {tuple(t.shape)} {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{model}: `t` expected device {x.device} (as x), got {t.device}")
    check_finite_t(model, t)
    if num_classes is None:
        if y is not None:
            raise ValueError(f"{model}: `y` expected None for an unconditional model, got a {type(y).__name__}")
        return t, None
    if y is None:
        if null_class is None:
            raise ValueError(f"{model}: `y` expected (B,) class labels (this model has no null class), got None")
        return t, torch.full((B,), null_class, dtype=torch.long, device=x.device)
    if not isinstance(y, torch.Tensor) or y.shape != (B,) or y.dtype not in (torch.int64, torch.int32):
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{model}: `y` expected a ({B},) integer tensor of labels, got {got}")
    if y.device != x.device:
        raise ValueError(f"{model}: `y` expected device {x.device} (as x), got {y.device}")
    return t, y


# --------------------------------------------------------------------------------------------------
# Early-exit depth: None, an int, or a per-sample (B,) LongTensor sorted into contiguous prefixes
# --------------------------------------------------------------------------------------------------
@dataclass
class DepthPlan:
    """How a forward runs its blocks.

    ``depth``: the deepest exit in the batch. ``counts[i]``: how many leading (sorted) samples block i
    works on. ``order``: the permutation that sorted the batch by depth, descending (None: caller order).
    """

    depth: int
    counts: list
    order: torch.Tensor | None = None

    @property
    def per_sample(self) -> bool:
        return self.order is not None


def plan_depth(model: str, depth, batch: int, num_blocks: int, min_depth: int = 1) -> DepthPlan:
    """Validate ``depth`` and turn it into a :class:`DepthPlan`.

    An int (or None: full depth) needs no host work. A per-sample (B,) integer tensor is sorted on its
    device, then its sorted values are copied to the host ONCE (the one sync of a per-sample forward):
    the per-block prefix sizes decide the shapes of the GEMMs. A tensor whose values are all equal runs
    as that int, in caller order.
    """
    if depth is None:
        return DepthPlan(num_blocks, [batch] * num_blocks)
    if isinstance(depth, bool) or not isinstance(depth, (int, torch.Tensor)):
        raise ValueError(f"{model}: `depth` expected None, an int or a (B,) LongTensor, got {type(depth).__name__}")
    if isinstance(depth, int):
        check_depth_range(model, [depth], num_blocks, min_depth)
        return DepthPlan(depth, [batch] * depth)
    if depth.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{model}: `depth` expected an integer tensor (torch.long), got dtype {depth.dtype}")
    if depth.dim() == 0:
        raise ValueError(f"{model}: `depth` expected shape ({batch},); pass a Python int for one depth per batch")
    if depth.shape != (batch,):
        raise ValueError(f"{model}: `depth` expected shape ({batch},) (one per sample), got {tuple(depth.shape)}")
    order = torch.argsort(depth, descending=True, stable=True)
    sorted_depths = depth[order].tolist()  # the one host sync of a per-sample forward
    check_depth_range(model, sorted_depths, num_blocks, min_depth)
    if sorted_depths[0] == sorted_depths[-1]:
        return DepthPlan(sorted_depths[0], [batch] * sorted_depths[0])
    counts = [sum(1 for d in sorted_depths if d > i) for i in range(sorted_depths[0])]
    return DepthPlan(sorted_depths[0], counts, order)


def check_depth_range(model: str, depths, num_blocks: int, min_depth: int = 1) -> None:
    """ValueError unless every depth lies in [min_depth, num_blocks] (the one depth-range check)."""
    lo, hi = min(depths), max(depths)
    if lo < min_depth or hi > num_blocks:
        bad = lo if lo < min_depth else hi
        raise ValueError(f"{model}: `depth` expected values in [{min_depth}, {num_blocks}] "
                         f"(this model's depth range), got {bad}")


def min_depth_of(model, reuse: bool = False) -> int:
    """The fewest blocks one call of ``model`` may run: its ``min_depth`` (default 1; U-ViT's always-run blocks);
    with ``reuse`` (exit policy "cache" or "forecast") its ``min_reuse_depth`` where lower (0: no block, the whole
    stack's contribution re-added or extrapolated)."""
    lo = getattr(model, "min_depth", None)
    lo = 1 if lo is None else int(lo)
    r = getattr(model, "min_reuse_depth", None) if reuse else None
    return lo if r is None else min(lo, int(r))


def restore_order(out: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Undo the depth sort: row ``i`` of ``out`` belongs to caller sample ``order[i]``."""
    if order is None:
        return out
    result = torch.empty_like(out)
    result[order] = out
    return result


def per_sample_rows(tensors, order):
    """Gather (B, ...) tensors into depth-sorted order (None passes through)."""
    if order is None:
        return tensors
    return [None if t is None else t[order] for t in tensors]


def cache_mode(exit_cache, depth: int, num_blocks: int) -> tuple[bool, bool]:
    """``(record, replay)``: a full-depth call records into ``exit_cache``, a truncated one replays from it."""
    record = exit_cache is not None and depth == num_blocks
    return record, exit_cache is not None and not record


# --------------------------------------------------------------------------------------------------
# The scaffold
# --------------------------------------------------------------------------------------------------
class ScoreModel(nn.Module):
    """Base of every family: ``model(x, t, y=None, depth=None, exit_cache=None)``.

    ``y``: class labels, or a ``TextCondition`` for text-conditioned families (``condition = "text"``).

    Subclasses set ``family`` (named in errors), ``num_blocks``, ``min_depth``, ``in_channels``,
    ``input_size``, ``num_classes`` and ``null_class``. ``fixed_size = False``: x may have any H, W divisible
    by ``input_multiple`` (a U-Net), not only ``input_size``.
    """

    family = "ScoreModel"
    fixed_size = True
    input_multiple = 1
    #: "label": ``y`` is (B,) class labels (or None); "text": ``y`` is a :class:`~eekernels.models.condition.
    #: TextCondition` checked against ``token_dim``, ``pooled_dim`` and ``condition_extras`` ({name: shape}).
    condition = "label"
    token_dim: int | None = None
    pooled_dim: int | None = None
    condition_extras: dict = {}
    #: the fewest blocks a call with an exit cache may run (``min_depth_of``); None: min_depth.
    #: 0 on the prefix models (DiT, PixArt, SD3, FLUX): no block, the whole stack's part re-added or extrapolated
    min_reuse_depth: int | None = None
    #: True where the blocks forecast their branch outputs (``ForecastCache(target="blocks")``): ``block.forecast``
    #: and a ``keep`` list in ``block(...)`` (the native DiT)
    forecast_blocks: bool = False

    def forward(self, x, t, y=None, depth=None, exit_cache=None):
        """x: (B, C, H, W); t: (B,) float timesteps (or a scalar; fractional allowed, used as given); y: (B,)
        labels (None: the null class, where the model has one); depth: None (all blocks), an int in
        [min_depth, num_blocks] or a (B,) LongTensor (per sample). ``exit_cache``: an
        ``eekernels.models.cache.ExitCache`` (int depth only; with it the depth may go down to ``min_reuse_depth``,
        0 on the prefix models: no block runs). Returns (B, out_channels, H, W).
        """
        name = self.family
        size = self.input_size if self.fixed_size else None
        text = self.condition == "text"
        t, labels = check_inputs(name, x, t, None if text else y, in_channels=self.in_channels, input_size=size,
                                 num_classes=None if text else self.num_classes, null_class=self.null_class,
                                 multiple=self.input_multiple)
        if text:
            if y is None:
                raise ValueError(f"{name}: `y` expected a TextCondition (caption tokens and mask; "
                                 "model.null_condition(batch, length) for the unconditional one), got None")
            y = check_text_condition(name, y, batch=x.shape[0], token_dim=self.token_dim, device=x.device,
                                     pooled_dim=self.pooled_dim, extras=self.condition_extras)
        else:
            y = labels
        if isinstance(depth, torch.Tensor):
            depth = depth.to(x.device)
        # depth 0 (no block) only with an exit cache: the whole stack's part comes from it (``min_reuse_depth``)
        plan = plan_depth(name, depth, x.shape[0], self.num_blocks, min_depth_of(self, reuse=exit_cache is not None))
        if exit_cache is not None and plan.per_sample:
            raise ValueError(f"{name}: `exit_cache` expected an int depth (one trajectory, one depth), "
                             "got a per-sample depth tensor")
        if getattr(exit_cache, "target", "residual") == "blocks" and not self.forecast_blocks:
            raise ValueError(f"{name}: `exit_cache` with target 'blocks' (a per-block forecast) expected a model whose "
                             "blocks forecast their branch outputs (the native DiT), got this one; use target "
                             "'residual'")
        x, t = per_sample_rows((x, t), plan.order)
        if plan.order is not None and y is not None:
            y = y.index(plan.order) if text else y[plan.order]
        return restore_order(self.forward_sorted(x, t, y, plan, exit_cache), plan.order)

    def forward_sorted(self, x, t, y, plan: DepthPlan, exit_cache):
        """The by-depth loop on the depth-sorted batch: block i runs on the first ``plan.counts[i]`` samples;
        a sample whose depth is i + 1 leaves through the head right after block i.

        Hooks: ``embed(x, t, y, depth) -> (Carry, cond)`` (``Carry.h``: block 0's normed input);
        ``block_inputs(cond, i, n)``: block i's conditioning for n samples; ``entry_norm(cond, j)`` and
        ``head_norm(cond)``: the :class:`NextNorm` block j, and the head, start with; ``head(h, cond)``: the
        output projection of normed tokens; ``unembed(out, cond)``: tokens to the output image.
        Exit cache: the full-depth call stores ``x_L - x_k`` per exit depth k; a call at depth k adds it back.
        """
        d, counts = plan.depth, plan.counts
        if getattr(exit_cache, "target", "residual") == "blocks":
            return self._forecast_blocks(x, t, y, d, exit_cache)
        carry, cond = self.embed(x, t, y, d)
        record, replay = cache_mode(exit_cache, d, self.num_blocks)
        snapshots, outs = {}, []
        if record and 0 in exit_cache.depths:  # depth 0: the whole stack's part
            snapshots[0] = carry.x
        for i, block in zip(range(d), self.blocks):
            n, n_next = counts[i], (counts[i + 1] if i + 1 < d else 0)
            carry = block(carry.rows(n), self.block_inputs(cond, i, n), self._next_norm(cond, i + 1, n_next, n))
            if n_next < n and not replay:  # samples n_next..n exit here
                outs.append(self.head(carry.h[n_next:n], cond))
            if record and (i + 1) in exit_cache.depths:
                snapshots[i + 1] = carry.x
        return self.exit_outputs(carry, snapshots, outs, record, replay, d, cond, exit_cache)

    def _forecast_blocks(self, x, t, y, d: int, cache):
        """A per-block forecast (``ForecastCache(target="blocks")``, one depth for the batch): the blocks below
        ``d`` run; each block from ``d`` on runs its norms, modulations, gates and residual adds on this call's input
        with its attention and MLP outputs extrapolated from the last full calls (``block.forecast``), as diffusers'
        TaylorSeer does. A full call records every block's branch outputs from the lowest exit depth on."""
        L = self.num_blocks
        carry, cond = self.embed(x, t, y, L)  # every block's modulation: the skipped ones still use theirs
        n = carry.x.shape[0]
        record, lo = d == L, min(cache.depths)
        for i, block in enumerate(self.blocks):
            mod, nxt = self.block_inputs(cond, i, n), self._next_norm(cond, i + 1, n if i + 1 < L else 0, n)
            if i < d:
                keep = [] if record and i >= lo else None
                carry = block(carry, mod, nxt, keep)
                if keep:
                    cache.store(("attn", i), keep[0])
                    cache.store(("mlp", i), keep[1])
            else:
                dt = carry.x.dtype
                carry = block.forecast(carry, mod, nxt, cache.load(("attn", i)).to(dt), cache.load(("mlp", i)).to(dt))
        return self.unembed(self.head(carry.h, cond), cond)

    def exit_outputs(self, carry: Carry, snapshots: dict, outs: list, record: bool, replay: bool, d: int, cond,
                     exit_cache):
        """The end of a by-depth loop. Exit cache: the full-depth call (``record``) stores ``x_L - x_k`` for each
        exit depth k it snapshotted; a truncated call (``replay``) adds its depth's back and leaves through the
        head. Otherwise ``outs`` holds the head outputs of each exit group in loop order (the shallowest exit, the
        batch's last rows, first): stacked back in the depth-sorted batch order and unembedded."""
        if record:
            for k, x_k in snapshots.items():
                if k < self.num_blocks:
                    exit_cache.store(k, carry.x - x_k)
        if replay:  # truncated: add what the skipped blocks added at the last full call
            x = carry.x
            _, h = add_and_norm(x, exit_cache.load(d).to(x.dtype), None, self.head_norm(cond))
            outs = [self.head(h, cond)]
        return self.unembed(outs[0] if len(outs) == 1 else torch.cat(outs[::-1]), cond)

    def _next_norm(self, cond, j: int, n_next: int, n: int) -> NextNorm:
        """The norm after block j - 1 for n samples: block j's for the first n_next, the head's for the rest."""
        if n_next == 0:
            return self.head_norm(cond).rows(n)
        norm = self.entry_norm(cond, j)
        return norm.rows(n) if n_next == n else norm.mix(self.head_norm(cond), n_next, n)
