"""FLUX.1 against diffusers' FluxTransformer2DModel (every parameter randomized), in both checkpoint layouts.

The packing, image ids and the black-forest-labs key mapping are written here independently of eekernels
(from diffusers' FluxPipeline._pack_latents / _prepare_latent_image_ids and black-forest-labs/flux model.py).
"""
import contextlib

import pytest
import torch
import torch.nn as nn

from eekernels.models import ExitCache, TextCondition
from eekernels.models.flux import FLUX_CONFIGS, Flux
from eekernels.serialization import save_state
from tests.models._reference_models import randomize_, rel_err
from tests.utils import triton_usable

B, C, H, W, L_TXT = 3, 16, 8, 10, 7
TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=40, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
_CACHE = {}


def _diffusers(guidance=True, seed=0):
    """A tiny random FluxTransformer2DModel (cached per config: building one costs more than a forward)."""
    key = (guidance, seed)
    if key not in _CACHE:
        from diffusers import FluxTransformer2DModel

        m = FluxTransformer2DModel(in_channels=4 * C, guidance_embeds=guidance, **TINY)
        _CACHE[key] = randomize_(m, seed=seed).eval()
    return _CACHE[key]


def _pair(guidance=True, seed=0):
    ref = _diffusers(guidance, seed)
    return ref, Flux.from_diffusers(ref)


def _inputs(guidance=True, batch=B, seed=1, mask=False, size=(H, W), length=L_TXT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, *size, generator=g)
    t = torch.rand(batch, generator=g) * 999  # sigma * 1000
    extra = {"guidance": 1 + 4 * torch.rand(batch, generator=g)} if guidance else {}
    m = None
    if mask:
        m = torch.rand(batch, length, generator=g) > 0.4
        m[:, 0] = True
    y = TextCondition(torch.randn(batch, length, 40, generator=g), m, torch.randn(batch, 24, generator=g), extra)
    return x, t, y


def _pack(x):  # diffusers FluxPipeline._pack_latents
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(tok, h, w):  # diffusers FluxPipeline._unpack_latents (in latent units)
    b, _, f = tok.shape
    return tok.view(b, h // 2, w // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, f // 4, h, w)


def _image_ids(h, w):  # diffusers FluxPipeline._prepare_latent_image_ids on the packed grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


@contextlib.contextmanager
def _cut(ref, d):
    """diffusers' model with its block lists cut to depth d (double blocks first, then single blocks)."""
    double, single = ref.transformer_blocks, ref.single_transformer_blocks
    nd = len(double)
    ref.transformer_blocks = nn.ModuleList(list(double)[: min(d, nd)])
    ref.single_transformer_blocks = nn.ModuleList(list(single)[: max(d - nd, 0)])
    try:
        yield ref
    finally:
        ref.transformer_blocks, ref.single_transformer_blocks = double, single


@torch.no_grad()
def _want(ref, x, t, y, depth=None):
    kw = {}
    h, w = x.shape[2:]
    if y.mask is not None:
        keys = torch.cat([y.mask, torch.ones(x.shape[0], (h // 2) * (w // 2), dtype=torch.bool)], 1)
        kw["joint_attention_kwargs"] = {"attention_mask": keys[:, None, None, :]}
    g = y.extra.get("guidance")
    with _cut(ref, depth or 10**6):
        out = ref(hidden_states=_pack(x), encoder_hidden_states=y.tokens, pooled_projections=y.pooled,
                  timestep=t / 1000, img_ids=_image_ids(h // 2, w // 2), txt_ids=torch.zeros(y.length, 3),
                  guidance=g, return_dict=False, **kw)[0]
    return _unpack(out, h, w)


# --------------------------------------------------------------------------------------------------
# The black-forest-labs layout, mapped here key by key (black-forest-labs/flux src/flux/model.py, layers.py)
# --------------------------------------------------------------------------------------------------
def _to_bfl(sd, nd, ns):
    out = {}

    def mv(dst, src):
        for w in ("weight", "bias"):
            out[f"{dst}.{w}"] = sd[f"{src}.{w}"]

    mv("img_in", "x_embedder")
    mv("txt_in", "context_embedder")
    for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{dif}.linear_1.weight" in sd:
            mv(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
            mv(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for i in range(nd):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        mv(o + "img_mod.lin", d + "norm1.linear")
        mv(o + "txt_mod.lin", d + "norm1_context.linear")
        for w in ("weight", "bias"):
            out[o + f"img_attn.qkv.{w}"] = torch.cat([sd[d + f"attn.to_{c}.{w}"] for c in "qkv"])
            out[o + f"txt_attn.qkv.{w}"] = torch.cat([sd[d + f"attn.add_{c}_proj.{w}"] for c in "qkv"])
        out[o + "img_attn.norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[o + "img_attn.norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
        out[o + "txt_attn.norm.query_norm.scale"] = sd[d + "attn.norm_added_q.weight"]
        out[o + "txt_attn.norm.key_norm.scale"] = sd[d + "attn.norm_added_k.weight"]
        mv(o + "img_attn.proj", d + "attn.to_out.0")
        mv(o + "txt_attn.proj", d + "attn.to_add_out")
        mv(o + "img_mlp.0", d + "ff.net.0.proj")
        mv(o + "img_mlp.2", d + "ff.net.2")
        mv(o + "txt_mlp.0", d + "ff_context.net.0.proj")
        mv(o + "txt_mlp.2", d + "ff_context.net.2")
    for i in range(ns):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for w in ("weight", "bias"):
            out[o + f"linear1.{w}"] = torch.cat([sd[d + f"attn.to_{c}.{w}"] for c in "qkv"] + [sd[d + f"proj_mlp.{w}"]])
        out[o + "norm.query_norm.scale"] = sd[d + "attn.norm_q.weight"]
        out[o + "norm.key_norm.scale"] = sd[d + "attn.norm_k.weight"]
        mv(o + "linear2", d + "proj_out")
        mv(o + "modulation.lin", d + "norm.linear")
    mv("final_layer.linear", "proj_out")
    for w in ("weight", "bias"):  # LastLayer: shift, scale; diffusers' AdaLayerNormContinuous: scale, shift
        scale, shift = sd[f"norm_out.linear.{w}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{w}"] = torch.cat([shift, scale])
    return out


# --------------------------------------------------------------------------------------------------
# Equivalence with diffusers
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("guidance", [True, False])
def test_matches_diffusers_full_depth(guidance):
    ref, model = _pair(guidance)
    assert (model.num_blocks, model.in_channels, model.out_channels, model.token_dim, model.pooled_dim) == (4, 16, 16, 40, 24)
    assert model.condition_extras == ({"guidance": ()} if guidance else {})
    x, t, y = _inputs(guidance)
    out = model(x, t, y)
    assert out.shape == (B, C, H, W)
    assert rel_err(out, _want(ref, x, t, y)) <= 1e-5, rel_err(out, _want(ref, x, t, y))


@torch.no_grad()
def test_every_depth_matches_cut_diffusers():
    ref, model = _pair()
    x, t, y = _inputs()
    outs = {}
    for d in range(1, model.num_blocks + 1):
        outs[d] = model(x, t, y, depth=d)
        assert rel_err(outs[d], _want(ref, x, t, y, d)) <= 1e-5, (d, rel_err(outs[d], _want(ref, x, t, y, d)))
    for d in range(1, model.num_blocks):  # with random weights every block matters: the guard of the above
        assert rel_err(outs[d], outs[d + 1]) > 1e-2


@torch.no_grad()
def test_text_mask_matches_diffusers_attention_mask():
    ref, model = _pair()
    x, t, y = _inputs(mask=True)
    for d in (None, 1, 3):
        assert rel_err(model(x, t, y, depth=d), _want(ref, x, t, y, d)) <= 1e-5
    assert rel_err(model(x, t, y), model(x, t, TextCondition(y.tokens, None, y.pooled, y.extra))) > 1e-3


@torch.no_grad()
def test_per_sample_depth():
    _, model = _pair()
    x, t, y = _inputs(batch=5)
    depth = torch.tensor([2, 4, 1, 3, 2])  # 2 = the last double block: the switch to the single stream
    out = model(x, t, y, depth=depth)
    for b, d in enumerate(depth.tolist()):
        want = model(x[b : b + 1], t[b : b + 1], y.index(slice(b, b + 1)), depth=d)
        assert rel_err(out[b : b + 1], want) <= 1e-5, (b, d)


@torch.no_grad()
def test_exit_cache_records_and_replays():
    _, model = _pair()
    x, t, y = _inputs()
    cache = ExitCache([0, 1, 3, 4])
    full = model(x, t, y, exit_cache=cache)
    assert cache.has(0) and cache.has(1) and cache.has(3) and not cache.has(4)
    for d in (0, 1, 3):  # same inputs: truncated image stream + (img_L - img_d) = img_L (d = 0: no block runs)
        assert rel_err(model(x, t, y, depth=d, exit_cache=cache), full) <= 1e-5
    with pytest.raises(ValueError, match=r"`depth` expected values in \[1, "):
        model(x, t, y, depth=0)  # without an exit cache nothing would stand in for the blocks
    x2 = torch.randn_like(x)
    before = cache.load(3).clone()
    assert rel_err(model(x2, t, y, depth=3, exit_cache=cache), model(x2, t, y, depth=3)) > 1e-3
    assert torch.equal(cache.load(3), before)
    with pytest.raises(ValueError, match="no value recorded for depth 2"):
        model(x, t, y, depth=2, exit_cache=cache)
    with pytest.raises(ValueError, match="per-sample"):
        model(x, t, y, depth=torch.tensor([1, 2, 3]), exit_cache=cache)


@torch.no_grad()
def test_inputs_not_modified():
    _, model = _pair()
    x, t, y = _inputs(mask=True)
    saved = [v.clone() for v in (x, t, y.tokens, y.mask, y.pooled, y.extra["guidance"])]
    model(x, t, y, depth=torch.tensor([3, 1, 4]))
    model(x, t, y, exit_cache=ExitCache([2]))
    for a, b in zip((x, t, y.tokens, y.mask, y.pooled, y.extra["guidance"]), saved):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Layouts, files and write-back
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("guidance", [True, False])
def test_original_layout_and_write_back(guidance):
    ref, _ = _pair(guidance)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    bfl = _to_bfl(sd, 2, 2)
    saved = {k: v.clone() for k, v in bfl.items()}
    model = Flux.from_checkpoint(bfl, axes_dims_rope=(4, 6, 6))
    assert all(torch.equal(bfl[k], saved[k]) for k in bfl) and set(bfl) == set(saved)  # not modified
    assert model.source_layout == "original" and not model.training
    x, t, y = _inputs(guidance)
    assert rel_err(model(x, t, y), _want(ref, x, t, y)) <= 1e-5
    back = model.state_dict_in()  # the layout read
    assert set(back) == set(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    dif = model.state_dict_in("diffusers")
    assert set(dif) == set(sd) and all(torch.equal(dif[k], sd[k]) for k in sd)
    via_diffusers = Flux.from_checkpoint(sd, axes_dims_rope=(4, 6, 6))  # layout detected from the keys
    assert via_diffusers.source_layout == "diffusers" and set(via_diffusers.state_dict_in()) == set(sd)
    assert torch.equal(via_diffusers(x, t, y), model(x, t, y))


@torch.no_grad()
def test_safetensors_round_trip(tmp_path):
    ref, model = _pair()
    x, t, y = _inputs()
    want = model(x, t, y, depth=3)
    for layout in ("original", "diffusers"):
        path = tmp_path / f"flux-{layout}.safetensors"
        save_state(model.state_dict_in(layout), path)
        back = Flux.from_checkpoint(path, axes_dims_rope=(4, 6, 6))
        assert back.source_layout == layout and torch.equal(back(x, t, y, depth=3), want)
    comfy = {f"model.diffusion_model.{k}": v for k, v in model.state_dict_in("original").items()}
    save_state(comfy, tmp_path / "comfy.safetensors")
    assert torch.equal(Flux.from_checkpoint(tmp_path / "comfy.safetensors", axes_dims_rope=(4, 6, 6))(x, t, y, depth=3),
                       want)


def test_bad_checkpoints():
    _, model = _pair()
    bfl = model.state_dict_in("original")
    with pytest.raises(ValueError, match="pass axes_dims_rope="):  # head dim 16: no released RoPE axes
        Flux.from_checkpoint(bfl)
    missing = {k: v for k, v in bfl.items() if k != "single_blocks.1.linear2.bias"}
    with pytest.raises(ValueError, match=r"single_blocks\.1\.linear2\.bias"):
        Flux.from_checkpoint(missing, axes_dims_rope=(4, 6, 6))
    bad = dict(bfl, **{"double_blocks.1.txt_attn.proj.weight": torch.zeros(32, 31)})
    with pytest.raises(ValueError, match=r"double_blocks\.1\.txt_attn\.proj\.weight.*\(32, 31\).*\(32, 32\)"):
        Flux.from_checkpoint(bad, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match=r"unexpected key.*lora\.weight"):
        Flux.from_checkpoint(dict(bfl, **{"lora.weight": torch.zeros(1)}), axes_dims_rope=(4, 6, 6))
    dif = model.state_dict_in("diffusers")
    with pytest.raises(ValueError, match=r"unexpected key.*extra\.weight"):
        Flux.from_diffusers(dict(dif, **{"extra.weight": torch.zeros(1)}), axes_dims_rope=(4, 6, 6))
    no_v = {k: v for k, v in dif.items() if k != "transformer_blocks.0.attn.add_v_proj.bias"}
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.add_v_proj\.bias"):
        Flux.from_diffusers(no_v, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="black-forest-labs layout .* or the diffusers layout"):
        Flux.from_checkpoint({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="use Flux.from_checkpoint"):
        Flux.from_diffusers(bfl, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="`layout` expected one of"):
        model.state_dict_in("comfy")
    with pytest.raises(ValueError, match="unknown config 'FLUX.2'"):
        Flux.from_config("FLUX.2")


def test_named_configs():
    assert FLUX_CONFIGS["FLUX.1-dev"]["guidance_embeds"] and not FLUX_CONFIGS["FLUX.1-schnell"]["guidance_embeds"]
    import eekernels

    with torch.device("meta"):  # shapes only
        dev = Flux.from_config("FLUX.1-dev")
        schnell = eekernels.models.create("FLUX.1-schnell")
    for m in (dev, schnell):
        assert (m.num_blocks, m.num_double, m.hidden_size, m.num_heads, m.token_dim, m.pooled_dim) == (
            57, 19, 3072, 24, 4096, 768)
        assert m.img_in.weight.shape == (3072, 64) and m.single_blocks[0].linear1.weight.shape == (4 * 3072 + 3 * 3072, 3072)
    assert dev.condition_extras == {"guidance": ()} and schnell.condition_extras == {}
    assert hasattr(dev, "guidance_in") and not hasattr(schnell, "guidance_in")
    assert sum(p.numel() for p in dev.parameters()) == 11_901_408_320  # FLUX.1-dev's published 12B


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_bad_conditions():
    _, model = _pair()
    _, schnell = _pair(guidance=False)
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="negative prompt"):
        model.null_condition(B, L_TXT)
    with pytest.raises(ValueError, match="`y` expected a TextCondition"):
        model(x, t, None)
    with pytest.raises(ValueError, match=r"`y.tokens` expected shape \(3, L >= 1, 40\)"):
        model(x, t, TextCondition(y.tokens[..., :39], None, y.pooled, y.extra))
    with pytest.raises(ValueError, match=r"`y.pooled` expected a floating \(3, 24\) tensor, got NoneType"):
        model(x, t, TextCondition(y.tokens, None, None, y.extra))
    with pytest.raises(ValueError, match=r"`y.extra\['guidance'\]` expected a \(3,\) tensor of guidance scales"):
        model(x, t, TextCondition(y.tokens, None, y.pooled, {}))
    with pytest.raises(ValueError, match=r"`y.extra\['guidance'\]` expected shape \(3,\), got \(3, 1\)"):
        model(x, t, TextCondition(y.tokens, None, y.pooled, {"guidance": torch.ones(3, 1)}))
    with pytest.raises(ValueError, match=r"`y.extra\['guidance'\]` expected finite"):
        model(x, t, TextCondition(y.tokens, None, y.pooled, {"guidance": torch.tensor([1.0, float("nan"), 2.0])}))
    with pytest.raises(ValueError, match=r"`y.extra\['guidance'\]` expected a real"):
        model(x, t, TextCondition(y.tokens, None, y.pooled, {"guidance": torch.ones(3, dtype=torch.bool)}))
    with pytest.raises(ValueError, match=r"`y.extra` has \['guidance'\], which this model does not take"):
        schnell(x, t, y)
    with pytest.raises(ValueError, match=r"divisible by 2"):
        model(x[..., :9], t, y)
    with pytest.raises(ValueError, match=r"`x` expected shape \(B, 16, H, W\)"):
        model(x[:, :4], t, y)
    with pytest.raises(ValueError, match=r"\[1, 4\].*got 5"):
        model(x, t, y, depth=5)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="`axes_dims_rope` expected 3 even widths summing to attention_head_dim=16"):
        Flux(**dict(TINY, axes_dims_rope=(4, 4, 4)))
    with pytest.raises(ValueError, match="`num_layers` expected a positive int"):
        Flux(**dict(TINY, num_layers=0))


def test_key_names_match_diffusers_converter():
    # diffusers' own converter (single_file_utils) hard-codes FLUX.1's width 3072: compare on the meta device.
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = Flux(num_layers=1, num_single_layers=1, guidance_embeds=True, joint_attention_dim=64,
                     pooled_projection_dim=32)
    bfl = {f"model.diffusion_model.{k}": v for k, v in model.state_dict_in("original").items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = model.state_dict_in("diffusers")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_autocast_and_gradients():
    ref, model = _pair()
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(x, t, y, depth=3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y, depth=torch.tensor([3, 1, 3]))
    assert out.dtype == torch.bfloat16
    assert rel_err(out[[0, 2]], want[[0, 2]]) <= 2e-2, rel_err(out[[0, 2]], want[[0, 2]])
    model(x, t, y, depth=3).square().mean().backward()
    assert model.single_blocks[0].linear1.weight.grad.abs().max() > 0
    assert model.single_blocks[0].norm.query_norm.scale.grad.abs().max() > 0
    assert model.single_blocks[1].linear1.weight.grad is None  # block 4 did not run


@pytest.mark.skipif(not triton_usable, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1 (set by conftest on CPU)")
@torch.no_grad()
def test_triton_backend_matches_diffusers():
    import eekernels

    ref, model = _pair()
    # 3 text + 2 image tokens: the interpreter runs every Triton program in Python (qk_norm_rope's dominate)
    x, t, y = _inputs(batch=2, size=(4, 2), length=3)
    with eekernels.backend("triton"):
        out = model(x, t, y, depth=torch.tensor([3, 2]))
    for b, d in ((0, 3), (1, 2)):
        want = _want(ref, x[b : b + 1], t[b : b + 1], y.index(slice(b, b + 1)), d)
        assert rel_err(out[b : b + 1], want) <= 1e-5, (b, d, rel_err(out[b : b + 1], want))
