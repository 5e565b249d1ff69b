"""The native tier (``eekernels.accelerate(pipe, native=True)``): what it writes and what it refuses.

- ``save_pretrained`` writes the diffusers layout (the native model converted back): ``model_index.json`` names the
  diffusers class and ``DiffusionPipeline.from_pretrained`` loads a plain diffusers pipeline giving the native
  pipeline's images at full depth; ``to_diffusers()`` gives back the original weights exactly;
- every diffusers model API the stand-ins lack, and the pipeline methods that would reach it (LoRA, IP-adapter,
  xformers, group offloading), raise ``NativeTierError`` naming the method and the in-place tier, before any work;
- ``pipe.to(dtype)`` reaches the stand-in and the caller's other components; the caller's denoiser is not modified;
- ``transformer=None``: refused by name (the in-place tier takes it);
- a diffusers DiT whose blocks' embedder copies differ (every fresh one) runs natively, equal to diffusers at
  every depth;
- ``EarlyExitModel`` declares what the wrapped model declares, so ``sample()`` refuses a mismatch.

Tiny random models (every parameter randomized), float32, nothing downloaded.
"""
import copy
import json
import os
import re

import pytest
import torch
import torch.nn as nn

import diffusers
import eekernels
from eekernels._accelerate import EarlyExitModel, NativeTierError
from eekernels.models.dit import DiT
from tests.models._reference_models import randomize_
from tests.test_inplace import _call, _pipeline

IN_PLACE = re.escape("use the in-place tier: accelerate(pipe) without native=True")
NAMES = ("dit", "ddpm", "ddim", "pixart", "sd3", "flux")


def _denoiser_name(name):
    return "unet" if name in ("ddpm", "ddim") else "transformer"


def _fresh_dit(layers=4, seed=0):
    """A diffusers DiT as initialized or trained from scratch: every block's embedder copy differs."""
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    return randomize_(m, seed=seed).eval()


# --------------------------------------------------------------------------------------------------
# save_pretrained / to_diffusers: the diffusers layout
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
def test_to_diffusers_and_the_models_save_pretrained_give_back_the_original_weights(name, tmp_path):
    original = getattr(_pipeline(name), _denoiser_name(name))
    stand_in = eekernels.accelerate(original, native=True)
    want = original.state_dict()
    back = stand_in.to_diffusers()
    assert type(back) is type(original) and dict(back.config) == dict(original.config)
    got = back.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    stand_in.save_pretrained(tmp_path)
    loaded = type(original).from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], want[k]) for k in want)


@torch.no_grad()
@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_writes_a_plain_diffusers_pipeline_with_the_native_weights(name, tmp_path):
    pipe = _pipeline(name)
    plain = _call(name, pipe)
    native = eekernels.accelerate(copy.deepcopy(pipe), native=True)  # a copy: the weights below change
    key = _denoiser_name(name)
    diffusers_class = type(getattr(pipe, key))
    assert tuple(native.config[key]) == ("diffusers", diffusers_class.__name__)
    gen = torch.Generator().manual_seed(5)
    for p in getattr(native, key).model.parameters():  # as a fine-tuning would: the save must carry these
        p.add_(0.01 * torch.randn(p.shape, generator=gen))
    want = _call(name, native)
    native.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index[key] == ["diffusers", diffusers_class.__name__]
    assert sorted(os.listdir(tmp_path / key)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert type(getattr(native, key)).__module__ == "eekernels._accelerate"  # the stand-in is back in place
    unsaved = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}  # text_encoder=None ...
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path, **unsaved)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe) and type(getattr(loaded, key)) is diffusers_class
    got = _call(name, loaded)
    assert abs(got - want).max() < 1e-4, f"{name}: reloaded plain pipeline vs native {abs(got - want).max()}"
    assert abs(got - plain).max() > 1e-3  # the native model's current weights were written, not the original's


# --------------------------------------------------------------------------------------------------
# Named errors
# --------------------------------------------------------------------------------------------------
#: what a user calls, per model class that has it (the plain model has each of these; the stand-in must refuse)
CALLS = {
    "set_attn_processor": lambda m: m.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0()),
    "attn_processors": lambda m: m.attn_processors,
    "fuse_qkv_projections": lambda m: m.fuse_qkv_projections(),
    "unfuse_qkv_projections": lambda m: m.unfuse_qkv_projections(),
    "enable_layerwise_casting": lambda m: m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn),
    "enable_gradient_checkpointing": lambda m: m.enable_gradient_checkpointing(),
    "load_lora_adapter": lambda m: m.load_lora_adapter({}),
    "set_adapters": lambda m: m.set_adapters(["a"]),
    "enable_cache": lambda m: m.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.2)),
    "enable_group_offload": lambda m: m.enable_group_offload(torch.device("cpu")),
    "set_attention_backend": lambda m: m.set_attention_backend("native"),
}


@pytest.mark.parametrize("name", ("dit", "ddim", "pixart", "sd3", "flux"))
def test_every_diffusers_model_api_the_stand_in_lacks_raises_a_named_error(name):
    original = getattr(_pipeline(name), _denoiser_name(name))
    stand_in = eekernels.accelerate(original, native=True)
    lacking = [n for n in dir(type(original)) if not n.startswith("_") and not hasattr(type(stand_in), n)
               and n not in vars(stand_in) and n not in dir(nn.Module)]
    assert len(lacking) > 20
    for api in lacking:
        with pytest.raises(NativeTierError, match=rf"{type(stand_in).__name__}\.{api}: the native tier .*{IN_PLACE}"):
            getattr(stand_in, api)
    called = [api for api in CALLS if hasattr(original, api)]
    assert {"enable_layerwise_casting", "enable_gradient_checkpointing"} <= set(called)
    if name in ("pixart", "sd3", "flux"):
        assert {"set_attn_processor", "attn_processors", "fuse_qkv_projections"} <= set(called)
    if name in ("sd3", "flux"):
        assert {"load_lora_adapter", "set_adapters"} <= set(called)
    for api in called:
        with pytest.raises(NativeTierError, match=rf"\.{api}: .*{IN_PLACE}"):
            CALLS[api](stand_in)
    with pytest.raises(AttributeError):  # anything else is a plain AttributeError, so hasattr probes still work
        stand_in.no_such_attribute  # noqa: B018
    assert not hasattr(stand_in, "peft_config")


def _random_lora(transformer, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = transformer.transformer_blocks[0].attn.to_q
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(rank, lin.in_features, generator=g),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(lin.out_features, rank, generator=g)}


REFUSED_PIPELINE = {
    "load_lora_weights": lambda p, lora: p.load_lora_weights(lora, adapter_name="a"),
    "fuse_lora": lambda p, lora: p.fuse_lora(),
    "unfuse_lora": lambda p, lora: p.unfuse_lora(),
    "set_adapters": lambda p, lora: p.set_adapters(["a"]),
    "unload_lora_weights": lambda p, lora: p.unload_lora_weights(),
    "disable_lora": lambda p, lora: p.disable_lora(),
    "enable_lora": lambda p, lora: p.enable_lora(),
    "delete_adapters": lambda p, lora: p.delete_adapters("a"),
    "load_ip_adapter": lambda p, lora: p.load_ip_adapter("repo", "subfolder", "weights.safetensors"),
    "enable_xformers_memory_efficient_attention": lambda p, lora: p.enable_xformers_memory_efficient_attention(),
    "enable_group_offload": lambda p, lora: p.enable_group_offload(torch.device("cpu")),
}


@torch.no_grad()
@pytest.mark.parametrize("name", ("sd3", "flux"))
def test_pipeline_lora_and_adapter_methods_raise_a_named_error_before_any_work(name):
    pipe = _pipeline(name)
    lora = _random_lora(pipe.transformer)
    native = eekernels.accelerate(pipe, native=True)
    ref = _call(name, native)
    vae = {k: v.clone() for k, v in native.vae.state_dict().items()}
    for method, call in REFUSED_PIPELINE.items():
        with pytest.raises(NativeTierError, match=rf"{type(pipe).__name__}\.{method}: the native tier .*{IN_PLACE}"):
            call(native, lora)
    assert all(torch.equal(v, vae[k]) for k, v in native.vae.state_dict().items())  # nothing was changed first
    assert not any("lora" in n for n, _ in native.transformer.named_parameters())
    assert (_call(name, native) == ref).all()
    pipe.load_lora_weights(lora, adapter_name="a")  # what the native tier refuses, diffusers' own model takes
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_a_pipeline_without_a_denoiser_is_refused_by_name_and_taken_in_place():
    pipe = diffusers.StableDiffusion3Pipeline(transformer=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                              vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    with pytest.raises(NativeTierError, match=rf"transformer=None.*{IN_PLACE}"):
        eekernels.accelerate(pipe, native=True)
    assert eekernels.accelerate(pipe) is pipe


# --------------------------------------------------------------------------------------------------
# pipe.to(dtype)
# --------------------------------------------------------------------------------------------------
def _bf16_call(name, pipe):
    if name in ("pixart", "sd3", "flux"):
        from tests.test_accelerate_text import call_kwargs

        kw = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in call_kwargs(name).items()}
        return pipe(generator=torch.Generator().manual_seed(3), **kw).images.float()
    if name == "ddim":  # numpy has no bfloat16
        return pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images.float()
    return torch.as_tensor(_call(name, pipe))


@torch.no_grad()
@pytest.mark.parametrize("name", ("dit", "ddim", "sd3", "flux"))
def test_pipe_to_dtype_reaches_the_stand_in_and_the_callers_components(name):
    pipe = _pipeline(name)
    key = _denoiser_name(name)
    original = getattr(pipe, key)
    native = eekernels.accelerate(pipe, native=True)
    assert native.to(torch.bfloat16) is native
    stand_in = getattr(native, key)
    assert stand_in.dtype == torch.bfloat16 and native.dtype == torch.bfloat16
    assert {p.dtype for p in stand_in.parameters()} == {torch.bfloat16}
    others = [m for n, m in pipe.components.items() if n != key and isinstance(m, nn.Module)]
    assert len(others) == (name != "ddim") and all(m.dtype == torch.bfloat16 for m in others)  # the caller's VAE
    assert original.dtype == torch.float32  # the native tier does not modify the model passed to it
    got = _bf16_call(name, native)
    pipe.to(torch.bfloat16)  # the plain pipeline in bfloat16 (its denoiser: the original, now converted too)
    assert getattr(pipe, key) is original and original.dtype == torch.bfloat16
    want = _bf16_call(name, pipe)
    assert abs(got - want).max() < 0.1, f"{name}: native vs plain in bfloat16 {abs(got - want).max()}"
    assert native.to("cpu") is native and stand_in.device == torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# DiT: per-block embedders that differ
# --------------------------------------------------------------------------------------------------
def _sliced(model, d):
    m = copy.deepcopy(model)
    m.transformer_blocks = nn.ModuleList(list(m.transformer_blocks)[:d])
    return m


@torch.no_grad()
def test_dit_with_differing_per_block_embedders_equals_diffusers_at_every_depth():
    ref = _fresh_dit()
    copies = [b.norm1.emb.timestep_embedder.linear_1.weight for b in ref.transformer_blocks]
    assert not torch.equal(copies[0], copies[1])
    stand_in = eekernels.accelerate(ref, native=True)
    model = stand_in.model
    assert model.block_embedders and model.blocks[3].t_embedder is not None
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([3.0, 480.0, 999.0]), torch.tensor([1, 7, 1000])
    for d in range(1, 5):
        want = _sliced(ref, d)(x, t, class_labels=y).sample
        assert (model(x, t, y, depth=d) - want).abs().max() <= 1e-5 * want.abs().max(), d
    depth = torch.tensor([2, 4, 1])  # per-sample depth
    got = model(x, t, y, depth=depth)
    for i, d in enumerate(depth.tolist()):
        want = _sliced(ref, d)(x[i:i + 1], t[i:i + 1], class_labels=y[i:i + 1]).sample
        assert (got[i:i + 1] - want).abs().max() <= 1e-5 * want.abs().max()
    out = stand_in(x, t, class_labels=y).sample
    assert (out - ref(x, t, class_labels=y).sample).abs().max() <= 1e-5 * out.abs().max()
    back = stand_in.to_diffusers().state_dict()  # the per-block copies are written back per block
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    with pytest.raises(ValueError, match="per block.*facebookresearch layout"):
        model.checkpoint_state_dict()
    own = DiT.from_checkpoint(model.state_dict(), num_heads=2, freq_shift=1.0, mlp_norm_eps=1e-5)  # own layout
    assert own.block_embedders and torch.equal(own(x, t, y, depth=3), model(x, t, y, depth=3))


def test_dit_per_block_embedders_share_the_labels_dropped_in_training_and_are_embedders_for_the_trainer():
    from eekernels.training.trainer import role_prefixes

    model = DiT.from_diffusers(_fresh_dit(layers=3))
    t_roles = role_prefixes(model, "t-embedder")
    assert set(t_roles) == {"t_embedder.", "blocks.1.t_embedder.", "blocks.2.t_embedder."}
    assert "blocks.2.y_embedder." in role_prefixes(model, "embedders")
    model.train()
    for blk in model.blocks[1:]:  # every copy maps a label to the same row: a dropped label shows as the same row
        blk.y_embedder.embedding_table.weight.data.copy_(model.y_embedder.embedding_table.weight)
        blk.t_embedder.load_state_dict(model.t_embedder.state_dict())
    model.y_embedder.dropout_prob = 0.5
    torch.manual_seed(0)
    x, t, y = torch.randn(64, 4, 8, 8), torch.full((64,), 500.0), torch.randint(0, 1000, (64,))
    # the same weights with one shared embedder (the per-block keys left out): what sharing gives
    shared = DiT.from_checkpoint({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")
                                  or ("_embedder." not in k)}, num_heads=2, freq_shift=1.0, mlp_norm_eps=1e-5)
    assert not shared.block_embedders
    shared.train()
    shared.y_embedder.dropout_prob = 0.5
    torch.manual_seed(1)
    a = model(x, t, y)
    torch.manual_seed(1)
    b = shared(x, t, y)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)  # one draw of dropped labels for every copy


@torch.no_grad()
def test_dit_pipeline_with_a_fresh_transformer_runs_natively_and_saves_back(tmp_path):
    pipe = diffusers.DiTPipeline(_fresh_dit(), _pipeline("dit").vae, diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    plain = _call("dit", pipe)
    native = eekernels.accelerate(pipe, native=True)
    assert abs(_call("dit", native) - plain).max() < 1e-4
    native.save_pretrained(tmp_path)
    loaded = diffusers.DiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (_call("dit", loaded) == plain).all()


# --------------------------------------------------------------------------------------------------
# EarlyExitModel declares what the model declares
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_early_exit_model_declares_the_wrapped_models_attributes_and_sample_refuses_a_mismatch():
    from eekernels.models.flux import Flux

    flux = Flux.from_diffusers(_pipeline("flux").transformer)
    wrapped = eekernels.accelerate(flux)
    assert isinstance(wrapped, EarlyExitModel)
    for name in ("prediction", "condition", "token_dim", "pooled_dim", "condition_extras", "num_blocks", "min_depth"):
        assert getattr(wrapped, name) == getattr(flux, name), name
    noise = torch.randn(1, wrapped.in_channels, 4, 4)
    y = eekernels.TextCondition(torch.randn(1, 7, 12), None, torch.randn(1, 10), {"guidance": torch.full((1,), 3.0)})
    with pytest.raises(ValueError, match="EarlyExitModel.prediction is 'flow'"):
        eekernels.sample(wrapped, noise, y, sampler="ddim", steps=2)
    with pytest.raises(ValueError, match="y.tokens"):  # the declared token width is checked too
        eekernels.sample(wrapped, noise, eekernels.TextCondition(torch.randn(1, 7, 5), None, torch.randn(1, 10)),
                         sampler="flow_euler", steps=2)
