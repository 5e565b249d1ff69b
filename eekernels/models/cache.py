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
"""
from __future__ import annotations

from typing import Iterable

import torch


class ExitCache:
    """Holds, per exit depth, what the skipped blocks added at the last full-depth call."""

    def __init__(self, depths: Iterable[int]):
        self.depths = tuple(sorted({int(d) for d in depths}))
        if any(d < 1 for d in self.depths):
            raise ValueError(f"ExitCache: `depths` expected integers >= 1, got {self.depths}")
        self._values: dict[int, torch.Tensor] = {}

    def store(self, depth: int, value: torch.Tensor) -> None:
        if depth in self._values and self._values[depth].shape == value.shape:
            self._values[depth].copy_(value)  # in place: static buffers stay valid under CUDA graphs
        else:
            self._values[depth] = value.detach().clone()

    def load(self, depth: int) -> torch.Tensor:
        try:
            return self._values[depth]
        except KeyError:
            raise ValueError(
                f"ExitCache: no value recorded for depth {depth}; recorded {sorted(self._values)}. "
                "Run a full-depth call first (a schedule that re-runs full depth, e.g. ExitSchedule.periodic)."
            ) from None

    def has(self, depth: int) -> bool:
        return depth in self._values

    def clear(self) -> None:
        self._values.clear()

    def __repr__(self) -> str:
        return f"ExitCache(depths={self.depths}, recorded={sorted(self._values)})"
