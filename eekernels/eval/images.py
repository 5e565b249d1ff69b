"""Seeded inputs and image grids, the one home of each.

Image ``i`` of a run starts from noise drawn on the CPU by a generator seeded ``seed + i`` and has label
``i % num_classes``: the same image on any device, world size and batch size. Grids are PNGs of uint8 tiles.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch


def image_labels(indices: Sequence[int], num_classes: int | None) -> torch.Tensor | None:
    """Label of image i: ``i % num_classes`` (LongTensor ``(n,)``); None for an unconditional model."""
    if not num_classes:
        return None
    return torch.as_tensor(list(indices), dtype=torch.long) % int(num_classes)


def seeded_noise(indices: Sequence[int], shape: Sequence[int], base_seed: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise ``(n, *shape)``; row k comes from a CPU generator seeded with ``base_seed + indices[k]``.

    Drawn on the CPU so that image i is the same on any device, world size and batch size.
    """
    g = torch.Generator()
    rows = []
    for i in indices:
        g.manual_seed(int(base_seed) + int(i))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.stack(rows).to(dtype)


def seeded_inputs(n: int, seed: int, num_classes: int | None, shape: Sequence[int]):
    """Images 0..n-1: (noise (n, *shape), labels (n,) or None), on the CPU."""
    return seeded_noise(range(n), shape, seed), image_labels(range(n), num_classes)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images ``(n, C, H, W)`` in [-1, 1] to uint8 ``(n, H, W, C)``; uint8 NHWC passes through."""
    if images.dtype == torch.uint8:
        if images.ndim != 4:
            raise ValueError(f"to_uint8: uint8 `images` expected (n, H, W, C), got shape {tuple(images.shape)}")
        return images.cpu().numpy()
    if images.ndim != 4:
        raise ValueError(f"to_uint8: `images` expected (n, C, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    # DiT's sample_ddp.py: clamp(127.5 * x + 128, 0, 255) then truncate to uint8 (i.e. round half up).
    x = (127.5 * images.detach().float() + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: str | os.PathLike, samples: np.ndarray, nrow: int | None = None, pad: int = 2,
              min_size: int = 0) -> None:
    """Tile uint8 ``(N, H, W, C)`` images into one PNG, ``nrow`` per row (default ~sqrt(N)); tiles smaller
    than ``min_size`` pixels are scaled up by an integer factor (nearest), so that 32-pixel glyphs are visible."""
    from PIL import Image

    n, h, w, c = samples.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = samples[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, min_size // max(h, w))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
