"""Training data that needs no download (procedural glyphs, captioned glyphs), and batching for any Dataset."""
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
from eekernels.data.captions import VOCAB, CaptionGlyphs, caption_batch, caption_text, encode_captions, tokenize

__all__ = [
    "CHANNELS", "CLASS_NAMES", "IMAGE_SIZE", "NUM_CLASSES", "GlyphDataset", "GlyphStream", "glyph_batch",
    "render", "sample_params", "templates", "BatchSource", "batch_source",
    "VOCAB", "CaptionGlyphs", "caption_batch", "caption_text", "encode_captions", "tokenize",
]
