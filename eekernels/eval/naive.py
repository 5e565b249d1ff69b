"""The ASE reference code's way of training under an exit schedule, in plain torch, as a baseline.

Every sample runs through every block up to the deepest exit in the batch; after each block the hidden
state of the samples that exit there is picked (``torch.where``), and the final layer runs once on the
picked states. Same function as ``DiT.forward(..., depth=per_sample_tensor)``, without skipping any work:
the baseline for the gradient test and the training-speed benchmark.
"""
from __future__ import annotations

import torch

from eekernels.eval.baselines import dit_forward


def naive_exit_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, depth: torch.Tensor) -> torch.Tensor:
    """An eekernels ``DiT`` at per-sample ``depth`` (B,) the naive way: all blocks for all samples, then pick.

    x: (B, C, H, W); t: (B,) timesteps; y: (B,) labels or None (null class). Returns (B, out_channels, H, W).
    """
    if not isinstance(depth, torch.Tensor) or depth.shape != (x.shape[0],):
        got = tuple(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__
        raise ValueError(f"naive_exit_forward: `depth` expected shape ({x.shape[0]},), got {got}")
    return dit_forward(model, x, t, y, depth)


class NaiveExitModel(torch.nn.Module):
    """Wraps a DiT so that ``model(x, t, y, depth=tensor)`` runs :func:`naive_exit_forward` (same parameters)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.null_class, self.num_classes, self.num_blocks = model.null_class, model.num_classes, model.num_blocks

    def forward(self, x, t, y=None, depth=None):
        if depth is None or isinstance(depth, int):
            return self.model(x, t, y, depth=depth)
        return naive_exit_forward(self.model, x, t, y, depth)
