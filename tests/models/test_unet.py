"""UNet against diffusers' UNet2DModel (random weights, nothing downloaded), and its early-exit semantics.

The truncated reference below drives the diffusers module's own submodules, written plainly from the
semantics in eekernels/models/unet.py's docstring.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is the test dependency UNet is checked against")
from diffusers import UNet2DModel  # noqa: E402

import eekernels  # noqa: E402
from eekernels.models.cache import ExitCache  # noqa: E402
from eekernels.models.unet import UNET_CONFIGS, UNet  # noqa: E402
from tests.utils import triton_usable  # noqa: E402

BASE = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
            norm_num_groups=8, attention_head_dim=16)
PLAIN = dict(down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
ATTN = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
CONFIGS = {
    "plain": PLAIN,
    "attn": ATTN,
    "class": dict(ATTN, num_class_embeds=7, attn_norm_num_groups=4),  # mid attention with its own groups
    # google/ddpm-* conventions: shifted frequencies, [sin, cos], padding-0 downsampling, one head per attention.
    "freq": dict(ATTN, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6,
                 attention_head_dim=None),
    # scale_shift time conditioning (its mid attention has no GroupNorm), padding-0 downsampling, a mid
    # scale factor, centered input, heads that do not tile the channels (64 channels: 3 heads of 20 = 60).
    "scale_shift": dict(ATTN, resnet_time_scale_shift="scale_shift", downsample_padding=0, mid_block_scale_factor=1.4,
                        center_input_sample=True, attention_head_dim=20, layers_per_block=2),
    "no_mid_attn": dict(PLAIN, add_attention=False, time_embedding_dim=96),
    "no_mid": dict(PLAIN, mid_block_type=None),
}
_CACHE = {}


def randomize_(module: torch.nn.Module) -> None:
    """Every parameter random, so that no default value (GroupNorm weight 1, bias 0, a zero init) can hide a
    swapped or dropped term; fan-in scaling keeps activations O(1)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(0.0, 0.5)


def pair(name):
    """(diffusers module, our UNet converted from it), both float32, eval; built once per config."""
    if name not in _CACHE:
        torch.manual_seed(1)
        ref = UNet2DModel(**{**BASE, **CONFIGS[name]}).eval()
        randomize_(ref)
        _CACHE[name] = ref, UNet.from_diffusers(ref)
    return _CACHE[name]


def inputs(ref, B=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 16, 16, generator=g)
    t = torch.rand(B, generator=g) * 999  # fractional timesteps, taken as given
    n = ref.config.num_class_embeds
    y = torch.randint(0, n, (B,), generator=g) if n else None
    return x, t, y


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_rel(out, ref, tol=1e-5, what="output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    worst = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= tol and worst <= tol, f"{what}: relative error {err:.3g} (norm), {worst:.3g} (max) > {tol}"


# --------------------------------------------------------------------------------------------------
# Hand-written reference of the truncated semantics, driving the diffusers module's submodules
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(ref: UNet2DModel, x, t, y, depth, deep_override=None):
    L = len(ref.down_blocks)
    if ref.config.center_input_sample:
        x = 2 * x - 1.0
    emb = ref.time_embedding(ref.time_proj(t).to(x.dtype))
    if ref.class_embedding is not None:
        emb = emb + ref.class_embedding(y)
    h = ref.conv_in(x)
    skips = [h]
    for level in range(depth):
        block = ref.down_blocks[level]
        attentions = getattr(block, "attentions", [None] * len(block.resnets))
        for resnet, attn in zip(block.resnets, attentions):
            h = resnet(h, emb)
            h = attn(h) if attn is not None else h
            skips.append(h)
        if level < depth - 1 and block.downsamplers is not None:  # the exit level keeps its resolution
            h = block.downsamplers[0](h)
            skips.append(h)
    if depth == L:
        h = ref.mid_block(h, emb) if ref.mid_block is not None else h
    else:
        # The deep branch's output would enter the exit level's up block concatenated with the skips:
        # zeros of its shape (channels = the first up resnet's input minus the skip it pops).
        up = ref.up_blocks[L - depth]
        skip = skips[-1]
        channels = up.resnets[0].in_channels - skip.shape[1]
        h = torch.zeros(x.shape[0], channels, *skip.shape[2:]) if deep_override is None else deep_override
    for up in ref.up_blocks[L - depth:]:
        n = len(up.resnets)
        h = up(h, tuple(skips[-n:]), emb)
        skips = skips[:-n]
    h = torch.nn.functional.silu(ref.conv_norm_out(h))
    return ref.conv_out(h)


# --------------------------------------------------------------------------------------------------
# Full depth: exactly diffusers' function
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_depth_matches_diffusers(name):
    ref, model = pair(name)
    x, t, y = inputs(ref)
    x0 = x.clone()
    with torch.no_grad():
        want = ref(x, t, class_labels=y).sample
        out = model(x, t, y)
        assert_rel(out, want, what=f"{name} full depth")
        assert_rel(model(x, t, y, depth=model.num_blocks), want, what=f"{name} depth=num_blocks")
        assert_rel(reference(ref, x, t, y, model.num_blocks), want, what="hand reference at full depth")
    assert torch.equal(x, x0), "forward modified its input"


def test_attributes():
    ref, model = pair("class")
    assert model.num_blocks == 3 and model.in_channels == 3 and model.input_size == 16
    assert model.num_classes == 7 and model.null_class is None and model.learn_sigma is False
    _, plain = pair("plain")
    assert plain.num_classes is None and plain.null_class is None
    cfg = {**BASE, **CONFIGS["class"]}
    m = UNet.from_diffusers(ref.state_dict(), cfg, null_class=6)
    assert (m.num_classes, m.null_class) == (6, 6)


def test_null_class_fills_missing_labels():
    ref, _ = pair("class")
    m = UNet.from_diffusers(ref.state_dict(), {**BASE, **CONFIGS["class"]}, null_class=6)
    x, t, _ = inputs(ref)
    with torch.no_grad():
        assert torch.equal(m(x, t), m(x, t, torch.full((3,), 6)))


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_named_configs_build_the_diffusers_architecture(name):
    # On the meta device: no memory, no init; the parameter count pins every layer's shape.
    with torch.device("meta"):
        ours, theirs = UNet(**UNET_CONFIGS[name]), UNet2DModel(**UNET_CONFIGS[name])
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.num_blocks == len(theirs.down_blocks)


def test_state_dict_and_config_path_matches_module_path():
    ref, model = pair("attn")
    m2 = UNet.from_diffusers(ref.state_dict(), dict(ref.config))
    x, t, y = inputs(ref)
    with torch.no_grad():
        assert torch.equal(m2(x, t), model(x, t))


def test_pre_0_14_attention_names_load():
    # Old UNet2DModel checkpoints name the attention weights query/key/value/proj_attn.
    ref, model = pair("attn")
    legacy = ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn."))
    old = {}
    for k, v in ref.state_dict().items():
        for new, before in legacy:
            k = k.replace(new, before)
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    x, t, _ = inputs(ref)
    with torch.no_grad():
        assert torch.equal(UNet.from_diffusers(old, dict(ref.config))(x, t), model(x, t))


def test_scalar_t_broadcasts():
    ref, model = pair("plain")
    x, _, _ = inputs(ref)
    with torch.no_grad():
        a = model(x, 417.5)
        b = model(x, torch.tensor(417.5))
        c = model(x, torch.full((3,), 417.5))
        want = ref(x, torch.tensor(417.5)).sample
    assert torch.equal(a, c) and torch.equal(b, c)
    assert_rel(a, want)


# --------------------------------------------------------------------------------------------------
# Early exit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "attn", "class", "scale_shift", "no_mid"])
@pytest.mark.parametrize("depth", [1, 2])
def test_truncated_matches_reference(name, depth):
    ref, model = pair(name)
    x, t, y = inputs(ref)
    with torch.no_grad():
        out = model(x, t, y, depth=depth)
        want = reference(ref, x, t, y, depth)
        full = model(x, t, y)
    assert_rel(out, want, what=f"{name} depth={depth}")
    assert rel_err(out, full) > 1e-3, "truncation changed nothing: the skipped levels were not skipped"


@pytest.mark.parametrize("name", ["attn", "class"])
def test_per_sample_depth_equals_solo(name):
    ref, model = pair(name)
    x, t, y = inputs(ref, B=6, seed=3)
    depth = torch.tensor([1, 3, 2, 1, 3, 2])
    with torch.no_grad():
        out = model(x, t, y, depth=depth)
        for i in range(6):
            yi = None if y is None else y[i:i + 1]
            solo = model(x[i:i + 1], t[i:i + 1], yi, depth=int(depth[i]))
            assert_rel(out[i:i + 1], solo, what=f"sample {i} at depth {int(depth[i])}")
        # Uniform tensors take the same path as the int.
        assert_rel(model(x, t, y, depth=torch.full((6,), 2)), model(x, t, y, depth=2), what="uniform tensor")
        assert_rel(model(x, t, y, depth=torch.full((6,), 3, dtype=torch.int32)), model(x, t, y), what="int32 full")


def test_levels_run_on_sorted_prefixes_only():
    # No wasted FLOPs: level l's resnets (down, up, mid) see exactly the samples deeper than l.
    _, model = pair("attn")
    seen = {}

    def hook(name):
        return lambda m, a, o: seen.setdefault(name, []).append(a[0].shape[0])

    L = model.num_blocks
    mods = {f"down{l}": model.down_blocks[l].resnets[0] for l in range(L)}
    mods.update({f"up{l}": model.up_blocks[L - 1 - l].resnets[0] for l in range(L)}, mid=model.mid_block.resnets[0])
    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            model(torch.randn(6, 3, 16, 16), torch.rand(6) * 999, depth=torch.tensor([1, 3, 2, 1, 3, 2]))
    finally:
        for h in handles:
            h.remove()
    assert seen == dict(down0=[6], down1=[4], down2=[2], mid=[2], up2=[2], up1=[4], up0=[6])


def test_exit_cache_reproduces_full_depth():
    ref, model = pair("attn")
    x, t, y = inputs(ref)
    cache = ExitCache([1, 2, 3])
    with torch.no_grad():
        with pytest.raises(ValueError, match="no value recorded"):
            model(x, t, depth=1, exit_cache=cache)
        full = model(x, t, exit_cache=cache)
        assert cache.has(1) and cache.has(2) and not cache.has(3)  # full depth records only exits below it
        for d in (1, 2):
            cached = model(x, t, depth=d, exit_cache=cache)
            assert_rel(cached, full, tol=1e-6, what=f"cached depth {d}")
            assert rel_err(model(x, t, depth=d), full) > 1e-3, "zero-filled exit should differ from full depth"
        # At new inputs the cached call is the reference with the recorded tensor in place of zeros.
        x2, t2, _ = inputs(ref, seed=9)
        assert_rel(model(x2, t2, depth=2, exit_cache=cache),
                   reference(ref, x2, t2, None, 2, deep_override=cache.load(2)), what="cached depth 2, new input")
        with pytest.raises(ValueError, match="exit_cache"):
            model(x, t, depth=torch.tensor([1, 2, 3]), exit_cache=cache)
        with pytest.raises(ValueError, match="exit_cache"):
            model(x[:2], t[:2], depth=1, exit_cache=cache)  # batch differs from the recording call


# --------------------------------------------------------------------------------------------------
# Low precision
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float32(dtype):
    ref, model = pair("attn")
    x, t, y = inputs(ref)
    with torch.no_grad():
        want = model(x, t)
        low = UNet.from_diffusers(ref).to(dtype)
        for depth in (None, 2):
            out = low(x.to(dtype), t, depth=depth)
            assert out.dtype == dtype and torch.isfinite(out).all()
            bound = 1e-2 if dtype == torch.float16 else 5e-2
            assert rel_err(out, model(x, t, depth=depth)) <= bound
        # flash-attention's rule against diffusers run in the same precision (float64 as the truth).
        ref64 = UNet2DModel(**{**BASE, **CONFIGS["attn"]}).double().eval()
        ref64.load_state_dict(ref.state_dict())
        truth = ref64(x.double(), t).sample
        ref_low = UNet2DModel(**{**BASE, **CONFIGS["attn"]}).to(dtype).eval()
        ref_low.load_state_dict(ref.state_dict())
        base = rel_err(ref_low(x.to(dtype), t).sample, truth)
    assert rel_err(low(x.to(dtype), t), truth) <= 2 * base + 1e-6
    assert rel_err(want, truth) <= 1e-5


@pytest.mark.skipif(not triton_usable, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")
def test_triton_backend_matches_torch_backend():
    # The fused kernels inside the model: strided (B, C) scale/shift slices of the shared time projection,
    # the fused-QKV GEMM, GroupNorm without SiLU; per-sample depth for the prefix slicing.
    ref, model = pair("scale_shift")
    x, t, _ = inputs(ref, B=2)
    depth = torch.tensor([2, 3])
    with torch.no_grad():
        want = model(x, t, depth=depth)
        with eekernels.backend("triton"):
            out = model(x, t, depth=depth)
    assert_rel(out, want, tol=1e-5, what="triton backend")


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 4, -1, 1.5, True, torch.tensor(2), torch.tensor([1, 2]),
                                   torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[1, 2, 3]]), torch.tensor([1, 4, 2]),
                                   torch.tensor([0, 1, 2]), "2"])
def test_bad_depth_raises(depth):
    ref, model = pair("plain")
    x, t, _ = inputs(ref)
    with pytest.raises(ValueError, match="`depth`"):
        model(x, t, depth=depth)


def test_bad_forward_inputs_raise():
    ref, model = pair("class")
    x, t, y = inputs(ref)
    with pytest.raises(ValueError, match="`y`"):
        model(x, t)
    with pytest.raises(ValueError, match="`y`"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match="`x`"):
        model(x[:, :2], t, y)
    with pytest.raises(ValueError, match="divisible"):
        model(x[:, :, :14, :14], t, y)
    with pytest.raises(ValueError, match="`t`"):
        model(x, t[:2], y)
    _, plain = pair("plain")
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, y)


@pytest.mark.parametrize("override, match", [
    (dict(down_block_types=("DownBlock2D", "SkipDownBlock2D", "DownBlock2D")), r"DownBlock2D', 'AttnDownBlock2D"),
    (dict(up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D")), r"UpBlock2D', 'AttnUpBlock2D"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(downsample_type="resnet"), "downsample_type"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    (dict(some_future_option=1), "some_future_option"),
])
def test_unsupported_config_raises(override, match):
    ref, _ = pair("plain")
    cfg = dict(ref.config, **override)
    with pytest.raises(ValueError, match=match):
        UNet.from_diffusers(ref.state_dict(), cfg)


def test_bad_checkpoint_raises():
    ref, _ = pair("attn")
    state, cfg = ref.state_dict(), dict(ref.config)
    with pytest.raises(ValueError, match="config"):
        UNet.from_diffusers(state)  # a state dict needs its config
    with pytest.raises(ValueError, match=r"key 'time_embedding.linear_1.weight' has shape \(\d+, 32\), expected \(64, 32\)"):
        UNet.from_diffusers(state, dict(cfg, time_embedding_dim=64))
    with pytest.raises(ValueError, match="missing .*key.*conv_shortcut"):
        UNet.from_diffusers(state, dict(cfg, block_out_channels=(32, 64, 128)))
    with pytest.raises(ValueError, match="conv_out.bias"):
        UNet.from_diffusers({k: v for k, v in state.items() if k != "conv_out.bias"}, cfg)
    with pytest.raises(ValueError, match="unexpected"):
        UNet.from_diffusers(dict(state, extra=torch.zeros(1)), cfg)
    with pytest.raises(ValueError, match="module_or_state_dict"):
        UNet.from_diffusers("unet.safetensors")
    with pytest.raises(ValueError, match="null_class"):
        UNet.from_diffusers(state, cfg, null_class=0)
    no_v = {k: v for k, v in state.items() if k != "down_blocks.1.attentions.0.to_v.weight"}
    with pytest.raises(ValueError, match="to_v.weight"):
        UNet.from_diffusers(no_v, cfg)


def test_nonfinite_weights_warn_and_nonfinite_timesteps_raise():
    ref, model = pair("class")
    state, cfg = dict(ref.state_dict()), dict(ref.config)
    key = "down_blocks.0.resnets.0.conv1.weight"
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"down_blocks\.0\.resnets\.0\.conv1\.weight.*NaN/Inf"):
        UNet.from_diffusers(state, cfg)
    x, t, y = inputs(ref)
    for bad in (torch.full(t.shape, float("nan")), torch.tensor(float("inf")), float("-inf")):
        with pytest.raises(ValueError, match="`t` expected (a )?finite"):
            model(x, bad, y)
