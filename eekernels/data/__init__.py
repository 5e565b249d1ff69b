"""Training data that needs no download (procedural glyphs), and batching for any ``(image, label)`` Dataset."""
from eekernels.data.glyphs import (
    CHANNELS,
    CLASS_NAMES,
    IMAGE_SIZE,
    NUM_CLASSES,
    GlyphDataset,
    GlyphStream,
    glyph_batch,
    render,
    sample_params,
    templates,
)
from eekernels.data.batches import BatchSource, batch_source

__all__ = [
    "CHANNELS", "CLASS_NAMES", "IMAGE_SIZE", "NUM_CLASSES", "GlyphDataset", "GlyphStream", "glyph_batch",
    "render", "sample_params", "templates", "BatchSource", "batch_source",
]
