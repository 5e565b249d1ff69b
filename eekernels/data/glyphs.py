"""Procedural glyph data: the digits 0-9 drawn with Pillow, placed at random, in 32x32 RGB.

Nothing is downloaded. Each digit is a few strokes (lines and arcs) in a unit box, drawn once per stroke
width with Pillow at high resolution into a mask template. A sample then takes its class's template and
gets a random rotation, scale, position, stroke width and colours (a light glyph on a dark ground); the
placement is one batched ``affine_grid``/``grid_sample`` (rendered at 2x and box-filtered), so a batch
renders on whatever device training runs on.

Determinism: every random number comes from an explicit seed. ``glyph_batch(n, generator=g)`` draws its
parameters on the CPU from ``g`` (so a seed gives the same images on every device); ``GlyphDataset`` item
``i`` is a function of ``(seed, i)``; ``GlyphStream`` batch ``k`` is a function of ``(seed, k)``.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(i) for i in range(NUM_CLASSES))
IMAGE_SIZE = 32
CHANNELS = 3

# Stroke widths of the templates, as a fraction of the glyph height.
STROKE_WIDTHS = (0.10, 0.12, 0.14, 0.16)
_TEMPLATE = 64  # template resolution (drawn at 4x this, then box-filtered)

# Random placement ranges.
SCALE_RANGE = (0.65, 0.9)  # glyph height / image height
MAX_ROTATION_DEG = 15.0  # small enough that 6 and 9 stay apart
MAX_SHIFT = 0.5  # fraction of the free margin the glyph may move into, each way


# --------------------------------------------------------------------------------------------------
# The digits as strokes: polylines in a unit box (x right, y down), the glyph spanning y in [0.1, 0.9].
# --------------------------------------------------------------------------------------------------
def _arc(cx, cy, rx, ry, a0, a1, n=24):
    a = np.deg2rad(np.linspace(a0, a1, n))
    return list(zip(cx + rx * np.cos(a), cy + ry * np.sin(a)))  # y down: 270 deg is the top


def _digit_strokes(d: int) -> list[list[tuple[float, float]]]:
    if d == 0:
        return [_arc(0.5, 0.5, 0.26, 0.38, 0, 360, 48)]
    if d == 1:
        return [[(0.33, 0.26), (0.53, 0.1), (0.53, 0.9)], [(0.34, 0.9), (0.72, 0.9)]]
    if d == 2:
        return [_arc(0.5, 0.32, 0.25, 0.22, 190, 385) + [(0.22, 0.9), (0.8, 0.9)]]
    if d == 3:
        return [_arc(0.5, 0.3, 0.23, 0.2, 200, 450) + _arc(0.5, 0.69, 0.27, 0.21, 270, 520)]
    if d == 4:
        return [[(0.64, 0.9), (0.64, 0.1), (0.2, 0.66), (0.82, 0.66)]]
    if d == 5:
        return [[(0.77, 0.1), (0.32, 0.1), (0.29, 0.47)] + _arc(0.5, 0.66, 0.27, 0.24, 220, 510)]
    if d == 6:
        return [_arc(0.72, 0.66, 0.46, 0.54, 262, 180), _arc(0.5, 0.68, 0.25, 0.22, 0, 360, 40)]
    if d == 7:
        return [[(0.2, 0.1), (0.8, 0.1), (0.42, 0.9)]]
    if d == 8:
        return [_arc(0.5, 0.3, 0.2, 0.19, 0, 360, 40), _arc(0.5, 0.69, 0.25, 0.21, 0, 360, 40)]
    if d == 9:  # a 6 turned half a turn
        return [[(1 - x, 1 - y) for x, y in s] for s in _digit_strokes(6)]
    raise ValueError(f"digit: expected 0..9, got {d}")


def _draw(d: int, width: float, res: int) -> np.ndarray:
    img = Image.new("L", (res, res), 0)
    draw = ImageDraw.Draw(img)
    w = max(1, round(width * res))
    r = w / 2
    for stroke in _digit_strokes(d):
        pts = [(x * res, y * res) for x, y in stroke]
        draw.line(pts, fill=255, width=w, joint="curve")
        for x, y in (pts[0], pts[-1]):  # round caps
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return np.asarray(img, dtype=np.float32) / 255.0


@lru_cache(maxsize=1)
def _templates_cpu() -> torch.Tensor:
    """(NUM_CLASSES, len(STROKE_WIDTHS), T, T) float32 masks in [0, 1]."""
    masks = np.zeros((NUM_CLASSES, len(STROKE_WIDTHS), _TEMPLATE, _TEMPLATE), np.float32)
    for d in range(NUM_CLASSES):
        for k, w in enumerate(STROKE_WIDTHS):
            big = _draw(d, w, 4 * _TEMPLATE)
            masks[d, k] = big.reshape(_TEMPLATE, 4, _TEMPLATE, 4).mean(axis=(1, 3))  # 4x4 box filter
    return torch.from_numpy(masks)


_TEMPLATES_ON: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def templates(device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The digit masks per class and stroke width, ``(10, len(STROKE_WIDTHS), 64, 64)``, cached per device."""
    key = (str(torch.device(device)), dtype)
    if key not in _TEMPLATES_ON:
        _TEMPLATES_ON[key] = _templates_cpu().to(device=device, dtype=dtype)
    return _TEMPLATES_ON[key]


# --------------------------------------------------------------------------------------------------
# Random parameters (always drawn on the CPU, so that a seed means the same images on every device)
# --------------------------------------------------------------------------------------------------
def sample_params(n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> dict:
    """Draw ``n`` samples' labels and placement/colour parameters from ``generator`` (a CPU generator)."""
    g = generator
    u = torch.rand(n, 9, generator=g)
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if labels.shape[0] != n or labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"labels: expected {n} class indices in [0, {NUM_CLASSES}), got {labels.tolist()}")
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[:, 0]
    angle = math.radians(MAX_ROTATION_DEG) * (2 * u[:, 1] - 1)
    # Keep the glyph (height `scale`, width about 0.65 * scale) inside the frame.
    shift = torch.stack([(1 - 0.7 * scale) * (2 * u[:, 2] - 1), (1 - scale) * (2 * u[:, 3] - 1)], 1) * MAX_SHIFT
    stroke = (u[:, 4] * len(STROKE_WIDTHS)).long().clamp_max(len(STROKE_WIDTHS) - 1)
    # Colours: a light glyph (every channel > 0.55) on a dark ground (every channel < 0.35), each random.
    # One polarity and moderate placement ranges: with both polarities and wider ranges, the shipped DiT
    # trained on 2 CPU cores sampled scattered fragments; with these it samples legible digits (RESULTS.md §6).
    bg = 0.35 * torch.rand(n, 3, generator=g)
    fg = 0.55 + 0.45 * torch.rand(n, 3, generator=g)
    return {"labels": labels, "scale": scale, "angle": angle, "shift": shift, "stroke": stroke, "fg": fg, "bg": bg}


def render(params: dict, device="cpu", size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render drawn parameters: ``(n, 3, size, size)`` float32 in [-1, 1] on ``device``."""
    p = {k: v.to(device, non_blocking=True) for k, v in params.items()}
    n = p["labels"].shape[0]
    masks = templates(device)[p["labels"], p["stroke"]].unsqueeze(1)  # (n, 1, T, T)
    # Output point q (normalized coords) samples the template at R(-angle) (q - shift) / scale. The
    # template's glyph spans 0.8 of its height, so scale/0.8 maps glyph height to image fraction `scale`.
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    k = 0.8 / p["scale"]
    a = torch.stack([torch.stack([cos * k, sin * k], 1), torch.stack([-sin * k, cos * k], 1)], 1)  # (n, 2, 2)
    b = -(a @ p["shift"].unsqueeze(-1))
    theta = torch.cat([a, b], 2)
    grid = F.affine_grid(theta, (n, 1, 2 * size, 2 * size), align_corners=False)
    m = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = F.avg_pool2d(m, 2)  # render at 2x, box-filter down: anti-aliased edges
    img = p["bg"][:, :, None, None] * (1 - m) + p["fg"][:, :, None, None] * m
    return img.mul_(2).sub_(1)


def glyph_batch(
    n: int, generator: torch.Generator | None = None, device="cpu", labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``n`` glyphs: ``(images (n, 3, 32, 32) in [-1, 1], labels (n,) long)`` on ``device``.

    ``generator`` is a CPU ``torch.Generator`` (a fresh unseeded one if None); ``labels`` fixes the classes.
    """
    if n < 1:
        raise ValueError(f"glyph_batch: `n` expected >= 1, got {n}")
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    params = sample_params(n, generator, labels)
    return render(params, device), params["labels"].to(device)


def mix_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item/batch ``index`` of the stream ``seed`` (splitmix-style, deterministic)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    z ^= z >> 31
    z = (z * 0xD6E8FEB86659FD93) % (1 << 64)
    return (z ^ (z >> 29)) & ((1 << 63) - 1)


def generator_for(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(seed, index))


# --------------------------------------------------------------------------------------------------
# Dataset views
# --------------------------------------------------------------------------------------------------
class GlyphDataset(torch.utils.data.Dataset):
    """Indexable view: item ``i`` is ``(image (3, 32, 32) in [-1, 1], label)``, label ``i % 10``, fixed by (seed, i)."""

    def __init__(self, length: int = 60_000, seed: int = 0):
        if length < 1:
            raise ValueError(f"GlyphDataset: `length` expected >= 1, got {length}")
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not -self.length <= i < self.length:
            raise IndexError(f"GlyphDataset index {i} out of range for length {self.length}")
        i %= self.length
        x, y = glyph_batch(1, generator_for(self.seed, i), labels=torch.tensor([i % NUM_CLASSES]))
        return x[0], int(y[0])

    def batch(self, start: int, stop: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``start..stop-1`` rendered together (same values as indexing one by one)."""
        params = [sample_params(1, generator_for(self.seed, i), torch.tensor([i % NUM_CLASSES])) for i in range(start, stop)]
        cat = {k: torch.cat([p[k] for p in params]) for k in params[0]}
        return render(cat, device), cat["labels"].to(device)


class GlyphStream(torch.utils.data.IterableDataset):
    """Infinite stream of batches ``(images (B, 3, 32, 32), labels (B,))``; batch ``k`` is fixed by (seed, k).

    ``start`` skips to batch ``start`` (exact resume). Under a DataLoader with workers, worker ``w`` of
    ``W`` yields batches ``start + w, start + w + W, ...`` so the loader's order is the single-process order.
    """

    def __init__(self, batch_size: int, seed: int = 0, start: int = 0, device="cpu"):
        if batch_size < 1:
            raise ValueError(f"GlyphStream: `batch_size` expected >= 1, got {batch_size}")
        self.batch_size, self.seed, self.start, self.device = int(batch_size), int(seed), int(start), device

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return glyph_batch(self.batch_size, generator_for(self.seed, k), self.device)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, step = (self.start, 1) if info is None else (self.start + info.id, info.num_workers)
        while True:
            yield self.batch(k)
            k += step
