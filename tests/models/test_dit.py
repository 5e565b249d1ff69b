"""DiT against independent implementations: a plain facebookresearch-layout DiT and diffusers' DiTTransformer2DModel."""
import pytest
import torch

import eekernels
from eekernels.models import DIT_CONFIGS, DiT, ExitCache
from tests.models._reference_models import RefDiT, assert_bf16_autocast_close, randomize_, rel_err
from tests.utils import INTERPRET, CUDA

CFG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=4, num_heads=3, num_classes=10)


def _pair(seed=0, **kw):
    cfg = {**CFG, **kw}
    ref = randomize_(RefDiT(**cfg), seed=seed).eval()
    return ref, DiT.from_checkpoint(ref.state_dict(), num_heads=cfg["num_heads"]).eval()


def _inputs(B=3, C=4, S=8, classes=10, dtype=torch.float32):
    x = torch.randn(B, C, S, S, dtype=dtype)
    t = torch.rand(B) * 999  # fractional timesteps, used as given
    return x, t, torch.randint(0, classes, (B,))


# --------------------------------------------------------------------------------------------------
# Equivalence with the facebookresearch layout
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("depth", [None, 1, 2, 3])
def test_matches_facebook_reference(depth):
    ref, model = _pair()
    x, t, y = _inputs()
    out, want = model(x, t, y, depth=depth), ref(x, t, y, depth=depth)
    assert out.shape == (3, 8, 8, 8)
    assert rel_err(out, want) <= 1e-5, rel_err(out, want)


@torch.no_grad()
def test_truncation_changes_output():
    # Guards the equivalence test: with random adaLN every block matters, so depths must differ.
    ref, model = _pair()
    x, t, y = _inputs()
    assert rel_err(model(x, t, y, depth=2), model(x, t, y)) > 1e-2


@torch.no_grad()
def test_odd_config_and_unconditional_null_label():
    ref, model = _pair(seed=1, hidden_size=48, num_heads=2, depth=3, learn_sigma=False, mlp_ratio=2.0)
    assert (model.num_blocks, model.out_channels, model.learn_sigma, model.null_class) == (3, 4, False, 10)
    x, t, _ = _inputs(B=2)
    null = torch.full((2,), 10)
    assert rel_err(model(x, t), ref(x, t, null)) <= 1e-5  # y=None means the CFG null class


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_low_precision_within_twice_torch_error(dtype):
    ref, model = _pair()
    x, t, y = _inputs()
    want = ref.double()(x.double(), t, y)
    base = rel_err(ref.to(dtype)(x.to(dtype), t, y), want)
    out = model.to(dtype)(x.to(dtype), t, y)
    assert out.dtype == dtype
    assert rel_err(out, want) <= 2 * base + 1e-4, (rel_err(out, want), base)


@pytest.mark.parametrize("depth", [None, torch.tensor([4, 2, 3])])
def test_bf16_autocast_close_to_fp32(depth):
    # The fused ops reject a bfloat16 shift with a float32 x: the model casts at their boundaries instead.
    ref, model = _pair()
    x, t, y = _inputs()
    assert_bf16_autocast_close(model, ref, x, t, y, depth)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and it trains: gradients flow through the fused ops
        model(x, t, y, depth=depth).float().square().mean().backward()
    assert model.blocks[1].mlp.fc1.weight.grad.abs().max() > 0


def test_loaders_return_eval_mode():
    # Train mode drops labels at random (CFG training); a loaded model must be deterministic.
    ref, _ = _pair()
    model = DiT.from_checkpoint(ref.state_dict(), num_heads=3, class_dropout_prob=0.9)
    assert not model.training and not model.y_embedder.training
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))
    assert not DiT.from_diffusers(_diffusers_dit()).training


def test_gradients_match_reference():
    ref, model = _pair()
    x, t, y = _inputs(B=2)
    ref(x, t, y, depth=3).square().mean().backward()
    model(x, t, y, depth=3).square().mean().backward()
    assert rel_err(model.blocks[1].mlp.fc1.weight.grad, ref.blocks[1].mlp.fc1.weight.grad) <= 1e-4
    w, _ = model.block_adaLN(2)
    g = model.adaLN_weight.grad[(2 + 12) * 72 : (2 + 18) * 72]
    assert rel_err(g, ref.blocks[2].adaLN_modulation[1].weight.grad) <= 1e-4
    assert model.adaLN_weight.grad[(2 + 18) * 72 :].abs().max() == 0  # block 3 did not run


def test_adaLN_views_share_storage_and_round_trip():
    ref, model = _pair()
    w, b = model.block_adaLN(1)
    assert w.data_ptr() == model.adaLN_weight.data_ptr() + (2 + 6) * 72 * 72 * 4
    assert torch.equal(w, ref.blocks[1].adaLN_modulation[1].weight)
    fb = model.checkpoint_state_dict()
    fresh = RefDiT(**CFG)
    fresh.load_state_dict(fb)  # strict: the facebookresearch layout key for key
    x, t, y = _inputs()
    with torch.no_grad():
        assert rel_err(fresh(x, t, y), ref(x, t, y)) <= 1e-6
        assert rel_err(DiT.from_checkpoint(model.state_dict(), 3)(x, t, y), model(x, t, y)) == 0  # own layout


# --------------------------------------------------------------------------------------------------
# Equivalence with diffusers
# --------------------------------------------------------------------------------------------------
def _diffusers_dit(layers=3, seed=0, **kw):
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=20, in_channels=4, out_channels=8,
                              num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10, **kw)
    randomize_(m, seed=seed)
    # Converted checkpoints hold identical embedder copies in every block.
    emb0 = m.transformer_blocks[0].norm1.emb.state_dict()
    for blk in m.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(emb0)
    return m.eval()


@torch.no_grad()
@pytest.mark.parametrize("norm_eps", [1e-5, 1e-3])
def test_matches_diffusers(norm_eps):
    ref = _diffusers_dit(norm_eps=norm_eps)
    model = DiT.from_diffusers(ref).eval()
    assert (model.num_blocks, model.hidden_size, model.num_heads, model.num_classes) == (3, 40, 2, 10)
    x, t, y = _inputs()
    want = ref(x, t, y).sample
    assert rel_err(model(x, t, y), want) <= 1e-5


@torch.no_grad()
def test_to_diffusers_computes_the_same_function():
    """An eekernels DiT (facebookresearch conventions, a learned non-sin-cos pos_embed) exported to diffusers'
    DiTTransformer2DModel gives the facebookresearch reference's output, null label included, and loads back."""
    ref, model = _pair(seed=3)
    ref.pos_embed.data.normal_()  # not diffusers' fixed table: the export must carry it
    model = DiT.from_checkpoint(ref.state_dict(), num_heads=3).eval()
    theirs = model.to_diffusers()
    x, t, y = _inputs(B=5)
    y[-1] = model.null_class
    assert rel_err(theirs(x, t, class_labels=y).sample, ref(x, t, y)) <= 1e-5
    back = DiT.from_diffusers(theirs, freq_shift=0.0)
    assert rel_err(back(x, t, y), ref(x, t, y)) <= 1e-5
    uncond = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=1, num_heads=2, num_classes=None)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.to_diffusers()
    no_bias = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=1, num_heads=2, num_classes=3,
                  qkv_bias=False)
    with pytest.raises(ValueError, match="qkv_bias"):
        no_bias.to_diffusers()


@torch.no_grad()
def test_diffusers_state_dict_and_differing_embedders():
    ref = _diffusers_dit()
    x, t, y = _inputs()
    from_sd = DiT.from_diffusers(ref.state_dict(), num_heads=2, input_size=8).eval()  # train(): label dropout
    assert rel_err(from_sd(x, t, y), ref(x, t, y).sample) <= 1e-5
    # Copies that differ are kept per block (block 2's own timestep embedder here), equal to diffusers.
    ref.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(1e-1)
    model = DiT.from_diffusers(ref)
    assert model.block_embedders and not from_sd.block_embedders
    assert rel_err(model(x, t, y), ref(x, t, y).sample) <= 1e-5
    assert rel_err(model(x, t, y), from_sd(x, t, y)) > 1e-4  # block 2's own copy is used
    ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight = torch.nn.Parameter(torch.zeros(40, 128))
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_1\.weight"):
        DiT.from_diffusers(ref)  # a copy of another shape: named


# --------------------------------------------------------------------------------------------------
# Exit cache (exit_policy="cache")
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_exit_cache_records_and_replays():
    ref, model = _pair()
    x, t, y = _inputs()
    cache = ExitCache([2, 4, 9])
    full = model(x, t, y, exit_cache=cache)
    assert cache.has(2) and not cache.has(4)  # full depth is never recorded
    # Same inputs: truncated hidden + (h_L - h_d) = h_L, so the cached truncated call equals the full one.
    assert rel_err(model(x, t, y, depth=2, exit_cache=cache), full) <= 1e-5
    x2 = torch.randn_like(x)
    delta = cache.load(2)
    assert rel_err(model(x2, t, y, depth=2, exit_cache=cache), model(x2, t, y, depth=2)) > 1e-3
    assert torch.equal(cache.load(2), delta)  # a truncated call does not overwrite the record
    with pytest.raises(ValueError, match="no value recorded for depth 3"):
        model(x, t, y, depth=3, exit_cache=cache)
    with pytest.raises(ValueError, match="per-sample"):
        model(x, t, y, depth=torch.tensor([1, 2, 3]), exit_cache=cache)


@torch.no_grad()
def test_depth0_runs_no_block_and_adds_the_whole_stacks_part():
    """Depth 0 with an exit cache (``min_reuse_depth`` 0): no block runs; the output is the facebookresearch
    reference's head on this call's embedded input plus what the whole stack added at the recording call."""
    ref, model = _pair(seed=3)
    x, t, y = _inputs(B=2)
    cache = ExitCache([0, 2])
    full = model(x, t, y, exit_cache=cache)
    assert rel_err(model(x, t, y, depth=0, exit_cache=cache), full) <= 1e-5  # same inputs: h_0 + (h_L - h_0)
    x2, t2, y2 = _inputs(B=2)
    got = model(x2, t2, y2, depth=0, exit_cache=cache)
    want = ref(x2, t2, y2, depth=0, skipped=cache.load(0))
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, ref(x2, t2, y2)) > 1e-3  # the stack's part is the recorded one, not this input's
    # Per-block embedders (a diffusers checkpoint whose copies differ): the head still reads block 0's.
    dref = _diffusers_dit()
    dref.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(1e-1)
    per_block = DiT.from_diffusers(dref)
    assert per_block.block_embedders
    c2 = ExitCache([0])
    full = per_block(x, t, y, exit_cache=c2)
    assert rel_err(per_block(x, t, y, depth=0, exit_cache=c2), full) <= 1e-5
    with pytest.raises(ValueError, match=r"\[1, 4\].*got 0"):
        model(x, t, y, depth=0)  # without an exit cache: nothing stands in for the blocks


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, match", [
    (0, r"\[1, 4\].*got 0"), (5, r"\[1, 4\].*got 5"), (2.0, "got float"), (True, "got bool"),
    (torch.tensor([1.0, 2.0, 3.0]), "integer tensor"), (torch.tensor([1, 2]), r"shape \(3,\)"),
    (torch.tensor([1, 5, 2]), "got 5"), (torch.tensor([0, 1, 2]), "got 0"), (torch.tensor(2), r"shape \(3,\)"),
])
def test_bad_depth(depth, match):
    _, model = _pair()
    with pytest.raises(ValueError, match=match):
        model(*_inputs(), depth=depth)


def test_bad_inputs():
    _, model = _pair()
    x, t, y = _inputs()
    with pytest.raises(ValueError, match=r"`x` expected shape \(B, 4, 8, 8\)"):
        model(x[:, :3], t, y)
    with pytest.raises(ValueError, match=r"`t` expected shape \(3,\)"):
        model(x, t[:2], y)
    with pytest.raises(ValueError, match="`y` expected"):
        model(x, t, y.float())


def test_bad_checkpoints(tmp_path):
    ref, _ = _pair()
    sd = ref.state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.2.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing .*blocks\.2\.mlp\.fc2\.bias"):
        DiT.from_checkpoint(missing, 3)
    bad = dict(sd, **{"blocks.1.attn.proj.weight": torch.zeros(72, 71)})
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj\.weight.*\(72, 71\).*\(72, 72\)"):
        DiT.from_checkpoint(bad, 3)
    with pytest.raises(ValueError, match="unexpected key.*extra.weight"):
        DiT.from_checkpoint(dict(sd, **{"extra.weight": torch.zeros(1)}), 3)
    with pytest.raises(ValueError, match="unknown config 'DiT-XXL/2'"):
        DiT.from_config("DiT-XXL/2")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        DiT.from_checkpoint(text)
    with pytest.raises(ValueError, match="does not exist"):
        DiT.from_checkpoint(tmp_path / "missing.pt")
    odd = {k: v for k, v in sd.items() if not k.startswith("blocks.3.")}  # depth 3, width 72: no known heads
    with pytest.raises(ValueError, match="pass num_heads="):
        DiT.from_checkpoint(odd)
    assert DiT.from_checkpoint(odd, num_heads=3).num_blocks == 3


def test_training_checkpoint_file_prefers_ema(tmp_path):
    ref, _ = _pair()
    other = randomize_(RefDiT(**CFG), seed=5)
    path = tmp_path / "0100000.pt"
    torch.save({"model": other.state_dict(), "ema": ref.state_dict(), "opt": {}, "args": None}, path)
    x, t, y = _inputs()
    with torch.no_grad():
        assert rel_err(DiT.from_checkpoint(path, 3)(x, t, y), ref(x, t, y)) <= 1e-5
        assert rel_err(DiT.from_checkpoint(path, 3, which="model")(x, t, y), other(x, t, y)) <= 1e-5


def test_named_configs():
    assert len(DIT_CONFIGS) == 12
    assert DIT_CONFIGS["DiT-XL/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    with torch.device("meta"):  # shapes only: no time spent initializing weights
        m = DiT.from_config("DiT-S/8", input_size=16)
        assert (m.num_blocks, m.hidden_size, m.patch_size, m.num_classes, m.null_class) == (12, 384, 8, 1000, 1000)
        assert eekernels.models.create("DiT-XL/2").adaLN_weight.shape == ((2 + 6 * 28) * 1152, 1152)


# --------------------------------------------------------------------------------------------------
# The fused (Triton) path
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@torch.no_grad()
def test_triton_backend_matches():
    ref, model = _pair(hidden_size=24, num_heads=2, depth=2, input_size=4)
    x, t, y = _inputs(B=2, S=4)
    with eekernels.backend("triton"):
        out = model(x, t, y, depth=torch.tensor([2, 1]))
    assert rel_err(out[:1], ref(x[:1], t[:1], y[:1], depth=2)) <= 1e-5
    assert rel_err(out[1:], ref(x[1:], t[1:], y[1:], depth=1)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("d", [0, 2])
def test_per_block_forecast_equals_the_model_with_its_branch_outputs_extrapolated_by_hand(order, d):
    """``ForecastCache(target="blocks")``: a call at depth d equals the full model in which every block from d on has
    its attention and MLP outputs replaced by the Lagrange extrapolation (written out) of what they gave at the last
    full calls, everything else (norms, modulations, gates, residual adds, head) computed on this call: diffusers'
    TaylorSeer's predictor. float64, randomized weights."""
    from eekernels.models.cache import ForecastCache

    _, model = _pair(seed=5)
    model = model.double()
    times = [930.0, 810.0, 640.0][: order + 1]
    xs = [torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(len(times) + 1)]
    y = torch.tensor([2, 7])
    seen: dict = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, key=(kind, i): seen.setdefault(key, []).append(out.clone()))
             for i, b in enumerate(model.blocks) for kind, m in (("attn", b.attn), ("mlp", b.mlp))]
    for x, t in zip(xs, times):
        model(x, torch.full((2,), t, dtype=torch.float64), y)
    for h in hooks:
        h.remove()
    t_new = 455.0

    def extrapolate(vals):
        if order == 1:
            return vals[1] + (t_new - times[1]) * (vals[1] - vals[0]) / (times[1] - times[0])
        f01 = (vals[1] - vals[0]) / (times[1] - times[0])
        f12 = (vals[2] - vals[1]) / (times[2] - times[1])
        return vals[0] + (t_new - times[0]) * f01 + (t_new - times[0]) * (t_new - times[1]) * (f12 - f01) / (
            times[2] - times[0])

    originals = {}
    for i, b in enumerate(model.blocks[d:], start=d):
        for kind in ("attn", "mlp"):
            m = getattr(b, kind)
            originals[m] = m.forward
            m.forward = (lambda v: lambda *a, **k: v)(extrapolate(seen[(kind, i)]))
    want = model(xs[-1], torch.full((2,), t_new, dtype=torch.float64), y)
    for m, f in originals.items():
        m.forward = f
    cache = ForecastCache([d], order=order, target="blocks")
    cache.restart()
    for x, t in zip(xs, times):
        cache.begin_call(t, True)
        model(x, torch.full((2,), t, dtype=torch.float64), y, exit_cache=cache)
    cache.begin_call(t_new, False)
    got = model(xs[-1], torch.full((2,), t_new, dtype=torch.float64), y, depth=d, exit_cache=cache)
    assert rel_err(got, want) <= 1e-10
    residual = ForecastCache([d], order=order)  # the whole-residual forecast is another predictor: the test can fail
    residual.restart()
    for x, t in zip(xs, times):
        residual.begin_call(t, True)
        model(x, torch.full((2,), t, dtype=torch.float64), y, exit_cache=residual)
    residual.begin_call(t_new, False)
    assert rel_err(model(xs[-1], torch.full((2,), t_new, dtype=torch.float64), y, depth=d, exit_cache=residual),
                   want) > 1e-6


def test_per_block_forecast_in_sample_and_its_refusals():
    from eekernels import ExitSchedule
    from eekernels.models import PixArt
    from eekernels.models.cache import ForecastCache

    _, model = _pair()
    x, _, y = _inputs(B=2)
    kw = dict(sampler="ddim", steps=6, cfg_scale=1.5, schedule=ExitSchedule.periodic(2, 0, 4), exit_policy="forecast")
    blocks = eekernels.sample(model, x, y, forecast_target="blocks", **kw)
    residual = eekernels.sample(model, x, y, **kw)
    assert torch.isfinite(blocks).all() and rel_err(blocks, residual) > 1e-4
    with pytest.raises(ValueError, match="forecast_target: expected one of"):
        eekernels.sample(model, x, y, forecast_target="modules", **kw)
    with pytest.raises(ValueError, match="forecast_target: 'blocks' expected exit_policy 'forecast'"):
        eekernels.sample(model, x, y, forecast_target="blocks", **{**kw, "exit_policy": "cache"})
    pixart = PixArt(sample_size=8, hidden_size=24, depth=2, num_heads=2, caption_channels=8, model_max_length=3)
    with pytest.raises(ValueError, match="target 'blocks'"):
        c = ForecastCache([1], target="blocks")
        c.restart()
        pixart(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), pixart.null_condition(1, 3), exit_cache=c)
    with pytest.raises(ValueError, match="`target` expected one of"):
        ForecastCache([1], target="modules")
