"""ExitCache: training-free early exit (``exit_policy="cache"``), in the spirit of DeepCache.

At a full-depth call the model records, for every exit depth in ``depths``, what the skipped part adds:
for DiT and U-ViT the hidden-state residual ``h_L - h_d``; for U-Net the deep branch's output at the
exit level. A truncated call at depth ``d`` adds the recorded value instead of computing it.

Contract used by every model's ``forward(x, t, y=None, depth=None, exit_cache=None)``:
- full depth (``depth`` None or the model's depth): compute normally, then ``cache.store(d, value)``
  for each ``d`` in ``cache.depths`` that is below full depth;
- truncated int depth ``d``: ``cache.load(d)`` gives the value to add (a clear error if never recorded);
- a per-sample depth tensor together with a cache raises ``ValueError`` (one trajectory, one depth).
Values are kept per depth; the batch shape must match the recording call.

:class:`ForecastCache` (``exit_policy="forecast"``) keeps the last few full calls' values per depth and
extrapolates them in t; its caller announces each call with ``begin_call(t, full)`` (a no-op here).
"""
from __future__ import annotations

from typing import Iterable

import torch


#: the exit policies one call of a mixed plan may take (``ForecastCache.begin_call``)
CALL_POLICIES = ("drop", "cache", "forecast")
#: what a forecast extrapolates: the skipped blocks' whole residual per exit depth, or each skipped block's branch
#: outputs (attention and MLP), the block's norms, modulations, gates and residual adds computed on the call itself
FORECAST_TARGETS = ("residual", "blocks")


class ExitCache:
    """Holds, per exit depth, what the skipped blocks added at the last full-depth call.

    Callers that replay CUDA graphs (the samplers, the in-place tier) announce each call on the host with
    ``begin_call(t, full)`` and start each trajectory with ``restart()``: the buffers stay (graphs captured on them
    stay valid) and the host knows, without reading the device, whether this trajectory has recorded anything yet.
    """

    def __init__(self, depths: Iterable[int]):
        self.depths = tuple(sorted({int(d) for d in depths}))
        if any(d < 0 for d in self.depths):  # depth 0: no block runs, the whole stack's part is re-added
            raise ValueError(f"ExitCache: `depths` expected integers >= 0, got {self.depths}")
        self._values: dict[int, torch.Tensor] = {}
        self._recorded: bool | None = None  # None: not tracked (store/load only); else a full call this trajectory

    def store(self, depth: int, value: torch.Tensor) -> None:
        if depth in self._values and self._values[depth].shape == value.shape:
            self._values[depth].copy_(value)  # in place: static buffers stay valid under CUDA graphs
        else:
            self._values[depth] = value.detach().clone()

    def load(self, depth: int) -> torch.Tensor:
        if not self.has(depth):
            raise ValueError(
                f"ExitCache: no value recorded for depth {depth} in this trajectory; recorded "
                f"{sorted(self._values) if self._recorded is not False else []}. Run a full-depth call first (a "
                "schedule that re-runs full depth, e.g. ExitSchedule.periodic).")
        return self._values[depth]

    def has(self, depth: int) -> bool:
        return depth in self._values and self._recorded is not False

    def begin_call(self, t: float, full: bool, policy: str | None = None) -> None:
        """A model call at host timestep ``t`` (eekernels' unit) starts; ``full``: at full depth. ``policy``: this
        call's own exit policy in a plan that mixes them (:class:`ForecastCache` only; None or "cache" here)."""
        if policy not in (None, "cache"):
            raise ValueError(f"ExitCache: `policy` expected None or 'cache' (a plan that mixes policies runs on a "
                             f"ForecastCache), got {policy!r}")
        if full:
            self._recorded = True

    def restart(self) -> None:
        """A new trajectory in the same buffers: nothing counts as recorded until its first full-depth call."""
        self._recorded = False

    def clear(self) -> None:
        self._values.clear()

    def buffers(self) -> list[torch.Tensor]:
        """The tensors a call writes (restored after a CUDA graph's warm-up runs)."""
        return list(self._values.values())

    def __repr__(self) -> str:
        return f"ExitCache(depths={self.depths}, recorded={sorted(self._values)})"


class ForecastCache(ExitCache):
    """``exit_policy="forecast"``: what the skipped blocks add, extrapolated in t from the last full-depth calls.

    At each full-depth call the model stores, per exit depth, what the skipped part added (as for
    :class:`ExitCache`); this cache keeps the last ``order + 1`` of them in one fixed buffer per depth,
    ``(order + 1, *shape)``, oldest first. A truncated call at host timestep t gets the polynomial through the kept
    values, evaluated at t: sum_k w_k(t) * value_k, with Lagrange weights w_k computed on the host from the kept
    calls' timesteps (order 1: the line through the last two full calls; order 2: the parabola through the last
    three, as TaylorSeer's first- and second-order expansions on a non-uniform grid). Fewer kept calls than
    ``order + 1`` lower the order (one kept call: reuse, as ``ExitCache``).

    The weights go to the device as one small copy into a fixed ``(order + 1,)`` buffer before the call, and every
    store shifts the fixed buffers in place, so a run is a fixed sequence of the same CUDA graphs with no host sync.
    The caller says when each call starts: ``begin_call(t, full)`` (the samplers and the in-place tier do).

    A plan may mix policies per call (``begin_call(t, full, policy)``, a joint calibrated plan): "forecast" gets the
    polynomial's weights, "cache" the weight 1 on the last full call (what :class:`ExitCache` replays) and "drop"
    all zeros (the skipped blocks add nothing). Only the weights differ: the same graphs serve every policy.

    ``target="blocks"`` (models with ``forecast_blocks``, the native DiT): the values kept are each block's branch
    outputs, keyed ``("attn", i)`` and ``("mlp", i)`` for the blocks from the lowest exit depth on, and a truncated
    call runs the skipped blocks' norms, modulations, gates and residual adds on its own input with those outputs
    extrapolated (diffusers' TaylorSeer's predictor); the default "residual" keeps the skipped part's whole residual
    per exit depth.
    """

    def __init__(self, depths: Iterable[int], order: int = 1, target: str = "residual"):
        super().__init__(depths)
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2):
            raise ValueError(f"ForecastCache: `order` expected 1 or 2, got {order!r}")
        if target not in FORECAST_TARGETS:
            raise ValueError(f"ForecastCache: `target` expected one of {FORECAST_TARGETS}, got {target!r}")
        self.order, self.target = order, target
        self.slots = order + 1
        self.times: list[float] = []  # host timesteps of the kept full calls, oldest first
        self._weights: torch.Tensor | None = None  # (slots,) on the values' device, written before each call

    def begin_call(self, t: float, full: bool, policy: str | None = None) -> None:
        if policy not in CALL_POLICIES + (None,):
            raise ValueError(f"ForecastCache: `policy` expected one of {CALL_POLICIES} or None (forecast), got "
                             f"{policy!r}")
        super().begin_call(t, full)
        t = float(t)
        if full:
            self.times = (self.times + [t])[-self.slots:]
        elif self.times and self._weights is not None:
            n = len(self.times)
            w = ([0.0] * n if policy == "drop" else [0.0] * (n - 1) + [1.0] if policy == "cache"
                 else lagrange_weights(self.times, t))
            # From a fresh pageable host tensor, non_blocking: the driver stages pageable memory before the call
            # returns (nothing can overwrite it in flight) and torch adds no stream sync (non_blocking=False would).
            host = torch.tensor([0.0] * (self.slots - len(w)) + w, dtype=self._weights.dtype)
            self._weights.copy_(host, non_blocking=True)

    def store(self, depth: int, value: torch.Tensor) -> None:
        buf = self._values.get(depth)
        if buf is None or buf.shape[1:] != value.shape or buf.dtype != value.dtype:
            buf = self._values[depth] = value.detach().new_zeros((self.slots, *value.shape))
        dtype = torch.promote_types(value.dtype, torch.float32)  # weights at least in float32 (bf16 values)
        if self._weights is None or self._weights.device != value.device or self._weights.dtype != dtype:
            self._weights = torch.zeros(self.slots, dtype=dtype, device=value.device)
        for k in range(self.slots - 1):  # oldest first: shift by one, in place (fixed buffers)
            buf[k].copy_(buf[k + 1])
        buf[-1].copy_(value)

    def load(self, depth: int) -> torch.Tensor:
        buf = self._values.get(depth)
        if buf is None or not self.times:
            raise ValueError(f"ForecastCache: no value recorded for depth {depth} in this trajectory. Run a full-depth "
                             "call first (a schedule that runs full depth before truncating)")
        w = self._weights.view(-1, *([1] * (buf.dim() - 1)))
        return (w * buf).sum(0).to(buf.dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [*self._values.values(), *([self._weights] if self._weights is not None else [])]

    def clear(self) -> None:
        super().clear()
        self.times = []
        self._recorded = None

    def restart(self) -> None:
        super().restart()
        self.times = []  # the kept values stay in their buffers with weight 0 until full calls replace them

    def __repr__(self) -> str:
        return f"ForecastCache(depths={self.depths}, order={self.order}, kept={len(self.times)})"


def lagrange_weights(times: list[float], t: float) -> list[float]:
    """Weights w_k with sum_k w_k f(times[k]) = the polynomial through the points evaluated at ``t``."""
    out = []
    for k, tk in enumerate(times):
        w = 1.0
        for j, tj in enumerate(times):
            if j != k:
                if tk == tj:
                    raise ValueError(f"ForecastCache: two kept full calls at the same timestep {tk}")
                w *= (t - tj) / (tk - tj)
        out.append(w)
    return out
