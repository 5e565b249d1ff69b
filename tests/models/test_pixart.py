"""PixArt-α / Σ against diffusers' PixArtTransformer2DModel, every parameter randomized, odd sizes, padded captions."""
import copy

import pytest
import torch
import torch.nn as nn

import eekernels
from eekernels.models import ExitCache, TextCondition
from eekernels.models.convert import pixart as convert_pixart
from eekernels.models.pixart import PIXART_CONFIGS, PixArt, pixart_pos_embed
from eekernels.serialization import save_state
from tests.models._reference_models import assert_bf16_autocast_close, randomize_, rel_err
from tests.utils import CUDA, INTERPRET

diffusers = pytest.importorskip("diffusers")
from diffusers import PixArtTransformer2DModel  # noqa: E402

# 3 heads x 24 (hidden 72; D/3 = 24 for the size embeddings), caption width 40, 3 blocks, 8 x 8 latents (4 x 4 grid).
TINY = dict(num_attention_heads=3, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=3,
            cross_attention_dim=72, caption_channels=40, sample_size=8, patch_size=2)
# alpha: PixArt-α 256/512-like; alpha1024: with the resolution / aspect-ratio embeddings; sigma: Σ-like (no
# additional conditions, longer captions, another position scale).
VARIANTS = {"alpha": dict(use_additional_conditions=False, interpolation_scale=1),
            "alpha1024": dict(use_additional_conditions=True, interpolation_scale=2),
            "sigma": dict(use_additional_conditions=False, interpolation_scale=0.5)}
LENGTH = {"alpha": 7, "alpha1024": 7, "sigma": 11}  # the null caption's tokens (120 / 300 in the releases)


def _diffusers(variant="alpha", seed=0, **kw):
    ref = PixArtTransformer2DModel(**{**TINY, **VARIANTS[variant], **kw})
    return randomize_(ref, seed=seed).eval()


def _null_embedding(variant, seed=0):
    g = torch.Generator().manual_seed(seed + 50)
    return torch.randn(LENGTH[variant], TINY["caption_channels"], generator=g) * 0.3


def _to_original(state: dict, y_embedding=None, pos_embed=None) -> dict:
    """An independent diffusers -> PixArt-alpha mapping: the inverse of diffusers' and PixArt-alpha's
    scripts/convert_pixart_{alpha,sigma}_to_diffusers.py, plus the two tensors those converters drop."""
    s = dict(state)
    out = {}
    ren = {"pos_embed.proj": "x_embedder.proj", "caption_projection.linear_1": "y_embedder.y_proj.fc1",
           "caption_projection.linear_2": "y_embedder.y_proj.fc2",
           "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
           "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
           "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
           "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
           "adaln_single.linear": "t_block.1", "proj_out": "final_layer.linear"}
    for d, o in ren.items():
        for w in ("weight", "bias"):
            if f"{d}.{w}" in s:
                out[f"{o}.{w}"] = s.pop(f"{d}.{w}")
    out["final_layer.scale_shift_table"] = s.pop("scale_shift_table")
    n = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks."))
    for i in range(n):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = s.pop(d + "scale_shift_table")
        for w in ("weight", "bias"):
            out[o + f"attn.qkv.{w}"] = torch.cat([s.pop(d + f"attn1.to_{c}.{w}") for c in "qkv"])
            out[o + f"attn.proj.{w}"] = s.pop(d + f"attn1.to_out.0.{w}")
            out[o + f"cross_attn.q_linear.{w}"] = s.pop(d + f"attn2.to_q.{w}")
            out[o + f"cross_attn.kv_linear.{w}"] = torch.cat([s.pop(d + f"attn2.to_{c}.{w}") for c in "kv"])
            out[o + f"cross_attn.proj.{w}"] = s.pop(d + f"attn2.to_out.0.{w}")
            out[o + f"mlp.fc1.{w}"] = s.pop(d + f"ff.net.0.proj.{w}")
            out[o + f"mlp.fc2.{w}"] = s.pop(d + f"ff.net.2.{w}")
    assert not s, f"unmapped diffusers keys: {sorted(s)[:5]}"
    if y_embedding is not None:
        out["y_embedder.y_embedding"] = y_embedding
    if pos_embed is not None:
        out["pos_embed"] = pos_embed
    return out


def _original(ref, variant):
    return _to_original(ref.state_dict(), _null_embedding(variant), ref.pos_embed.pos_embed.clone())


def _pair(variant="alpha", layout="diffusers", seed=0):
    ref = _diffusers(variant, seed)
    if layout == "diffusers":
        return ref, PixArt.from_diffusers(ref)
    return ref, PixArt.from_checkpoint(_original(ref, variant), num_heads=3)


def _inputs(variant="alpha", B=3, H=8, W=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g) * 1000
    Lt = LENGTH[variant]
    tokens = torch.randn(B, Lt, 40, generator=g, dtype=dtype)
    mask = torch.ones(B, Lt, dtype=torch.bool)
    mask[0, 3:] = False  # padding at the end, as T5 captions come
    if B > 2:
        mask[2, 1:] = False  # a one-token caption
    extra = {}
    if VARIANTS[variant]["use_additional_conditions"]:
        hw = torch.randint(256, 1024, (B, 2), generator=g).to(dtype)
        extra = dict(resolution=hw, aspect_ratio=hw[:, :1] / hw[:, 1:])
    return x, t, TextCondition(tokens, mask, None, extra)


def _ref(ref, x, t, y, depth=None):
    """diffusers with ``transformer_blocks`` cut to the first ``depth`` (a deep copy: ``ref`` is untouched)."""
    if depth is not None:
        ref = copy.deepcopy(ref)
        ref.transformer_blocks = nn.ModuleList(list(ref.transformer_blocks)[:depth])
    mask = None if y.mask is None else y.mask.long()
    return ref(x, encoder_hidden_states=y.tokens, timestep=t, encoder_attention_mask=mask,
               added_cond_kwargs=y.extra or None).sample


# --------------------------------------------------------------------------------------------------
# Equivalence with diffusers
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers_full_depth(variant, layout):
    ref, model = _pair(variant, layout)
    assert (model.num_blocks, model.hidden_size, model.num_heads, model.out_channels) == (3, 72, 3, 8)
    assert model.use_additional_conditions == VARIANTS[variant]["use_additional_conditions"]
    assert model.interpolation_scale == VARIANTS[variant]["interpolation_scale"]  # read from pos_embed (original)
    assert model.source_layout == layout and not model.training
    x, t, y = _inputs(variant)
    want = _ref(ref, x, t, y)
    assert rel_err(model(x, t, y), want) <= 1e-5
    # A grid other than the training one (positions computed as diffusers does), and a caption without mask.
    x2, _, _ = _inputs(variant, H=10, W=14, seed=2)
    assert rel_err(model(x2, t, y), _ref(ref, x2, t, y)) <= 1e-5
    y_nomask = TextCondition(y.tokens, None, None, y.extra)
    assert rel_err(model(x, t, y_nomask), _ref(ref, x, t, y_nomask)) <= 1e-5
    assert rel_err(model(x, t, y_nomask), want) > 1e-3  # the mask matters (guard)


@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_truncated_matches_cut_diffusers(variant):
    ref, model = _pair(variant)
    x, t, y = _inputs(variant)
    outs = []
    for d in (1, 2, 3):
        out = model(x, t, y, depth=d)
        assert rel_err(out, _ref(ref, x, t, y, d)) <= 1e-5, d
        outs.append(out)
    assert rel_err(outs[0], outs[2]) > 1e-2 and rel_err(outs[1], outs[2]) > 1e-3  # truncation changes it


@torch.no_grad()
@pytest.mark.parametrize("variant", ["alpha1024", "sigma"])
def test_per_sample_depth_equals_individual_calls(variant):
    _, model = _pair(variant)
    x, t, y = _inputs(variant, B=4)
    depth = torch.tensor([3, 1, 2, 1])
    out = model(x, t, y, depth=depth)
    for i, d in enumerate(depth.tolist()):
        one = model(x[i:i + 1], t[i:i + 1], y.index(slice(i, i + 1)), depth=d)
        assert rel_err(out[i:i + 1], one) <= 1e-6, (i, d)
    same = model(x, t, y, depth=torch.full((4,), 2))  # equal depths run as the int
    assert torch.equal(same, model(x, t, y, depth=2))


@torch.no_grad()
def test_padding_tokens_are_ignored():
    _, model = _pair("alpha")
    x, t, y = _inputs("alpha")
    changed = y.tokens.clone()
    changed[~y.mask] = torch.randn(int((~y.mask).sum()), 40) * 5
    out = model(x, t, y)
    assert rel_err(model(x, t, TextCondition(changed, y.mask)), out) <= 1e-7
    real = y.tokens.clone()
    real[0, 0] += 1.0
    assert rel_err(model(x, t, TextCondition(real, y.mask)), out) > 1e-4  # a real token matters (guard)


@torch.no_grad()
def test_exit_cache_records_and_replays():
    _, model = _pair("alpha1024")
    x, t, y = _inputs("alpha1024")
    cache = ExitCache([0, 1, 2, 3])
    full = model(x, t, y, exit_cache=cache)
    assert cache.has(1) and cache.has(2) and not cache.has(3)  # full depth is never recorded
    assert rel_err(model(x, t, y, depth=2, exit_cache=cache), full) <= 1e-5  # h_d + (h_L - h_d)
    # depth 0 (no block): the whole stack's part, recorded on the image stream, re-added (min_reuse_depth 0)
    assert rel_err(model(x, t, y, depth=0, exit_cache=cache), full) <= 1e-5
    with pytest.raises(ValueError, match=r"`depth` expected values in \[1, "):
        model(x, t, y, depth=0)  # without an exit cache nothing would stand in for the blocks
    assert rel_err(model(x, t, y, depth=1, exit_cache=cache), full) <= 1e-5
    x2 = torch.randn_like(x)
    delta = cache.load(1)
    assert rel_err(model(x2, t, y, depth=1, exit_cache=cache), model(x2, t, y, depth=1)) > 1e-3
    assert torch.equal(cache.load(1), delta)  # a truncated call does not overwrite the record
    with pytest.raises(ValueError, match="per-sample"):
        model(x, t, y, depth=torch.tensor([1, 2, 3]), exit_cache=cache)
    with pytest.raises(ValueError, match="no value recorded for depth 2"):
        model(x, t, y, depth=2, exit_cache=ExitCache([2]))


@pytest.mark.parametrize("depth", [2, "per-sample"])
def test_bf16_autocast_and_training(depth):
    ref, model = _pair("alpha1024")
    x, t, y = _inputs("alpha1024")
    depth = torch.tensor([3, 1, 2]) if depth == "per-sample" else depth
    assert_bf16_autocast_close(model, lambda x, t, y, depth=None: _ref(ref, x, t, y, depth), x, t, y, depth)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y, depth=depth).float().square().mean().backward()
    assert model.blocks[0].cross_attn.kv_linear.weight.grad.abs().max() > 0
    deepest = 2 if isinstance(depth, torch.Tensor) else depth - 1  # the last block any sample runs
    assert model.adaLN_scale_shift.grad[0].abs().max() > 0 and model.adaLN_scale_shift.grad[deepest].abs().max() > 0
    assert model.csize_embedder.mlp[0].weight.grad.abs().max() > 0


def test_unrun_blocks_get_no_gradient():
    _, model = _pair("sigma")
    x, t, y = _inputs("sigma", B=2)
    model(x, t, y, depth=2).square().mean().backward()
    assert model.blocks[1].mlp.fc1.weight.grad.abs().max() > 0
    assert model.blocks[2].mlp.fc1.weight.grad is None
    assert model.adaLN_scale_shift.grad[2].abs().max() == 0 and model.adaLN_scale_shift.grad[1].abs().max() > 0


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@torch.no_grad()
def test_triton_backend_matches():
    ref = _diffusers("alpha1024", num_layers=2)
    model = PixArt.from_diffusers(ref)
    x, t, y = _inputs("alpha1024", B=2, H=4, W=6)
    with eekernels.backend("triton"):
        out = model(x, t, y, depth=torch.tensor([2, 1]))
    assert rel_err(out[:1], _ref(ref, x[:1], t[:1], y.index(slice(0, 1)), 2)) <= 1e-5
    assert rel_err(out[1:], _ref(ref, x[1:], t[1:], y.index(slice(1, 2)), 1)) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_null_condition():
    ref, model = _pair("sigma", "original")
    null = model.null_condition(2, LENGTH["sigma"])
    assert null.tokens.shape == (2, 11, 40) and null.mask.dtype == torch.bool and bool(null.mask.all())
    assert torch.equal(null.tokens[1], _null_embedding("sigma"))
    null.tokens.add_(1.0)  # a copy: the model's buffer is not touched
    assert torch.equal(model.y_embedder.y_embedding, _null_embedding("sigma"))
    x, t, y = _inputs("sigma", B=2)
    both = model(torch.cat([x, x]), torch.cat([t, t]), y.cat(model.null_condition(2, 11)))
    assert rel_err(both[2:], model(x, t, model.null_condition(2, 11))) <= 1e-6
    with pytest.raises(ValueError, match="`length` expected 11"):
        model.null_condition(2, 7)
    with pytest.raises(ValueError, match="`batch` expected a positive int"):
        model.null_condition(0, 11)
    with pytest.raises(ValueError, match="no learned null caption"):
        PixArt.from_diffusers(ref).null_condition(2, 11)


@torch.no_grad()
def test_bad_conditions_raise_named_errors():
    _, model = _pair("alpha1024")
    _, plain = _pair("sigma")
    x, t, y = _inputs("alpha1024")
    cases = [
        (None, "`y` expected a TextCondition"),
        (y.tokens, "`y` expected an eekernels.models.TextCondition"),
        (TextCondition(torch.randn(3, 7, 41), y.mask, None, y.extra), r"`y.tokens` expected shape \(3, L >= 1, 40\)"),
        (TextCondition(y.tokens[:2], y.mask[:2], None, {k: v[:2] for k, v in y.extra.items()}), r"`y.tokens` expected shape \(3"),
        (TextCondition(y.tokens, y.mask[:, :5], None, y.extra), r"`y.mask` expected shape \(3, 7\)"),
        (TextCondition(y.tokens, y.mask.float() * 2, None, y.extra), r"`y.mask` expected 0/1 values .* got \d+ other"),
        (TextCondition(y.tokens.long(), y.mask, None, y.extra), "`y.tokens` expected a floating tensor"),
        (TextCondition(y.tokens, y.mask, torch.randn(3, 8), y.extra), "`y.pooled` expected None"),
        (TextCondition(y.tokens, y.mask, None, {"resolution": y.extra["resolution"]}), r"expected \['aspect_ratio'\]"),
        (TextCondition(y.tokens, y.mask, None, {**y.extra, "resolution": torch.ones(3, 3)}),
         r"`y.extra\['resolution'\]` expected shape \(3, 2\)"),
    ]
    for cond, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model(x, t, cond)
    xs, ts, ys = _inputs("sigma")
    with pytest.raises(ValueError, match=r"`y.extra` has \['aspect_ratio', 'resolution'\], which this model does not"):
        plain(xs, ts, TextCondition(ys.tokens, ys.mask, None, y.extra))
    with pytest.raises(ValueError, match="`x` expected H and W divisible by 2"):
        model(torch.randn(3, 4, 8, 7), t, y)
    with pytest.raises(ValueError, match=r"`depth` expected values in \[1, 3\]"):
        model(x, t, y, depth=4)


@torch.no_grad()
def test_inputs_not_modified():
    _, model = _pair("alpha1024")
    x, t, y = _inputs("alpha1024", B=4)
    before = [v.clone() for v in (x, t, y.tokens, y.mask, *y.extra.values())]
    model(x, t, y, depth=torch.tensor([1, 3, 2, 3]))
    model(x, t, y)
    after = [x, t, y.tokens, y.mask, *y.extra.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert y.mask.dtype == torch.bool and set(y.extra) == {"resolution", "aspect_ratio"}


# --------------------------------------------------------------------------------------------------
# Layouts and files
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", ["alpha1024", "sigma"])
def test_state_dict_in_both_layouts(variant):
    ref = _diffusers(variant)
    orig = _original(ref, variant)
    model = PixArt.from_checkpoint(orig, num_heads=3)
    back = model.state_dict_in()  # the layout it was read in
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)
    fresh = PixArtTransformer2DModel(**{**TINY, **VARIANTS[variant]}).eval()
    fresh.load_state_dict(model.state_dict_in("diffusers"), strict=True)
    x, t, y = _inputs(variant)
    assert torch.equal(fresh(x, encoder_hidden_states=y.tokens, timestep=t, encoder_attention_mask=y.mask.long(),
                             added_cond_kwargs=y.extra or None).sample, _ref(ref, x, t, y))
    # the converters are inverses
    dstate = ref.state_dict()
    again = convert_pixart.original_to_diffusers("test", convert_pixart.diffusers_to_original("test", dstate))
    assert set(again) == set(dstate) and all(torch.equal(again[k], dstate[k]) for k in dstate)
    with pytest.raises(ValueError, match="`layout` expected one of"):
        model.state_dict_in("sai")


@torch.no_grad()
@pytest.mark.parametrize("layout", ["original", "diffusers", "own"])
def test_safetensors_round_trip(tmp_path, layout):
    ref, model = _pair("alpha1024", "original")
    state = model.state_dict() if layout == "own" else model.state_dict_in(layout)
    path = tmp_path / "pixart.safetensors"
    save_state(state, path)
    kw = {} if layout == "own" else dict(num_heads=3)
    if layout == "diffusers":  # no pos_embed in this layout: the grid and scale are the caller's
        kw.update(sample_size=8, interpolation_scale=2)
    back = PixArt.from_checkpoint(str(path), **kw) if layout != "own" else PixArt.from_checkpoint(path, num_heads=3)
    assert back.source_layout == ("diffusers" if layout == "diffusers" else "original")
    x, t, y = _inputs("alpha1024")
    assert torch.equal(back(x, t, y), model(x, t, y))
    assert (back.y_embedder.y_embedding is None) == (layout == "diffusers")
    torch.save({"state_dict": model.state_dict_in("original")}, tmp_path / "PixArt-XL-2-tiny.pth")  # the release nesting
    assert torch.equal(PixArt.from_checkpoint(tmp_path / "PixArt-XL-2-tiny.pth", num_heads=3)(x, t, y), model(x, t, y))


@torch.no_grad()
def test_malformed_checkpoints_raise_named_errors(tmp_path):
    ref = _diffusers("alpha1024")
    orig = _original(ref, "alpha1024")

    def fails(state, msg, **kw):
        with pytest.raises(ValueError, match=msg):
            PixArt.from_checkpoint(state, **{"num_heads": 3, **kw})

    fails({k: v for k, v in orig.items() if k != "blocks.1.cross_attn.proj.bias"}, "missing 1 key")
    fails({**orig, "blocks.0.attn.extra.weight": torch.ones(24)}, "unexpected key")
    fails({**orig, "blocks.0.attn.q_norm.weight": torch.ones(72)}, "missing 11 key")  # a partial QK-norm
    fails({**orig, "blocks.2.cross_attn.q_linear.weight": torch.ones(72, 71)}, "'blocks.2.cross_attn.q_linear.weight' has shape")
    fails({k: v for k, v in orig.items() if k != "x_embedder.proj.weight"}, "missing key 'x_embedder.proj.weight'")
    fails({"foo.weight": torch.ones(2)}, "neither")
    fails({**orig, "pos_embed": torch.randn(1, 16, 72)}, "not PixArt's sin-cos table")
    fails(orig, "does not fit the checkpoint's pos_embed", sample_size=16)
    fails({**orig, "pos_embed": torch.randn(1, 15, 72)}, "square grid")
    fails([1, 2], "expected a state dict")
    with pytest.raises(ValueError, match="cannot infer num_heads"):
        PixArt.from_checkpoint(orig)
    dstate = ref.state_dict()
    with pytest.raises(ValueError, match="unexpected key"):
        PixArt.from_diffusers({**dstate, "transformer_blocks.0.attn1.extra.weight": torch.ones(24)}, num_heads=3)
    with pytest.raises(ValueError, match="`qk_norm`"):  # diffusers has no QK-norm option: refused by name
        PixArt.from_diffusers({**dstate, "transformer_blocks.0.attn1.norm_q.weight": torch.ones(24)}, num_heads=3)
    with pytest.raises(ValueError, match="expected the same trailing shape"):
        PixArt.from_diffusers({**dstate, "transformer_blocks.0.attn2.to_k.weight": torch.ones(72, 5)}, num_heads=3)
    with pytest.raises(ValueError, match="expected the diffusers layout"):
        PixArt.from_diffusers(orig, num_heads=3)
    bad = PixArtTransformer2DModel(**{**TINY, "norm_eps": 1e-5})
    with pytest.raises(ValueError, match="expected a PixArt config"):
        PixArt.from_diffusers(bad)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError):
        PixArt.from_checkpoint(tmp_path / "cut.safetensors", num_heads=3)


def test_pos_embed_matches_diffusers_tables():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for h, w, base, s in ((4, 4, 4, 1.0), (5, 7, 4, 2.0), (64, 64, 64, 2.0), (3, 9, 16, 0.5)):
        want = get_2d_sincos_pos_embed(72, (h, w), base_size=base, interpolation_scale=s, output_type="pt")
        assert torch.equal(pixart_pos_embed(72, h, w, base, s)[0], want.float()), (h, w, base, s)


def test_named_configs_match_diffusers_parameter_counts():
    for name in ("PixArt-XL/2-1024", "PixArt-Sigma-XL/2-1024"):
        cfg = PIXART_CONFIGS[name]
        with torch.device("meta"):
            ours = PixArt(**cfg)
            theirs = PixArtTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                              num_layers=28, cross_attention_dim=1152, caption_channels=4096,
                                              sample_size=cfg["sample_size"],
                                              use_additional_conditions=cfg["use_additional_conditions"])
        null = ours.y_embedder.y_embedding.numel()  # a buffer in both PixArt-alpha and here; absent in diffusers
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()), name
        assert null == cfg["model_max_length"] * 4096
        assert theirs.pos_embed.interpolation_scale == cfg["interpolation_scale"]
    assert {c["model_max_length"] for c in PIXART_CONFIGS.values()} == {120, 300}
    assert PixArt.from_config("PixArt-XL/2-512", depth=2).num_blocks == 2
    with pytest.raises(ValueError, match="unknown config"):
        PixArt.from_config("PixArt-XXL")


def test_family_attributes():
    model = PixArt(sample_size=8, hidden_size=72, depth=2, num_heads=3, caption_channels=40, model_max_length=5)
    assert (model.family, model.condition, model.prediction, model.token_dim, model.pooled_dim) == \
        ("PixArt", "text", "epsilon", 40, None)
    assert (model.input_size, model.fixed_size, model.input_multiple, model.num_classes, model.null_class) == \
        (None, False, 2, None, None)
    assert model.learn_sigma and model.out_channels == 8 and model.condition_extras == {}
    assert PixArt(sample_size=8, hidden_size=72, depth=1, num_heads=3, caption_channels=40,
                  use_additional_conditions=True).condition_extras == {"resolution": (2,), "aspect_ratio": (1,)}
    with pytest.raises(ValueError, match="multiple of 3"):
        PixArt(sample_size=8, hidden_size=64, depth=1, num_heads=4, use_additional_conditions=True)
    with pytest.raises(ValueError, match="`num_heads` expected to divide"):
        PixArt(sample_size=8, hidden_size=72, depth=1, num_heads=5)
