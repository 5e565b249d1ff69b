"""Caption glyphs: captions say what is drawn (digit, colour, size, position), the fixed encoding (tokens, mask,
padding, pooled), determinism, exact resume through BatchSource, captioned Datasets, bad inputs."""
import pytest
import torch

from eekernels.data import BatchSource, CaptionGlyphs, caption_batch, caption_text, encode_captions, tokenize
from eekernels.data.captions import COLOURS, EOS, PAD, POSITIONS, SIZES, VOCAB, WORD_ID, sample_caption_params, token_table
from eekernels.data.glyphs import generator_for, render


def _glyph_mask(params, i, centred=False):
    """The rendered glyph's coverage for sample i (the image with fg = 1, bg = 0); ``centred``: unshifted."""
    one = {k: params[k][i : i + 1] for k in ("labels", "scale", "angle", "shift", "stroke")}
    if centred:
        one["shift"] = torch.zeros_like(one["shift"])
    one["fg"], one["bg"] = torch.ones(1, 3), torch.zeros(1, 3)
    return (render(one)[0, 0] + 1) / 2


def test_captions_describe_the_rendered_glyphs():
    p = sample_caption_params(400, torch.Generator().manual_seed(7))
    checked = {"colour": 0, "size": 0, "position": 0}
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(400):
        cap = p["captions"][i]
        digit = ("zero one two three four five six seven eight nine").split()[int(p["labels"][i])]
        assert f" {digit}" in cap and cap.startswith("a ")
        m = _glyph_mask(p, i)
        if p["colour"][i] is not None:
            assert p["colour"][i] in cap.split()
            torch.testing.assert_close(p["fg"][i], torch.tensor(COLOURS[p["colour"][i]]), atol=0.041, rtol=0)
            checked["colour"] += 1
        rows = (m > 0.5).any(1).nonzero()
        height = float(rows.max() - rows.min() + 1) / 32
        if p["size"][i] == "small":
            assert height < 0.68 and cap.split()[1] == "small"
            checked["size"] += 1
        elif p["size"][i] == "large":
            assert height > 0.72
            checked["size"] += 1
        pos = p["position"][i]
        if pos is not None:
            assert cap.endswith(pos)
            c = _glyph_mask(p, i, centred=True)  # the offset from the same glyph unshifted (shape-independent)
            cx = float((m * xs).sum() / m.sum() - (c * xs).sum() / c.sum())
            cy = float((m * ys).sum() / m.sum() - (c * ys).sum() / c.sum())
            dx, dy = POSITIONS[pos]
            if dx:
                assert cx * dx > 2.0, (cap, cx)
            if dy:
                assert cy * dy > 2.0, (cap, cy)
            if pos == "in the centre":
                assert abs(cx) < 1e-3 and abs(cy) < 1e-3, (cap, cx, cy)
            checked["position"] += 1
    assert min(checked.values()) > 250  # each attribute is named in about 80% of captions


def test_encoding_tokens_mask_padding_and_pooled():
    caps = ["a small red seven on the left", "a two", ""]
    enc = encode_captions(caps, token_dim=24, length=10, pooled_dim=6)
    assert enc["tokens"].shape == (3, 10, 24) and enc["mask"].dtype == torch.bool
    assert enc["mask"].sum(1).tolist() == [8, 3, 1]  # words + </s>; the empty caption is </s> alone
    ids, mask = tokenize(caps, 10)
    assert ids[1, :3].tolist() == [WORD_ID["a"], WORD_ID["two"], WORD_ID[EOS]]
    assert torch.all(ids[~mask] == WORD_ID[PAD])
    table = token_table(24)
    assert torch.equal(enc["tokens"], table[ids])
    assert torch.equal(token_table(24), token_table(24).clone()) and not torch.equal(token_table(24)[:, :8], token_table(8))
    # pooled: a fixed projection of the masked token mean
    again = encode_captions(["a two"], token_dim=24, length=12, pooled_dim=6)["pooled"]
    torch.testing.assert_close(again[0], enc["pooled"][1])
    assert len(set(VOCAB)) == len(VOCAB)


def test_batches_are_deterministic_and_resume_exactly():
    a = caption_batch(5, torch.Generator().manual_seed(3), token_dim=16)
    b = caption_batch(5, torch.Generator().manual_seed(3), token_dim=16)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"]) and a["captions"] == b["captions"]
    src = BatchSource(CaptionGlyphs(token_dim=16, pooled_dim=4), batch_size=3, seed=11)
    it = src.iterate()
    first = [next(it) for _ in range(3)]
    resumed = next(src.iterate(start=2))
    assert torch.equal(first[2][0], resumed[0]) and all(torch.equal(u, v) for u, v in zip(first[2][1], resumed[1]))
    x, (tok, mask, pooled) = first[0]
    assert x.shape == (3, 3, 32, 32) and tok.shape == (3, 10, 16) and mask.shape == (3, 10) and pooled.shape == (3, 4)
    assert not torch.equal(first[0][0], first[1][0])
    direct = CaptionGlyphs(token_dim=16, pooled_dim=4).batch(3, generator_for(11, 1))
    assert torch.equal(direct[0], first[1][0])
    tok0, mask0, _ = CaptionGlyphs(token_dim=16).null(2)
    assert mask0.sum(1).tolist() == [1, 1] and torch.equal(tok0[0], tok0[1])


def test_a_captioned_dataset_batches_as_tokens_and_mask():
    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            enc = encode_captions([caption_text(i % 10, "red")], 8, 6)
            return torch.full((3, 4, 4), float(i) / 6), enc["tokens"][0], enc["mask"][0]

    x, (tok, mask, pooled) = next(BatchSource(DS(), batch_size=4, seed=0).iterate())
    assert x.shape == (4, 3, 4, 4) and tok.shape == (4, 6, 8) and mask.dtype == torch.bool and pooled is None
    assert mask.sum(1).tolist() == [4, 4, 4, 4]


def test_bad_inputs():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenize(["a purple seven"])
    with pytest.raises(ValueError, match="at most"):
        tokenize(["a small red seven on the left"], length=4)
    with pytest.raises(ValueError, match="sequence of strings"):
        tokenize("a seven")
    with pytest.raises(ValueError, match="colour"):
        caption_text(3, colour="purple")
    with pytest.raises(ValueError, match="digit"):
        caption_text(10)
    with pytest.raises(ValueError, match="token_dim"):
        CaptionGlyphs(token_dim=0)
    with pytest.raises(ValueError, match="length"):
        CaptionGlyphs(length=1)
    with pytest.raises(ValueError, match="caption-glyphs"):
        BatchSource("captions")
    assert sorted(SIZES) == ["large", "small"]
