"""SD3 / SD3.5 (MMDiT) against diffusers' SD3Transformer2DModel, every parameter randomized, odd sizes."""
import copy

import pytest
import torch
import torch.nn as nn

import eekernels
from eekernels.models import ExitCache, TextCondition
from eekernels.models.convert import sd3 as convert_sd3
from eekernels.models.sd3 import SD3, SD3_CONFIGS
from eekernels.serialization import save_state
from tests.models._reference_models import assert_bf16_autocast_close, randomize_, rel_err
from tests.utils import CUDA, INTERPRET

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

# 3 heads x 24 head dim (hidden 72), caption width 40, pooled 24, 3 blocks, 5 output channels, a 12 x 12 table.
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=24, num_attention_heads=3,
            joint_attention_dim=40, caption_projection_dim=72, pooled_projection_dim=24, out_channels=5,
            pos_embed_max_size=12)
VARIANTS = {"sd3": dict(), "sd35": dict(qk_norm="rms_norm", dual_attention_layers=(0, 2))}
# "sd35" puts attn2 in block 2, the context_pre_only one, and leaves block 1 without: every combination runs.


def _diffusers(variant="sd3", seed=0, **kw):
    ref = SD3Transformer2DModel(**{**TINY, **VARIANTS[variant], **kw})
    randomize_(ref, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # the position table too: a wrong crop cannot hide behind smooth sin-cos rows
        ref.pos_embed.pos_embed.copy_(torch.randn(ref.pos_embed.pos_embed.shape, generator=g) * 0.3)
    return ref.eval()


def _pair(variant="sd3", seed=0):
    ref = _diffusers(variant, seed)
    return ref, SD3.from_diffusers(ref)


def _inputs(B=3, H=8, W=10, L=7, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g) * 1000  # sigma * 1000, fractional
    y = TextCondition(torch.randn(B, L, 40, generator=g, dtype=dtype), None, torch.randn(B, 24, generator=g, dtype=dtype))
    return x, t, y


def _ref(ref, x, t, y, depth=None):
    """diffusers with ``transformer_blocks`` cut to the first ``depth``: its last block then is not the
    context_pre_only one, but its text output is unused; the image output is what a truncated SD3 gives."""
    blocks = ref.transformer_blocks
    try:
        if depth is not None:
            ref.transformer_blocks = nn.ModuleList(list(blocks)[:depth])
        return ref(hidden_states=x, encoder_hidden_states=y.tokens, pooled_projections=y.pooled, timestep=t).sample
    finally:
        ref.transformer_blocks = blocks


def _to_original(state: dict) -> dict:
    """An independent diffusers -> Stability AI mapping (checked against diffusers' own converter below)."""
    s = dict(state)
    out = {"pos_embed": s.pop("pos_embed.pos_embed")}
    ren = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}

    def swap(v):
        a, b = v.chunk(2)
        return torch.cat([b, a])

    for d, o in ren.items():
        for w in ("weight", "bias"):
            out[f"{o}.{w}"] = s.pop(f"{d}.{w}")
    for w in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{w}"] = swap(s.pop(f"norm_out.linear.{w}"))
    n = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks."))
    for i in range(n):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for w in ("weight", "bias"):
            out[o + f"x_block.attn.qkv.{w}"] = torch.cat([s.pop(d + f"attn.to_{c}.{w}") for c in "qkv"])
            out[o + f"context_block.attn.qkv.{w}"] = torch.cat([s.pop(d + f"attn.add_{c}_proj.{w}") for c in "qkv"])
            out[o + f"x_block.attn.proj.{w}"] = s.pop(d + f"attn.to_out.0.{w}")
            out[o + f"x_block.adaLN_modulation.1.{w}"] = s.pop(d + f"norm1.linear.{w}")
            out[o + f"x_block.mlp.fc1.{w}"] = s.pop(d + f"ff.net.0.proj.{w}")
            out[o + f"x_block.mlp.fc2.{w}"] = s.pop(d + f"ff.net.2.{w}")
            ctx_mod = s.pop(d + f"norm1_context.linear.{w}")
            if i == n - 1:
                out[o + f"context_block.adaLN_modulation.1.{w}"] = swap(ctx_mod)
            else:
                out[o + f"context_block.adaLN_modulation.1.{w}"] = ctx_mod
                out[o + f"context_block.attn.proj.{w}"] = s.pop(d + f"attn.to_add_out.{w}")
                out[o + f"context_block.mlp.fc1.{w}"] = s.pop(d + f"ff_context.net.0.proj.{w}")
                out[o + f"context_block.mlp.fc2.{w}"] = s.pop(d + f"ff_context.net.2.{w}")
            if d + f"attn2.to_q.{w}" in s:
                out[o + f"x_block.attn2.qkv.{w}"] = torch.cat([s.pop(d + f"attn2.to_{c}.{w}") for c in "qkv"])
                out[o + f"x_block.attn2.proj.{w}"] = s.pop(d + f"attn2.to_out.0.{w}")
        for dn, on in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                       ("attn.norm_added_q", "context_block.attn.ln_q"), ("attn.norm_added_k", "context_block.attn.ln_k"),
                       ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k")):
            if d + dn + ".weight" in s:
                out[o + on + ".weight"] = s.pop(d + dn + ".weight")
    assert not s, f"unmapped diffusers keys: {sorted(s)[:5]}"
    return out


# --------------------------------------------------------------------------------------------------
# Equivalence with diffusers
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers_full_depth(variant):
    ref, model = _pair(variant)
    assert (model.num_blocks, model.hidden_size, model.num_heads, model.out_channels) == (3, 72, 3, 5)
    assert model.dual_attention_layers == VARIANTS[variant].get("dual_attention_layers", ())
    x, t, y = _inputs()
    out = model(x, t, y)
    assert out.shape == (3, 5, 8, 10)
    assert rel_err(out, _ref(ref, x, t, y)) <= 1e-5, rel_err(out, _ref(ref, x, t, y))


@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_truncation_matches_diffusers_cut(variant, depth):
    ref, model = _pair(variant)
    x, t, y = _inputs(H=10, W=6)
    want = _ref(ref, x, t, y, depth)
    assert rel_err(model(x, t, y, depth=depth), want) <= 1e-5


@torch.no_grad()
def test_truncation_changes_output_and_grid_sizes():
    # Guards the tests above: with random adaLN every block matters, and the crop follows H, W.
    ref, model = _pair("sd35")
    x, t, y = _inputs()
    assert rel_err(model(x, t, y, depth=2), model(x, t, y)) > 1e-2
    for H, W in ((2, 24), (24, 24), (6, 4)):  # 1 x 12 patches, the whole 12 x 12 table, a small one
        x, t, y = _inputs(B=2, H=H, W=W, seed=H)
        assert rel_err(model(x, t, y), _ref(ref, x, t, y)) <= 1e-5


@torch.no_grad()
def test_fresh_model_matches_diffusers_structure_and_pos_embed():
    # A freshly built SD3 has diffusers' parameter shapes and its sin-cos position table.
    for variant in VARIANTS:
        ref = SD3Transformer2DModel(**{**TINY, **VARIANTS[variant], "sample_size": 6})
        ours = SD3(**{**TINY, **VARIANTS[variant], "sample_size": 6})
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict_in("diffusers").items()} == want
        assert rel_err(ours.pos_embed, ref.pos_embed.pos_embed) <= 1e-7


# --------------------------------------------------------------------------------------------------
# Per-sample depth and the exit cache
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_sample_depth(variant):
    ref, model = _pair(variant)
    x, t, y = _inputs(B=4)
    depth = torch.tensor([1, 3, 2, 1])
    out = model(x, t, y, depth=depth)
    for i, d in enumerate(depth.tolist()):
        yi = y.index(slice(i, i + 1))
        assert rel_err(out[i:i + 1], _ref(ref, x[i:i + 1], t[i:i + 1], yi, d)) <= 1e-5, (i, d)
    same = model(x, t, y, depth=torch.full((4,), 2))  # all equal: runs as the int depth
    assert torch.equal(same, model(x, t, y, depth=2))


@torch.no_grad()
def test_exit_cache_records_and_replays():
    _, model = _pair("sd35")
    x, t, y = _inputs()
    cache = ExitCache([0, 1, 2, 3])
    full = model(x, t, y, exit_cache=cache)
    assert cache.has(1) and cache.has(2) and not cache.has(3)  # full depth is never recorded
    assert rel_err(model(x, t, y, depth=2, exit_cache=cache), full) <= 1e-5  # same inputs: h_d + (h_L - h_d)
    # depth 0 (no block): the whole stack's part, recorded on the image stream, re-added (min_reuse_depth 0)
    assert rel_err(model(x, t, y, depth=0, exit_cache=cache), full) <= 1e-5
    with pytest.raises(ValueError, match=r"`depth` expected values in \[1, "):
        model(x, t, y, depth=0)  # without an exit cache nothing would stand in for the blocks
    x2 = torch.randn_like(x)
    delta = cache.load(1)
    assert rel_err(model(x2, t, y, depth=1, exit_cache=cache), model(x2, t, y, depth=1)) > 1e-3
    assert torch.equal(cache.load(1), delta)  # a truncated call does not overwrite the record
    with pytest.raises(ValueError, match="per-sample"):
        model(x, t, y, depth=torch.tensor([1, 2, 3]), exit_cache=cache)
    with pytest.raises(ValueError, match="no value recorded for depth 2"):
        model(x, t, y, depth=2, exit_cache=ExitCache([2]))


def test_gradients_skip_the_unused_text_stream():
    # depth 2 of 3: block 1's text output is not computed, so its text MLP gets no gradient; block 0's does.
    _, model = _pair("sd35")
    x, t, y = _inputs(B=2)
    model(x, t, y, depth=2).square().mean().backward()
    blocks = model.joint_blocks
    assert blocks[0].context_block.mlp.fc1.weight.grad.abs().max() > 0
    assert blocks[1].x_block.mlp.fc1.weight.grad.abs().max() > 0
    assert blocks[1].context_block.mlp.fc1.weight.grad is None
    assert blocks[1].context_block.attn.proj.weight.grad is None
    assert blocks[2].x_block.attn.qkv.weight.grad is None  # block 2 did not run


def test_inputs_not_modified():
    _, model = _pair("sd35")
    x, t, y = _inputs(B=3)
    saved = [v.clone() for v in (x, t, y.tokens, y.pooled)]
    depth = torch.tensor([2, 3, 1])
    with torch.no_grad():
        model(x, t, y)
        model(x, t, y, depth=depth)
        model(x, t, y, depth=1)
    for a, b in zip((x, t, y.tokens, y.pooled), saved):
        assert torch.equal(a, b)
    assert torch.equal(depth, torch.tensor([2, 3, 1]))


# --------------------------------------------------------------------------------------------------
# Low precision and the fused (Triton) path
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@torch.no_grad()
def test_low_precision_within_twice_torch_error(dtype):
    ref, model = _pair("sd35")
    x, t, y = _inputs()
    want = _ref(copy.deepcopy(ref).double(), x.double(), t.double(), y.to(dtype=torch.float64))
    low = copy.deepcopy(ref).to(dtype)
    base = rel_err(_ref(low, x.to(dtype), t, y.to(dtype=dtype)), want)
    out = model.to(dtype)(x.to(dtype), t, y.to(dtype=dtype))
    assert out.dtype == dtype
    assert rel_err(out, want) <= 2 * base + 1e-4, (rel_err(out, want), base)


@pytest.mark.parametrize("depth", [None, torch.tensor([3, 1, 2])])
def test_bf16_autocast_close_to_fp32(depth):
    # The fused ops take one dtype: the model casts GEMM outputs back to the residual streams' dtype.
    ref, model = _pair("sd35")
    x, t, y = _inputs()
    assert_bf16_autocast_close(model, lambda x, t, y, depth=None: _ref(ref, x, t, y, depth), x, t, y, depth)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and it trains: gradients flow through the fused ops
        model(x, t, y, depth=depth).float().square().mean().backward()
    assert model.joint_blocks[1].x_block.attn2 is None and model.joint_blocks[0].x_block.attn2.qkv.weight.grad.abs().max() > 0


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@torch.no_grad()
def test_triton_backend_matches():
    ref = _diffusers("sd35", num_layers=2, num_attention_heads=2, caption_projection_dim=48, dual_attention_layers=(0,))
    model = SD3.from_diffusers(ref)
    x, t, y = _inputs(B=2, H=4, W=6, L=3)
    with eekernels.backend("triton"):
        out = model(x, t, y, depth=torch.tensor([2, 1]))
    assert rel_err(out[:1], _ref(ref, x[:1], t[:1], y.index(slice(0, 1)), 2)) <= 1e-5
    assert rel_err(out[1:], _ref(ref, x[1:], t[1:], y.index(slice(1, 2)), 1)) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Layouts and files
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_original_layout(variant):
    ref = _diffusers(variant)
    dstate = ref.state_dict()
    orig = _to_original(dstate)
    # The mapping above is the inverse of diffusers' own single-file converter:
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))
    assert set(back) == set(dstate) and all(torch.equal(back[k], dstate[k]) for k in dstate)
    model = SD3.from_checkpoint(orig, attention_head_dim=24)  # without QK-norm the head dim is not in the weights
    assert model.source_layout == "original" and not model.training
    x, t, y = _inputs()
    assert rel_err(model(x, t, y), _ref(ref, x, t, y)) <= 1e-5
    assert rel_err(model(x, t, y, depth=2), _ref(ref, x, t, y, 2)) <= 1e-5
    # Written back in the layout read, key for key; the other layout on request.
    written = model.state_dict_in()
    assert set(written) == set(orig) and all(torch.equal(written[k], orig[k]) for k in orig)
    fresh = SD3Transformer2DModel(**{**TINY, **VARIANTS[variant]})
    fresh.load_state_dict(model.state_dict_in("diffusers"))  # strict
    assert rel_err(_ref(fresh.eval(), x, t, y), _ref(ref, x, t, y)) <= 1e-6
    # A single-file checkpoint: the transformer under model.diffusion_model., next to other components.
    single = {"model.diffusion_model." + k: v for k, v in orig.items()}
    single["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    assert rel_err(SD3.from_checkpoint(single, attention_head_dim=24)(x, t, y), model(x, t, y)) == 0


@torch.no_grad()
def test_diffusers_layout_loaders():
    ref, model = _pair("sd3")
    x, t, y = _inputs()
    assert model.source_layout == "diffusers"
    written = model.state_dict_in()
    dstate = ref.state_dict()
    assert set(written) == set(dstate) and all(torch.equal(written[k], dstate[k]) for k in dstate)
    # From a bare state dict: shapes give the config; without QK-norm the head dim is not in the weights.
    from_sd = SD3.from_diffusers(dstate, attention_head_dim=24)
    assert rel_err(from_sd(x, t, y), _ref(ref, x, t, y)) <= 1e-5
    with pytest.raises(ValueError, match="head dim 64 expected to divide the hidden size 72; pass attention_head_dim="):
        SD3.from_diffusers(dstate)  # the released head dim 64 is the default
    ref35 = _diffusers("sd35")
    assert SD3.from_checkpoint(ref35.state_dict()).num_heads == 3  # QK-norm: head dim from ln_q
    own = SD3.from_checkpoint(model.state_dict(), attention_head_dim=24)  # this class's own state_dict()
    assert rel_err(own(x, t, y), model(x, t, y)) == 0


def test_safetensors_round_trip(tmp_path):
    ref, model = _pair("sd35")
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(x, t, y)
        for layout in ("original", "diffusers"):
            path = tmp_path / f"sd3_{layout}.safetensors"
            save_state(model.state_dict_in(layout), path)
            loaded = SD3.from_checkpoint(path)
            assert loaded.source_layout == layout
            assert rel_err(loaded(x, t, y), want) == 0
    data = path.read_bytes()
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        SD3.from_checkpoint(cut)
    with pytest.raises(ValueError, match="does not exist"):
        SD3.from_checkpoint(tmp_path / "missing.safetensors")


def test_bad_checkpoints():
    ref = _diffusers("sd35")
    orig = _to_original(ref.state_dict())
    missing = {k: v for k, v in orig.items() if k != "joint_blocks.1.context_block.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing .*joint_blocks\.1\.context_block\.mlp\.fc2\.bias"):
        SD3.from_checkpoint(missing)
    with pytest.raises(ValueError, match=r"unexpected key.*joint_blocks\.0\.extra\.weight"):
        SD3.from_checkpoint(dict(orig, **{"joint_blocks.0.extra.weight": torch.zeros(1)}))
    bad = dict(orig, **{"joint_blocks.1.x_block.attn.proj.weight": torch.zeros(72, 71)})
    with pytest.raises(ValueError, match=r"joint_blocks\.1\.x_block\.attn\.proj\.weight.*\(72, 71\).*\(72, 72\)"):
        SD3.from_checkpoint(bad)
    bad_qkv = dict(orig, **{"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(215, 72)})
    with pytest.raises(ValueError, match=r"joint_blocks\.0\.x_block\.attn\.qkv\.weight.*\(215, 72\).*\(216, 72\)"):
        SD3.from_checkpoint(bad_qkv)
    with pytest.raises(ValueError, match=r"joint_blocks\.0\.x_block\.attn\.qkv\.weight.*3 \* hidden"):
        convert_sd3.original_to_diffusers("test", bad_qkv)
    with pytest.raises(ValueError, match=r"does not fit the QK-norm weight"):
        SD3.from_checkpoint(orig, attention_head_dim=8)
    dmissing = {k: v for k, v in ref.state_dict().items() if k != "transformer_blocks.0.attn.add_k_proj.weight"}
    with pytest.raises(ValueError, match=r"missing key 'transformer_blocks\.0\.attn\.add_k_proj\.weight'"):
        SD3.from_diffusers(dmissing)
    with pytest.raises(ValueError, match="neither"):
        SD3.from_checkpoint({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="use SD3.from_checkpoint"):
        SD3.from_diffusers(orig)
    with pytest.raises(ValueError, match="unknown config 'SD4'"):
        SD3.from_config("SD4")


# --------------------------------------------------------------------------------------------------
# Conditions and inputs
# --------------------------------------------------------------------------------------------------
def test_bad_conditions_and_inputs():
    _, model = _pair("sd3")
    x, t, y = _inputs()
    cases = [
        (None, r"`y` expected a TextCondition"),
        (torch.zeros(3), r"`y` expected an eekernels.models.TextCondition"),
        (TextCondition(y.tokens[..., :39], None, y.pooled), r"`y.tokens` expected shape \(3, L >= 1, 40\)"),
        (TextCondition(y.tokens[:2], None, y.pooled), r"`y.tokens` expected shape \(3"),
        (TextCondition(y.tokens, None, None), r"`y.pooled` expected a floating \(3, 24\) tensor, got NoneType"),
        (TextCondition(y.tokens, None, y.pooled[:, :23]), r"`y.pooled` expected a floating \(3, 24\)"),
        (TextCondition(y.tokens, torch.ones(3, 7, dtype=torch.bool), y.pooled), r"`y.mask` expected None"),
        (TextCondition(y.tokens, None, y.pooled, {"guidance": torch.ones(3)}), r"`y.extra` has \['guidance'\]"),
    ]
    for cond, match in cases:
        with pytest.raises(ValueError, match=match):
            model(x, t, cond)
    with pytest.raises(ValueError, match=r"at most pos_embed_max_size=12 patches a side.*\(3, 4, 8, 26\)"):
        model(torch.randn(3, 4, 8, 26), t, y)
    with pytest.raises(ValueError, match=r"`x` expected H and W divisible by 2"):
        model(torch.randn(3, 4, 8, 9), t, y)
    with pytest.raises(ValueError, match=r"`x` expected shape \(B, 4, H, W\)"):
        model(torch.randn(3, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"\[1, 3\].*got 4"):
        model(x, t, y, depth=4)
    with pytest.raises(ValueError, match="negative-prompt embeddings"):
        model.null_condition(3, 7)


def test_family_attributes():
    _, model = _pair("sd3")
    assert (model.condition, model.prediction, model.fixed_size, model.input_multiple) == ("text", "flow", False, 2)
    assert (model.token_dim, model.pooled_dim, model.input_size, model.num_classes) == (40, 24, None, None)
    assert eekernels.models.SD3 is SD3 and model.blocks is model.joint_blocks
    with pytest.raises(ValueError, match="caption_projection_dim"):
        SD3(**{**TINY, "caption_projection_dim": 40})
    with pytest.raises(ValueError, match="qk_norm"):
        SD3(**{**TINY, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match=r"dual_attention_layers.*\[0, 3\).*\(3,\)"):
        SD3(**{**TINY, "dual_attention_layers": (3,)})
    with pytest.raises(ValueError, match=r"`layout` expected one of \('original', 'diffusers'\), got 'sai'"):
        model.state_dict_in("sai")


def test_named_configs_match_diffusers_parameter_counts():
    assert set(SD3_CONFIGS) == {"SD3-medium", "SD3.5-medium", "SD3.5-large"}
    assert "SD3.5-large" in eekernels.models.configs()
    for name, cfg in SD3_CONFIGS.items():
        with torch.device("meta"):  # shapes only
            ours = SD3.from_config(name)
            ref = SD3Transformer2DModel(**cfg)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(ours) == count(ref), name
        assert ours.pos_embed.shape == ref.pos_embed.pos_embed.shape
    assert SD3_CONFIGS["SD3-medium"]["num_layers"] == 24 and SD3_CONFIGS["SD3.5-large"]["num_attention_heads"] == 38
