"""Fused ops in place (``eekernels.patches``): each rule against the unpatched module, and on whole models.

- every rule, on randomized diffusers modules of odd sizes in float32: the patched module (fused path forced, on
  the torch reference and on Triton's interpreter) equals the unpatched one; parameters and state_dict unchanged;
  in bfloat16 its error against float64 is at most twice diffusers' own;
- what is not patched, and why; conditions checked at each call (a hook on a Linear the rule reads, another
  attention processor, chunked feed-forward) give the module's own forward back;
- the tiny DiT, PixArt, SD3 (and SD3.5), FLUX transformers of test_inplace: which modules match; on the CPU the
  modules run their own forward (no op is called, bit-identical); forced, every depth equals the hand-sliced plain
  model within float32 rounding; ``kernels=False`` leaves every forward untouched; ``disable``/``unpatch`` restore
  every module exactly; ``torch.compile(fullgraph=True)`` with the patches forced: no graph break, the ops in it.
"""
import collections
import copy

import pytest
import torch
import torch.nn as nn

import diffusers
import eekernels
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models import activations as dact, attention as dattn, embeddings as demb, normalization as dnorm
from diffusers.models.transformers import transformer_flux as dflux
from eekernels import inplace, ops, patches
from tests.models._reference_models import randomize_, rel_err
from tests.test_inplace import LISTS, _inputs, _model, _out, _pipeline, _sliced

FAMILIES = ("dit", "pixart", "sd3", "flux")
ATOL = RTOL = 1e-5  # float32: the fused ops compute in float32 and round once, diffusers rounds per op


def _assert_close(got, want, what):
    got, want = (o if isinstance(o, tuple) else (o,) for o in (got, want))
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what}[{i}]"
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}[{i}]: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}[{i}]: {m}")


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of every eekernels op (the patches call them as ``eekernels.ops.<name>``)."""
    calls = collections.Counter()
    for name in ops.__all__:
        fn = getattr(ops, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


# --------------------------------------------------------------------------------------------------
# Every rule on its own, odd sizes, random parameters
# --------------------------------------------------------------------------------------------------
def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


def _rope(n, head_dim):
    """FLUX's RoPE tables for n tokens (diffusers' FluxPosEmbed): (n, head_dim) cos and sin."""
    ids = torch.stack([torch.zeros(n), torch.arange(n) % 3, torch.arange(n) // 3], -1).float()
    third = head_dim // 3
    return dflux.FluxPosEmbed(theta=10000, axes_dim=[third, third, head_dim - 2 * third])(ids)


def _flux_attention(fused=False):
    m = dflux.FluxAttention(query_dim=18, heads=3, dim_head=6, added_kv_proj_dim=18, bias=True, eps=1e-6)
    if fused:
        m.fuse_projections()
    return m


def _flux_attention_diffusers_norms():
    m = _flux_attention()
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        setattr(m, name, dnorm.RMSNorm(6, eps=1e-6))
    return m


# name: (rule, builder, inputs -> (args, kwargs)); sizes: D = 37 / 21 / 18, 5 image and 7 text tokens, batch 2.
CASES = {
    "rms_norm": ("rms_norm", lambda: dnorm.RMSNorm(37, eps=1e-6), lambda: ((_randn(2, 5, 37),), {})),
    "rms_norm-no-weight-4d": ("rms_norm", lambda: dnorm.RMSNorm(37, eps=1e-5, elementwise_affine=False),
                              lambda: ((_randn(3, 2, 5, 37),), {})),
    "gelu": ("linear_gelu_tanh", lambda: dact.GELU(37, 53, approximate="tanh"), lambda: ((_randn(2, 5, 37),), {})),
    "gelu-no-bias": ("linear_gelu_tanh", lambda: dact.GELU(37, 53, approximate="tanh", bias=False),
                     lambda: ((_randn(2, 5, 37),), {})),
    "text-projection": ("text_projection_gelu_tanh", lambda: demb.PixArtAlphaTextProjection(29, 37),
                        lambda: ((_randn(2, 7, 29),), {})),
    "ada-norm-zero": ("ada_layer_norm_zero", lambda: dnorm.AdaLayerNormZero(37),
                      lambda: ((_randn(2, 5, 37),), {"emb": _randn(2, 37, seed=1)})),
    "ada-norm-zero-labels": ("ada_layer_norm_zero", lambda: dnorm.AdaLayerNormZero(37, num_embeddings=11),
                             lambda: ((_randn(2, 5, 37), torch.tensor([3, 500]), torch.tensor([1, 7])),
                                      {"hidden_dtype": torch.float32})),
    "ada-norm-zero-fp32": ("ada_layer_norm_zero", lambda: dnorm.AdaLayerNormZero(37, norm_type="fp32_layer_norm"),
                           lambda: ((_randn(2, 5, 37),), {"emb": _randn(2, 37, seed=1)})),
    "ada-norm-zero-single": ("ada_layer_norm_zero_single", lambda: dnorm.AdaLayerNormZeroSingle(37),
                             lambda: ((_randn(2, 5, 37),), {"emb": _randn(2, 37, seed=1)})),
    "sd35-ada-norm-zero-x": ("sd35_ada_layer_norm_zero_x", lambda: dnorm.SD35AdaLayerNormZeroX(37),
                             lambda: ((_randn(2, 5, 37),), {"emb": _randn(2, 37, seed=1)})),
    "ada-norm-continuous": ("ada_layer_norm_continuous",
                            lambda: dnorm.AdaLayerNormContinuous(37, 29, elementwise_affine=False, eps=1e-6),
                            lambda: ((_randn(2, 5, 37), _randn(2, 29, seed=1)), {})),
    "dit-block": ("basic_block_gated_residual",
                  lambda: dattn.BasicTransformerBlock(21, 3, 7, num_embeds_ada_norm=11, norm_type="ada_norm_zero",
                                                      norm_elementwise_affine=False, norm_eps=1e-6,
                                                      activation_fn="gelu-approximate", attention_bias=True),
                  lambda: ((_randn(2, 5, 21),), {"timestep": torch.tensor([3, 500]),
                                                 "class_labels": torch.tensor([1, 7])})),
    "pixart-block": ("basic_block_gated_residual",
                     lambda: dattn.BasicTransformerBlock(21, 3, 7, cross_attention_dim=13, norm_type="ada_norm_single",
                                                         norm_elementwise_affine=False, norm_eps=1e-6,
                                                         activation_fn="gelu-approximate", attention_bias=True),
                     lambda: ((_randn(2, 5, 21),), {
                         "encoder_hidden_states": _randn(2, 7, 13, seed=1), "timestep": _randn(2, 6 * 21, seed=2),
                         "encoder_attention_mask": torch.tensor([[0.0] * 7, [0.0] * 4 + [-10000.0] * 3])[:, None]})),
    "ada-norm-single-block-no-cross": ("basic_block_gated_residual",
                                       lambda: dattn.BasicTransformerBlock(21, 3, 7, norm_type="ada_norm_single",
                                                                           norm_elementwise_affine=False,
                                                                           activation_fn="gelu-approximate"),
                                       lambda: ((_randn(2, 5, 21),), {"timestep": _randn(2, 6 * 21, seed=2)})),
    "joint-block": ("joint_block_gated_residual", lambda: dattn.JointTransformerBlock(21, 3, 7),
                    lambda: ((_randn(2, 5, 21), _randn(2, 7, 21, seed=1), _randn(2, 21, seed=2)), {})),
    "joint-block-last": ("joint_block_gated_residual",
                         lambda: dattn.JointTransformerBlock(21, 3, 7, context_pre_only=True),
                         lambda: ((_randn(2, 5, 21), _randn(2, 7, 21, seed=1), _randn(2, 21, seed=2)), {})),
    "joint-block-sd35": ("joint_block_gated_residual",
                         lambda: dattn.JointTransformerBlock(21, 3, 7, qk_norm="rms_norm", use_dual_attention=True),
                         lambda: ((_randn(2, 5, 21), _randn(2, 7, 21, seed=1), _randn(2, 21, seed=2)), {})),
    "flux-block": ("flux_block_gated_residual", lambda: dflux.FluxTransformerBlock(18, 3, 6),
                   lambda: ((_randn(2, 5, 18), _randn(2, 7, 18, seed=1), _randn(2, 18, seed=2)),
                            {"image_rotary_emb": _rope(12, 6)})),
    "flux-single-block": ("flux_single_block_linear_gelu_tanh", lambda: dflux.FluxSingleTransformerBlock(18, 3, 6),
                          lambda: ((_randn(2, 5, 18), _randn(2, 7, 18, seed=1), _randn(2, 18, seed=2)),
                                   {"image_rotary_emb": _rope(12, 6)})),
    "flux-attention-no-rope": ("flux_attention_qk_norm_rope", _flux_attention,
                               lambda: ((_randn(2, 5, 18),), {"encoder_hidden_states": _randn(2, 7, 18, seed=1)})),
    "flux-attention-fused-qkv": ("flux_attention_qk_norm_rope", lambda: _flux_attention(fused=True),
                                 lambda: ((_randn(2, 5, 18),), {"encoder_hidden_states": _randn(2, 7, 18, seed=1),
                                                                "image_rotary_emb": _rope(12, 6)})),
    "flux-attention-diffusers-rms-norms": ("flux_attention_qk_norm_rope", _flux_attention_diffusers_norms,
                                           lambda: ((_randn(2, 5, 18),), {"encoder_hidden_states": _randn(2, 7, 18),
                                                                          "image_rotary_emb": _rope(12, 6)})),
}


def _case(name):
    rule, build, inputs = CASES[name]
    module = randomize_(build(), seed=len(name)).eval()
    return rule, module, copy.deepcopy(module), inputs()


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_equals_the_unpatched_module(name, backend, op_calls):
    rule, module, plain, (args, kwargs) = _case(name)
    ptrs = {k: v.data_ptr() for k, v in module.state_dict().items()}
    report = patches.patch(module)
    assert ("", rule) in report.patched, report
    assert {k: v.data_ptr() for k, v in module.state_dict().items()} == ptrs  # its own parameters, no copies
    with torch.no_grad():
        want = plain(*args, **kwargs)
        with patches.forced(), eekernels.backend(backend):
            got = module(*args, **kwargs)
    assert sum(op_calls.values()) > 0
    _assert_close(got, want, f"{name} on {backend}")


def _cast(v, dtype):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(dtype)
    if isinstance(v, torch.dtype):  # hidden_dtype
        return dtype
    if isinstance(v, (tuple, list)):
        return type(v)(_cast(t, dtype) for t in v)
    return {k: _cast(t, dtype) for k, t in v.items()} if isinstance(v, dict) else v


@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_in_bfloat16_is_as_accurate_as_diffusers(name):
    """bfloat16, the fused path (the torch reference: float32 inside, one rounding): same dtypes as diffusers, and
    its error against the module in float64 at most twice diffusers' own bfloat16 error (flash-attention's rule)."""
    _, module, plain, (args, kwargs) = _case(name)
    exact = copy.deepcopy(plain).double()
    module, plain = module.to(torch.bfloat16), plain.to(torch.bfloat16)
    patches.patch(module)
    with torch.no_grad():
        want = exact(*_cast(args, torch.float64), **_cast(kwargs, torch.float64))
        base = plain(*_cast(args, torch.bfloat16), **_cast(kwargs, torch.bfloat16))
        with patches.forced():
            got = module(*_cast(args, torch.bfloat16), **_cast(kwargs, torch.bfloat16))
    got, base, want = (o if isinstance(o, tuple) else (o,) for o in (got, base, want))
    for i, (g, b, w) in enumerate(zip(got, base, want)):
        if w is None:
            continue
        assert g.dtype == b.dtype == torch.bfloat16, (name, i, g.dtype, b.dtype)
        fused, own = rel_err(g, w), rel_err(b, w)
        assert fused <= 2 * own + 1e-6, f"{name}[{i}]: fused {fused:.2e}, diffusers {own:.2e} (vs float64)"


def test_the_report_says_why_a_module_is_not_patched():
    class OwnGELU(dact.GELU):
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    class Noop(ModelHook):
        pass

    hooked = dact.GELU(8, 8, approximate="tanh")
    HookRegistry.check_if_exists_or_initialize(hooked).register_hook(Noop(), "user_hook")
    attn = _flux_attention()
    attn.norm_k.eps = 1e-5
    cases = [
        (dnorm.RMSNorm(8, eps=1e-6, bias=True), "bias"),
        (dact.GELU(8, 8), "approximate='none'"),
        (dnorm.AdaLayerNormContinuous(8, 4, elementwise_affine=True, eps=1e-6), "affine"),
        (dnorm.AdaLayerNormContinuous(8, 4, elementwise_affine=False, eps=1e-6, norm_type="rms_norm"),
         "not a LayerNorm"),
        (dattn.BasicTransformerBlock(8, 2, 4), "norm_type='layer_norm'"),
        (demb.PixArtAlphaTextProjection(4, 8, act_fn="silu"), "SiLU"),
        (attn, "different eps"),
        (OwnGELU(8, 8, approximate="tanh"), "overrides GELU.forward"),
        (hooked, "already wrapped"),
    ]
    for module, reason in cases:
        report = patches.patch(module)
        assert all(path != "" for path, _ in report.patched), (type(module).__name__, report)  # children may be
        root = [why for path, _, why in report.skipped if path == ""]
        assert root and reason in root[0], (reason, report.skipped)
        assert "eekernels_kernel" not in getattr(getattr(module, "_diffusers_hook", None), "hooks", ())
        assert reason in str(report)
        patches.unpatch(module)


def test_children_a_replacement_reads_are_not_patched_on_their_own():
    """FluxAttention reads its QK norms' weights: diffusers RMSNorms there are not patched by the rms_norm rule (the
    attention's fused path needs them plain); called as modules (SD3.5's processor) they are."""
    _, attn, _, _ = _case("flux-attention-diffusers-rms-norms")
    report = patches.patch(attn)
    assert report.patched == [("", "flux_attention_qk_norm_rope")]
    assert all("fused into its parent's replacement" in why for _, _, why in report.skipped), report.skipped
    assert len(report.skipped) == 4
    block = dattn.JointTransformerBlock(21, 3, 7, qk_norm="rms_norm")
    assert patches.patch(block).counts() == {"joint_block_gated_residual": 1, "ada_layer_norm_zero": 2,
                                             "linear_gelu_tanh": 2, "rms_norm": 4}


def test_conditions_that_change_after_patching_give_the_modules_own_forward_back(op_calls):
    gelu = randomize_(dact.GELU(37, 53, approximate="tanh"))
    plain = copy.deepcopy(gelu)
    patches.patch(gelu)
    for m in (gelu, plain):  # e.g. a LoRA or a casting hook on the Linear the rule reads directly
        m.proj.register_forward_hook(lambda mod, args, out: out * 2)
    x = _randn(2, 5, 37)
    with torch.no_grad(), patches.forced():
        assert torch.equal(gelu(x), plain(x))
    assert op_calls["linear_act"] == 0

    class OtherProcessor(dflux.FluxAttnProcessor):
        pass

    _, attn, plain, (args, kwargs) = _case("flux-attention-fused-qkv")
    patches.patch(attn)
    for m in (attn, plain):
        m.set_processor(OtherProcessor())
    with torch.no_grad(), patches.forced():
        assert torch.equal(attn(*args, **kwargs)[0], plain(*args, **kwargs)[0])
    assert op_calls["qk_norm_rope"] == 0

    norm = randomize_(dnorm.AdaLayerNormZero(37))
    plain = copy.deepcopy(norm)
    patches.patch(norm)
    x, emb = _randn(2, 5, 37), _randn(1, 37)  # one embedding for the batch: diffusers broadcasts it
    with torch.no_grad(), patches.forced():
        _assert_close(norm(x, emb=emb), plain(x, emb=emb), "AdaLayerNormZero, a broadcast embedding")
    assert op_calls["modulated_layer_norm"] == 0

    _, block, plain, (args, kwargs) = _case("dit-block")
    patches.patch(block)
    for m in (block, plain):
        m.set_chunk_feed_forward(5, 1)
    with torch.no_grad(), patches.forced():
        assert torch.equal(block(*args, **kwargs), plain(*args, **kwargs))
    assert op_calls["gated_residual_norm"] == 0


def test_a_lora_added_after_patching_is_applied(op_calls):
    """peft LoRA layers (added after accelerate, as load_lora_weights does) replace Linears the rules read: those
    rules run the LoRA layer; the rest stays fused. Uses peft."""
    from peft import LoraConfig

    model = _model("flux")
    plain = copy.deepcopy(model)
    eekernels.accelerate(model)
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                        target_modules=["proj_mlp", "ff.net.0.proj", "to_q", "norm1.linear"])
    for m in (model, plain):
        m.add_adapter(config)
    plain.load_state_dict(model.state_dict())  # the same random LoRA weights (the hooks add no keys)
    kw = _inputs("flux")
    with torch.no_grad(), patches.forced():
        got = _out(model(**kw))
    with torch.no_grad():
        want = _out(plain(**kw))
    assert not torch.allclose(want, _out(_model("flux")(**kw)), atol=1e-3)  # the LoRA changes the output
    _assert_close(got, want, "flux with a LoRA")
    # linear_act: only the two ff_context GELUs (no LoRA there); every proj_mlp and ff.net.0.proj runs its LoRA
    assert op_calls["linear_act"] == 2 and op_calls["qk_norm_rope"] == 7 and op_calls["gated_residual_norm"] == 4


@pytest.mark.parametrize("fam", ("dit", "flux"))
def test_layerwise_casting_enabled_after_patching_is_honoured(fam):
    """diffusers' layerwise casting (float8 storage) hooks the Linears: the rules that read a Linear's weight run
    it through its hook instead; the output equals the plain model with the same casting."""
    model = _model(fam)
    plain = copy.deepcopy(model)
    eekernels.accelerate(model)
    for m in (model, plain):
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    kw = _inputs(fam)
    with torch.no_grad(), patches.forced():
        got = _out(model(**kw))
    with torch.no_grad():
        want = _out(plain(**kw))
    _assert_close(got, want, f"{fam} with layerwise casting")


def test_patch_and_unpatch_refuse_bad_inputs():
    with pytest.raises(ValueError, match="`model` expected a torch.nn.Module, got str"):
        patches.patch("transformer")
    with pytest.raises(ValueError, match="`report` expected a bool, got 1"):
        patches.patch(nn.Linear(2, 2), report=1)
    m = dact.GELU(4, 4, approximate="tanh")
    with pytest.raises(ValueError, match="unpatched GELU"):
        patches.unpatch(m)
    patches.patch(m)
    with pytest.raises(ValueError, match="already patched"):
        patches.patch(m)


# --------------------------------------------------------------------------------------------------
# Whole models: the tiny transformers of test_inplace
# --------------------------------------------------------------------------------------------------
def _sd35(seed=0):
    """SD3.5-style: diffusers RMSNorm QK norms and a dual-attention block."""
    m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16,
                                        qk_norm="rms_norm", dual_attention_layers=(0,))
    return randomize_(m, seed=seed).eval()


def _family_model(fam):
    return _sd35() if fam == "sd35" else _model(fam)


MATCHED = {
    "dit": {"basic_block_gated_residual": 4, "ada_layer_norm_zero": 4, "linear_gelu_tanh": 4},
    "pixart": {"basic_block_gated_residual": 4, "linear_gelu_tanh": 4, "text_projection_gelu_tanh": 1},
    "sd3": {"joint_block_gated_residual": 4, "ada_layer_norm_zero": 7, "ada_layer_norm_continuous": 2,
            "linear_gelu_tanh": 7},
    "sd35": {"joint_block_gated_residual": 3, "ada_layer_norm_zero": 4, "sd35_ada_layer_norm_zero_x": 1,
             "ada_layer_norm_continuous": 2, "linear_gelu_tanh": 5, "rms_norm": 14},
    "flux": {"flux_block_gated_residual": 2, "ada_layer_norm_zero": 4, "flux_attention_qk_norm_rope": 5,
             "linear_gelu_tanh": 4, "flux_single_block_linear_gelu_tanh": 3, "ada_layer_norm_zero_single": 3,
             "ada_layer_norm_continuous": 1},
}
NOT_PATCHED = {  # (path, words of its reason) for one module each family leaves alone
    "dit": ("norm_out", "a LayerNorm alone"),
    "pixart": ("transformer_blocks.0.attn2", "no RoPE"),
    "sd3": ("time_text_embed.text_embedder", "SiLU"),
    "sd35": ("transformer_blocks.0.attn.norm_q", None),  # patched: the rms_norm rule
    "flux": ("transformer_blocks.0.attn.norm_q", "fused into its parent's replacement (flux_attention_qk_norm_rope)"),
}


@pytest.mark.parametrize("fam", (*FAMILIES, "sd35"))
def test_which_modules_each_family_matches(fam):
    model = _family_model(fam)
    report = patches.patch(model)
    assert report.counts() == MATCHED[fam], report
    path, words = NOT_PATCHED[fam]
    if words is None:
        assert (path, "rms_norm") in report.patched
    else:
        assert any(p == path and words in why for p, _, why in report.skipped), report.skipped
    text = str(report)
    assert f"{sum(MATCHED[fam].values())} modules replaced" in text and "elsewhere each module's own forward" in text
    hooked = {p for p, m in model.named_modules()
              if "eekernels_kernel" in getattr(getattr(m, "_diffusers_hook", None), "hooks", ())}
    assert hooked == {p for p, _ in report.patched}


@pytest.mark.parametrize("fam", (*FAMILIES, "sd35"))
def test_on_the_cpu_the_modules_run_their_own_forward(fam, op_calls):
    model = _family_model(fam)
    plain = copy.deepcopy(model)
    kw = _inputs("sd3" if fam == "sd35" else fam)
    patches.patch(model)
    with torch.no_grad():
        assert torch.equal(_out(model(**kw)), _out(plain(**kw)))
    assert not op_calls, dict(op_calls)


@pytest.mark.parametrize("fam", FAMILIES)
def test_forced_every_depth_equals_the_plain_model_sliced_by_hand(fam, op_calls):
    """Patches under the exit hooks (accelerate, kernels=True by default): the full-depth output, and every depth,
    equal the plain model (sliced by hand) within float32 rounding."""
    model = _model(fam)
    plain = copy.deepcopy(model)
    kw = _inputs(fam)
    eekernels.accelerate(model)
    report = inplace.controller(model).patches
    assert isinstance(report, patches.PatchReport) and report.counts() == MATCHED[fam]
    depth = inplace.controller(model).num_blocks
    for d in range(depth, 0, -1):
        with torch.no_grad(), patches.forced(), inplace.at_depth(model, d):
            got = _out(model(**kw))
        with torch.no_grad():
            want = _out(_sliced(plain, LISTS[fam], d)(**kw))
        _assert_close(got, want, f"{fam} at depth {d}")
    assert op_calls["modulated_layer_norm"] + op_calls["gated_residual_norm"] > 0


def test_sd35_forced_equals_the_plain_model():
    model = _sd35()
    plain = copy.deepcopy(model)
    kw = _inputs("sd3")
    patches.patch(model)
    with torch.no_grad(), patches.forced():
        got = _out(model(**kw))
    _assert_close(got, _out(plain(**kw)), "sd35")


@pytest.mark.parametrize("fam", FAMILIES)
def test_kernels_false_leaves_every_forward_untouched(fam):
    model = _model(fam)
    exit_hooked = {id(model)} | {id(b) for n in LISTS[fam] for b in getattr(model, n)}
    eekernels.accelerate(model, kernels=False)
    assert inplace.controller(model).patches is None and patches.report(model) is None
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        assert registry is None or "eekernels_kernel" not in registry.hooks
        if id(m) not in exit_hooked:
            assert "forward" not in vars(m) and registry is None, type(m).__name__


@pytest.mark.parametrize("fam", FAMILIES)
def test_disable_and_unpatch_restore_every_module_exactly(fam):
    model = _model(fam)
    kw = _inputs(fam)
    with torch.no_grad():
        want = _out(model(**kw))
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patches.patch(model)
    patched = {p for p, _ in report.patched}
    assert all("forward" in vars(model.get_submodule(p)) for p in patched)
    patches.unpatch(model)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    # Through accelerate: the exit hooks wrap the patches; disable removes both, the patched modules as before.
    eekernels.accelerate(model)
    with pytest.raises(ValueError, match="hooks registered after eekernels'.*eekernels_exit_block"):
        patches.unpatch(model)  # would drop the exit hooks' own forward: refused, nothing removed
    assert patches.report(model) is not None
    eekernels.disable(model)
    after = {name: set(vars(m)) for name, m in model.named_modules()}
    assert all(after[p] == before[p] for p in patched)
    for m in model.modules():
        assert getattr(m.forward, "__func__", None) is type(m).forward
        assert not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state
    with torch.no_grad():
        assert torch.equal(_out(model(**kw)), want)


def test_a_pipeline_reports_its_patches_and_kernels_false_turns_them_off():
    pipe = _pipeline("dit")
    eekernels.accelerate(pipe)
    report = inplace.controller(pipe).patches
    assert report is patches.report(pipe.transformer) and report.counts() == MATCHED["dit"]
    eekernels.disable(pipe)
    assert patches.report(pipe.transformer) is None
    eekernels.accelerate(pipe, kernels=False)
    assert inplace.controller(pipe).patches is None


@pytest.mark.parametrize("fam", FAMILIES)
def test_compile_fullgraph_with_the_patches_forced_has_no_graph_break(fam):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(fam)
    plain = copy.deepcopy(model)
    kw = _inputs(fam)
    eekernels.accelerate(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad(), patches.forced(), inplace.at_depth(model, None):
        got = _out(compiled(**kw))
    _assert_close(got, _out(plain(**kw)).detach(), f"{fam} compiled")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    used = {str(n.target) for gm in graphs for n in gm.graph.nodes if str(n.target).startswith("eekernels.")}
    expected = {f"eekernels.{op}" for r in patches.RULES if r.name in MATCHED[fam] for op in r.ops}
    assert used == expected, (used, expected)


def test_info_lists_the_rules():
    from eekernels import info

    section = info.collect()["patches (in place)"]
    assert set(section) == {"when"} | {r.name for r in patches.RULES}
    assert "qk_norm_rope" in section["flux_attention_qk_norm_rope"]
