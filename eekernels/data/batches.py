"""Resumable, infinite batches from the glyph generator, the caption-glyph generator, or any Dataset.

Batch ``k`` is a function of ``(seed, k)`` alone, so a trainer resumes exactly by asking for batches from
its step onwards. Images are ``(C, H, W)`` float tensors in [-1, 1] (uint8 tensors are rescaled); labels
are class indices. A text dataset's items are ``(image, tokens (L, D), mask (L,))`` or ``(image, tokens,
mask, pooled (P,))``; its batches are ``(x, (tokens, mask, pooled or None))``.
"""
from __future__ import annotations

from typing import Iterator

import torch

from eekernels.data.captions import CaptionGlyphs
from eekernels.data.glyphs import generator_for, glyph_batch


def _to_image(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"dataset item: expected a (C, H, W) image tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x.float().div(127.5).sub(1)
    return x.float()


def _collate(items):
    items = list(items)
    sizes = {len(it) if isinstance(it, (tuple, list)) else -1 for it in items}
    if sizes in ({3}, {4}):  # (image, tokens, mask[, pooled]): a captioned dataset
        cols = list(zip(*items))
        x = torch.stack([_to_image(v) for v in cols[0]])
        tokens = torch.stack([torch.as_tensor(v).float() for v in cols[1]])
        mask = torch.stack([torch.as_tensor(v).bool() for v in cols[2]])
        pooled = torch.stack([torch.as_tensor(v).float() for v in cols[3]]) if len(cols) == 4 else None
        return x, (tokens, mask, pooled)
    try:
        xs, ys = zip(*items)
    except (TypeError, ValueError):
        raise ValueError("dataset item: expected (image, label) pairs or (image, tokens, mask[, pooled]) "
                         "tuples") from None
    return torch.stack([_to_image(x) for x in xs]), torch.as_tensor([int(y) for y in ys], dtype=torch.long)


def _to_device(y, device):
    if isinstance(y, tuple):
        return tuple(None if v is None else v.to(device, non_blocking=True) for v in y)
    return y.to(device, non_blocking=True)


class _EpochBatches(torch.utils.data.Sampler):
    """Index batches of a map-style dataset: epoch e is a permutation seeded by (seed, e); starts at batch ``start``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = max(1, n // batch_size)  # drop the ragged tail: every batch has batch_size items

    def indices(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        perm = torch.randperm(self.n, generator=generator_for(self.seed, epoch))
        return perm[pos * self.batch_size : (pos + 1) * self.batch_size].tolist()

    def __iter__(self):
        k = self.start
        while True:
            epoch, pos = divmod(k, self.per_epoch)
            perm = torch.randperm(self.n, generator=generator_for(self.seed, epoch))
            for p in range(pos, self.per_epoch):
                yield perm[p * self.batch_size : (p + 1) * self.batch_size].tolist()
            k = (epoch + 1) * self.per_epoch


class BatchSource:
    """Infinite batches ``(x (B, C, H, W) float32 on device, y (B,) long on device)``; ``iterate(start)`` resumes."""

    def __init__(self, data="glyphs", batch_size: int = 64, seed: int = 0, device="cpu", num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"BatchSource: `batch_size` expected >= 1, got {batch_size}")
        if isinstance(data, str) and data == "caption-glyphs":
            data = CaptionGlyphs()
        is_glyphs = isinstance(data, str) and data == "glyphs"
        if not is_glyphs and not isinstance(data, (torch.utils.data.Dataset, CaptionGlyphs)):
            raise ValueError(f"BatchSource: `data` expected 'glyphs', 'caption-glyphs', a CaptionGlyphs or a torch "
                             f"Dataset of (image, label) or (image, tokens, mask[, pooled]), got {data!r}")
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
            if len(data) < batch_size:
                raise ValueError(f"BatchSource: dataset has {len(data)} items, fewer than batch_size={batch_size}")
        self.data, self.is_glyphs = data, is_glyphs
        self.batch_size, self.seed, self.device, self.num_workers = int(batch_size), int(seed), torch.device(device), num_workers

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start, start + 1, ...`` forever (batch k is the same in every run with this seed)."""
        if self.is_glyphs:
            return self._glyphs(start)
        if isinstance(self.data, CaptionGlyphs):
            return self._captions(start)
        if isinstance(self.data, torch.utils.data.IterableDataset):
            return self._stream(start)
        return self._indexed(start)

    def _glyphs(self, k: int):
        while True:  # rendered on the training device: no loader, no copies
            yield glyph_batch(self.batch_size, generator_for(self.seed, k), self.device)
            k += 1

    def _captions(self, k: int):
        while True:
            yield self.data.batch(self.batch_size, generator_for(self.seed, k), self.device)
            k += 1

    def _loader(self, **kwargs):
        return torch.utils.data.DataLoader(self.data, collate_fn=_collate, num_workers=self.num_workers,
                                           pin_memory=self.device.type == "cuda", **kwargs)

    def _indexed(self, start: int):
        sampler = _EpochBatches(len(self.data), self.batch_size, self.seed, start)
        for x, y in self._loader(batch_sampler=sampler):
            yield x.to(self.device, non_blocking=True), _to_device(y, self.device)

    def _stream(self, skip: int):
        # No random access: replay the stream from its beginning, skipping (exact for a deterministic stream).
        while True:
            seen = 0
            for x, y in self._loader(batch_size=self.batch_size, drop_last=True):
                seen += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield x.to(self.device, non_blocking=True), _to_device(y, self.device)
            if seen == 0:
                raise ValueError(f"BatchSource: the dataset yielded no full batch of {self.batch_size}")


def batch_source(data="glyphs", **kwargs) -> BatchSource:
    """``BatchSource(data, **kwargs)``; ``data`` is ``"glyphs"``, ``"caption-glyphs"`` (or a ``CaptionGlyphs``)
    or any ``torch.utils.data.Dataset`` of (image, label) or (image, tokens, mask[, pooled])."""
    return data if isinstance(data, BatchSource) else BatchSource(data, **kwargs)
