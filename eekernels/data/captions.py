"""Captioned procedural glyphs: text-to-image training data that needs no download and no text encoder.

A caption names a digit and, each with probability ``ATTRIBUTE_P``, its colour, size and position, e.g.
``"a small red seven on the left"`` or ``"a blue two"``; the glyph is rendered (by ``glyphs.render``) with
exactly those attributes, the unnamed ones drawn at random. Captions are encoded by a fixed token-embedding
table (no learned encoder): each word is one token, a caption is its words then ``</s>`` (as T5 ends every
caption), padded to ``length`` tokens; the mask marks the real ones (the empty caption is ``</s>`` alone, so
no mask is all False). The table is drawn from a fixed seed per ``token_dim``, so every run, machine and
device gets the same embeddings. An optional pooled embedding (SD3 / FLUX take one) is a fixed random
projection of the masked mean of the token embeddings.

Determinism: ``caption_batch(n, generator)`` draws every random number on the CPU from ``generator``;
``CaptionGlyphs.batch(k)`` is a function of ``(seed, k)`` alone (exact resume).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from eekernels.data.glyphs import IMAGE_SIZE, MAX_ROTATION_DEG, NUM_CLASSES, STROKE_WIDTHS, generator_for, render

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# colour name -> RGB in [0, 1] (light enough to stand out on the dark ground)
COLOURS = {"red": (0.95, 0.2, 0.2), "green": (0.25, 0.9, 0.3), "blue": (0.3, 0.45, 1.0), "yellow": (0.95, 0.9, 0.2),
           "cyan": (0.2, 0.9, 0.95), "magenta": (0.95, 0.3, 0.9), "white": (0.95, 0.95, 0.95),
           "orange": (1.0, 0.6, 0.15)}
SIZES = {"small": 0.5, "large": 0.72}  # glyph height / image height
# position name -> (x, y) direction (y down); the shift is that fraction of the free margin
POSITIONS = {"in the centre": (0.0, 0.0), "on the left": (-1.0, 0.0), "on the right": (1.0, 0.0),
             "at the top": (0.0, -1.0), "at the bottom": (0.0, 1.0)}
POSITION_REACH = 0.95  # fraction of the free margin a placed glyph moves into
ATTRIBUTE_P = 0.8  # each of colour, size and position is named with this probability
EOS = "</s>"
PAD = "<pad>"

VOCAB: tuple[str, ...] = (PAD, EOS, "a", *DIGIT_WORDS, *COLOURS, *SIZES,
                          *sorted({w for p in POSITIONS for w in p.split()}))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
DEFAULT_LENGTH = 10  # the longest caption, "a small red seven in the centre </s>", is 8 tokens
TABLE_SEED = 20241  # the fixed seed of the token-embedding table


def caption_text(digit: int, colour: str | None = None, size: str | None = None, position: str | None = None) -> str:
    """``"a [size] [colour] <digit> [position]"``: the caption of one glyph (None: that attribute unnamed)."""
    if not 0 <= int(digit) < NUM_CLASSES:
        raise ValueError(f"caption_text: `digit` expected 0..{NUM_CLASSES - 1}, got {digit}")
    for name, value, table in (("colour", colour, COLOURS), ("size", size, SIZES), ("position", position, POSITIONS)):
        if value is not None and value not in table:
            raise ValueError(f"caption_text: `{name}` expected None or one of {sorted(table)}, got {value!r}")
    words = ["a", size, colour, DIGIT_WORDS[int(digit)], position]
    return " ".join(w for w in words if w)


@lru_cache(maxsize=8)
def _table_cpu(token_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(TABLE_SEED * 1_000_003 + token_dim)
    return torch.randn(len(VOCAB), token_dim, generator=g, dtype=torch.float32)


def token_table(token_dim: int, device="cpu") -> torch.Tensor:
    """The fixed ``(len(VOCAB), token_dim)`` float32 embedding table (N(0, 1) entries, seeded by ``token_dim``)."""
    if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1:
        raise ValueError(f"token_table: `token_dim` expected an int >= 1, got {token_dim!r}")
    return _table_cpu(token_dim).to(device)


@lru_cache(maxsize=8)
def _pooled_projection(token_dim: int, pooled_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(TABLE_SEED * 7919 + token_dim * 131 + pooled_dim)
    return torch.randn(token_dim, pooled_dim, generator=g) / math.sqrt(token_dim)


def tokenize(captions, length: int = DEFAULT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(B, length)`` long (padded with ``<pad>``) and the mask ``(B, length)`` bool of the real tokens."""
    if isinstance(captions, str):
        raise ValueError("tokenize: `captions` expected a sequence of strings, got one string (wrap it in a list)")
    captions = list(captions)
    if not captions:
        raise ValueError("tokenize: `captions` expected at least one caption, got none")
    ids = torch.full((len(captions), length), WORD_ID[PAD], dtype=torch.long)
    for b, text in enumerate(captions):
        if not isinstance(text, str):
            raise ValueError(f"tokenize: `captions[{b}]` expected a string, got {type(text).__name__}")
        words = text.split() + [EOS]
        unknown = [w for w in words if w not in WORD_ID]
        if unknown:
            raise ValueError(f"tokenize: `captions[{b}]` has words outside the vocabulary {unknown} "
                             f"(vocabulary: {list(VOCAB[2:])})")
        if len(words) > length:
            raise ValueError(f"tokenize: `captions[{b}]` expected at most {length - 1} words (length {length} "
                             f"with {EOS}), got {len(words) - 1}: {text!r}")
        ids[b, : len(words)] = torch.tensor([WORD_ID[w] for w in words])
    return ids, ids != WORD_ID[PAD]


def encode_captions(captions, token_dim: int, length: int = DEFAULT_LENGTH, device="cpu",
                    pooled_dim: int | None = None) -> dict:
    """Embed captions with the fixed table: ``{"tokens": (B, length, token_dim) float32, "mask": (B, length)
    bool, "pooled": (B, pooled_dim) float32 or None}`` on ``device``. Padding rows are the ``<pad>`` embedding
    (masked out), as a real encoder's padding positions also hold values."""
    ids, mask = tokenize(captions, length)
    tokens = token_table(token_dim)[ids]
    pooled = None
    if pooled_dim is not None:
        mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        pooled = mean @ _pooled_projection(token_dim, int(pooled_dim))
    return {"tokens": tokens.to(device), "mask": mask.to(device), "pooled": None if pooled is None else pooled.to(device)}


def sample_caption_params(n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> dict:
    """Draw ``n`` glyphs' attributes from ``generator`` (CPU): the ``glyphs.render`` parameters plus
    ``"captions"`` (a list of strings) and the named attributes (None where a caption leaves one unnamed)."""
    if n < 1:
        raise ValueError(f"sample_caption_params: `n` expected >= 1, got {n}")
    g = generator
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if labels.shape[0] != n or labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"labels: expected {n} class indices in [0, {NUM_CLASSES}), got {labels.tolist()}")
    names = {"colour": list(COLOURS), "size": list(SIZES), "position": list(POSITIONS)}
    picks = {k: torch.randint(0, len(v), (n,), generator=g) for k, v in names.items()}
    named = torch.rand(n, 3, generator=g) < ATTRIBUTE_P
    u = torch.rand(n, 4, generator=g)
    bg = 0.3 * torch.rand(n, 3, generator=g)
    jitter = 0.08 * (torch.rand(n, 3, generator=g) - 0.5)  # a named colour still varies a little
    attrs = {k: [v[int(i)] for i in picks[k]] for k, v in names.items()}
    scale = torch.tensor([SIZES[s] for s in attrs["size"]])
    direction = torch.tensor([POSITIONS[p] for p in attrs["position"]])
    margin = torch.stack([1 - 0.7 * scale, 1 - scale], 1)
    shift = direction * margin * POSITION_REACH
    fg = (torch.tensor([COLOURS[c] for c in attrs["colour"]]) + jitter).clamp(0, 1)
    captions, shown = [], {k: [] for k in names}
    for i in range(n):
        vals = {k: (attrs[k][i] if named[i, j] else None) for j, k in enumerate(names)}
        for k in names:
            shown[k].append(vals[k])
        captions.append(caption_text(int(labels[i]), vals["colour"], vals["size"], vals["position"]))
    return {"labels": labels, "scale": scale, "angle": math.radians(MAX_ROTATION_DEG) * 0.7 * (2 * u[:, 0] - 1),
            "shift": shift, "stroke": (u[:, 1] * len(STROKE_WIDTHS)).long().clamp_max(len(STROKE_WIDTHS) - 1),
            "fg": fg, "bg": bg, "captions": captions, **shown}


def caption_batch(n: int, generator: torch.Generator | None = None, device="cpu", *, token_dim: int = 32,
                  length: int = DEFAULT_LENGTH, pooled_dim: int | None = None, labels=None) -> dict:
    """``n`` captioned glyphs: ``{"images": (n, 3, 32, 32) in [-1, 1], "tokens", "mask", "pooled"`` (see
    :func:`encode_captions`), ``"labels": (n,) long, "captions": [str]}`` on ``device``."""
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    p = sample_caption_params(n, generator, labels)
    images = render({k: p[k] for k in ("labels", "scale", "angle", "shift", "stroke", "fg", "bg")}, device)
    enc = encode_captions(p["captions"], token_dim, length, device, pooled_dim)
    return {"images": images, **enc, "labels": p["labels"].to(device), "captions": p["captions"]}


class CaptionGlyphs:
    """A caption-glyph source for ``BatchSource``: batch ``k`` of ``batch_size`` is fixed by ``(seed, k)``.

    ``token_dim`` / ``pooled_dim`` / ``length``: the text model's caption width, pooled width (None: no
    pooled text) and the padded caption length. ``null()``: the empty caption's encoding (``</s>`` alone),
    the unconditional condition for models without a learned one (SD3, FLUX).
    """

    def __init__(self, token_dim: int = 32, length: int = DEFAULT_LENGTH, pooled_dim: int | None = None):
        token_table(token_dim)  # validates token_dim
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"CaptionGlyphs: `length` expected an int >= 2 (a word and {EOS}), got {length!r}")
        if pooled_dim is not None and (isinstance(pooled_dim, bool) or not isinstance(pooled_dim, int) or pooled_dim < 1):
            raise ValueError(f"CaptionGlyphs: `pooled_dim` expected None or an int >= 1, got {pooled_dim!r}")
        self.token_dim, self.length, self.pooled_dim = int(token_dim), int(length), pooled_dim
        self.image_size, self.channels = IMAGE_SIZE, 3

    def __repr__(self) -> str:
        return f"CaptionGlyphs(token_dim={self.token_dim}, length={self.length}, pooled_dim={self.pooled_dim})"

    def batch(self, batch_size: int, generator: torch.Generator, device="cpu"):
        """``(images, (tokens, mask, pooled))`` for ``batch_size`` fresh glyphs drawn from ``generator``."""
        b = caption_batch(batch_size, generator, device, token_dim=self.token_dim, length=self.length,
                          pooled_dim=self.pooled_dim)
        return b["images"], (b["tokens"], b["mask"], b["pooled"])

    def batch_at(self, seed: int, k: int, batch_size: int, device="cpu"):
        return self.batch(batch_size, generator_for(seed, k), device)

    def null(self, batch: int, device="cpu"):
        """``(tokens, mask, pooled)`` of the empty caption, ``batch`` rows."""
        enc = encode_captions([""] * batch, self.token_dim, self.length, device, self.pooled_dim)
        return enc["tokens"], enc["mask"], enc["pooled"]
