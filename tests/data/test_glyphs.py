"""Procedural glyph data: determinism, value range, label balance, resume, and any-Dataset batching."""
import pytest
import torch

from eekernels.data import BatchSource, GlyphDataset, GlyphStream, glyph_batch, templates
from eekernels.data.glyphs import generator_for


def test_templates_are_ten_distinct_digits():
    t = templates()
    assert t.shape[:2] == (10, 4) and 0 <= t.min() and t.max() <= 1
    flat = t[:, 1].flatten(1)
    # every pair of digit masks differs substantially (no two classes drawn alike)
    diff = torch.cdist(flat, flat)
    assert diff[~torch.eye(10, dtype=torch.bool)].min() > 3.0
    # thicker strokes cover more pixels
    area = t.sum((2, 3))
    assert (area[:, 1:] > area[:, :-1]).all()


def test_batch_is_deterministic_and_in_range():
    x1, y1 = glyph_batch(37, generator_for(5, 3))
    x2, y2 = glyph_batch(37, generator_for(5, 3))
    x3, _ = glyph_batch(37, generator_for(5, 4))
    assert x1.shape == (37, 3, 32, 32) and x1.dtype == torch.float32 and y1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.min() >= -1 and x1.max() <= 1
    # every image has both a glyph and a background: a wide range per image
    spread = x1.flatten(1).max(1).values - x1.flatten(1).min(1).values
    assert spread.min() > 0.3


def test_light_glyph_on_dark_ground():
    x, _ = glyph_batch(64, generator_for(2, 0))
    img = (x + 1) / 2  # back to [0, 1]
    # The ground fills the corners; every channel there is dark (< 0.35), and the brightest pixel of each
    # image is glyph (every channel of the glyph colour is > 0.55, so its channel sum is > 1.65).
    corners = torch.stack([img[:, :, 0, 0], img[:, :, 0, -1], img[:, :, -1, 0], img[:, :, -1, -1]], 1)
    assert corners.max() < 0.35 + 1e-6
    assert img.sum(1).flatten(1).max(1).values.min() > 1.65


def test_fixed_labels_and_bad_labels():
    x, y = glyph_batch(10, generator_for(0, 0), labels=torch.arange(10))
    assert torch.equal(y, torch.arange(10))
    with pytest.raises(ValueError, match="labels"):
        glyph_batch(3, generator_for(0, 0), labels=torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="`n`"):
        glyph_batch(0)


def test_indexable_view_matches_batched_rendering():
    ds = GlyphDataset(length=50, seed=3)
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and y == 7
    xb, yb = ds.batch(5, 9)
    assert torch.allclose(xb[2], x, atol=1e-6) and yb.tolist() == [5, 6, 7, 8]
    assert torch.equal(ds[7][0], x)
    assert torch.equal(ds[-43][0], x)
    with pytest.raises(IndexError):
        ds[50]


def test_stream_resume_and_workers_order():
    s = GlyphStream(8, seed=1)
    it = iter(s)
    first = [next(it) for _ in range(3)]
    resumed = next(iter(GlyphStream(8, seed=1, start=2)))
    assert torch.equal(first[2][0], resumed[0])
    loader = torch.utils.data.DataLoader(GlyphStream(8, seed=1), batch_size=None, num_workers=0)
    assert torch.equal(next(iter(loader))[0], first[0][0])


def test_batch_source_glyphs_and_any_dataset():
    src = BatchSource("glyphs", batch_size=6, seed=2)
    a = [b for _, b in zip(range(3), src.iterate())]
    b = next(src.iterate(start=2))
    assert torch.equal(a[2][0], b[0])

    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 4
    ds = torch.utils.data.TensorDataset(images, labels)
    src = BatchSource(ds, batch_size=6, seed=0)
    batches = [b for _, b in zip(range(5), src.iterate())]  # 3 per epoch: crosses an epoch boundary
    x, y = batches[0]
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    epoch0 = torch.cat([b[1] for b in batches[:3]])
    assert len(set(epoch0.tolist())) <= 4 and epoch0.shape == (18,)
    again = next(src.iterate(start=4))
    assert torch.equal(again[0], batches[4][0])


def test_batch_source_rejects_bad_data():
    with pytest.raises(ValueError, match="data"):
        BatchSource("cifar", batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSource(GlyphDataset(3), batch_size=4)


def test_batch_source_iterable_dataset_resumes_by_replay():
    class Items(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for i in range(10):
                yield torch.rand(3, 4, 4, generator=g) * 2 - 1, i % 3

    src = BatchSource(Items(), batch_size=4)
    batches = [b for _, b in zip(range(4), src.iterate())]  # 2 full batches per pass: wraps around
    assert torch.equal(batches[2][0], batches[0][0]) and batches[1][1].tolist() == [1, 2, 0, 1]
    assert torch.equal(next(src.iterate(start=1))[0], batches[1][0])
