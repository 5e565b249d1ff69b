"""Qwen-Image in place (``QwenImagePipeline``, ``QwenImageEditPipeline``): the harness's checks and operations.

Tiny models, random weights, float32; the pipelines get ``prompt_embeds`` (and masks), so no text encoder is built
(``text_encoder=None``, ``tokenizer=None``, ``processor=None``). The Edit pipeline encodes its input image with a tiny
``AutoencoderKLQwenImage``; it resizes that image to about 1024 x 1024 pixels (``calculate_dimensions(1024 * 1024,
ratio)``, module level) before encoding, which would give the tiny transformer 16384 condition tokens, so its test
runs with that function answering a 32 x 32 area (the plain and the accelerated pipeline alike).
"""
import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, families, inplace
from tests.families import operations
from tests.families.harness import CHECKS, BlocksRan, Case
from tests.models._reference_models import randomize_
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

STEPS = 3
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift_terminal=0.02,
                 use_dynamic_shifting=True, time_shift_type="exponential")  # Qwen-Image's own scheduler config


def tiny_transformer(seed=0):
    m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(2, 2, 4))
    return randomize_(m, seed=seed).eval()


def tiny_vae():
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                           temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4)  # 4x down: 32 px are 4 x 4 packed tokens
    return randomize_(vae, seed=1).eval()


def make_pipeline():
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None,
                                       text_encoder=None, tokenizer=None, transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_edit_pipeline():
    pipe = diffusers.QwenImageEditPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                           vae=tiny_vae(), text_encoder=None, tokenizer=None, processor=None,
                                           transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(dtype, batch=1):
    """Prompt and negative-prompt embeddings with masks (the last token padded), as the pipeline's encoder gives."""
    g = torch.Generator().manual_seed(11)
    emb, neg = torch.randn(2, batch, 5, 16, generator=g).to(dtype)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[:, -1] = 0
    return dict(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_embeds_mask=mask.clone(), true_cfg_scale=2.0)


def call(pipe, seed, size=64, **kw):
    """Final latents of a 3-step run with true CFG (two calls per step): 64 px are 4 x 4 packed image tokens without
    a VAE (the pipeline's default scale factor 8)."""
    out = pipe(**embeddings(pipe.transformer.dtype), height=size, width=size, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **kw)
    return out.images


def inputs(seed):
    g = torch.Generator().manual_seed(100 + seed)
    mask = torch.ones(1, 5, dtype=torch.long)
    mask[:, -1] = 0
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=g), encoder_hidden_states_mask=mask,
                timestep=torch.tensor([0.3 + 0.2 * seed]), img_shapes=[[(1, 4, 4)]], return_dict=False)


CASE = Case(name="qwenimage", make_pipeline=make_pipeline, call=call, make_model=tiny_transformer, inputs=inputs,
            lists=("transformer_blocks",), image_stream=lambda out: out[1])


@pytest.fixture
def small_edit_area(monkeypatch):
    """The Edit pipeline's input image resized to 32 x 32 px (not about 1024 x 1024), for a test of seconds."""
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))


def edit_call(pipe, seed):
    """The Edit pipeline at 32 px (4 x 4 target tokens) with a 40 x 24 input image (4 x 4 condition tokens)."""
    return call(pipe, seed, size=32, image=_edit_image())


def _edit_image():
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(24, 40, 3, generator=g) * 255).to(torch.uint8).numpy())


EDIT = Case(name="qwenimage-edit", make_pipeline=make_edit_pipeline, call=edit_call, make_model=tiny_transformer,
            inputs=inputs, lists=("transformer_blocks",), image_stream=lambda out: out[1],
            slow_checks=("model_cpu_offload",))  # 124 s on the 2-core CPU


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_qwenimage(check):
    check(CASE)


def test_qwenimage_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_qwenimage_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_qwenimage_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_qwenimage_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_edit_pipeline_full_depth_and_schedule(small_edit_area):
    """The Edit pipeline (input image through the tiny VAE, its tokens after the target's in the image stream):
    full depth bit-identical to the plain pipeline, each call running the first blocks of its depth, some fewer than
    all."""
    want = edit_call(make_edit_pipeline(), 3)
    pipe, model = operations._accelerated(EDIT)
    operations._check(EDIT, pipe, model, want, "edit pipeline")


def test_edit_pipeline_the_condition_tokens_ride_in_the_image_stream(small_edit_area):
    """At depth d the Edit pipeline's model call equals the plain model with its blocks cut to d (the condition
    image's latents included), and its output keeps the target's tokens only."""
    pipe = make_edit_pipeline()
    seen = []
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    eekernels.accelerate(pipe)
    with inplace.at_depth(pipe.transformer, 1):
        edit_call(pipe, 3)
    kw, got = seen[0]
    assert kw["hidden_states"].shape[1] == 2 * 16 and len(kw["img_shapes"][0]) == 2  # target + condition tokens
    eekernels.disable(pipe)
    cut = tiny_transformer()
    cut.transformer_blocks = cut.transformer_blocks[:1]
    with torch.no_grad():
        want = cut(**kw)[0]
    assert torch.equal(got, want)


def test_the_preset_is_qwen_images_and_about_seven_tenths_of_the_blocks():
    """``ase-qwenimage`` (in sigma, the scheduler's own t = sigma * 1000): 60 blocks, about 0.7 of them per call
    over the pipeline's default 50 steps at 1024 px (4096 image tokens), with fewer blocks toward the noise."""
    import numpy as np

    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    schedule = ExitSchedule.preset("ase-qwenimage")
    assert schedule.total_depth == 60
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=calculate_shift(4096, 256, 8192, 0.5, 0.9))
    plan = schedule.plan(sched.timesteps.to(torch.float64))
    assert 0.69 <= float(plan.double().mean()) / 60 <= 0.72
    assert plan[0] < plan[-1] == 60 and bool((plan[1:] >= plan[:-1]).all())
    pipe = make_pipeline()
    eekernels.accelerate(pipe, schedule=ExitSchedule.preset("ase-qwenimage", 3))  # rescaled to the tiny model
    ran = BlocksRan(CASE, pipe.transformer)
    call(pipe, 3)
    plan = schedule.rescaled(3).plan(pipe.scheduler.timesteps.to(torch.float64)).tolist()
    assert ran.depths() == [d for d in plan for _ in range(2)]  # two calls per step (true CFG)
    assert plan[0] < plan[-1] == 3  # deeper toward the data


def test_patched_modules_are_listed():
    """What eekernels' fused ops replace in a Qwen-Image transformer (they run on CUDA; on the CPU the modules' own
    forwards run)."""
    model = tiny_transformer()
    eekernels.accelerate(model)
    counts = inplace.controller(model).patches.counts()
    # txt_norm and four QK norms per block; both feed-forwards per block; norm_out
    assert counts == {"rms_norm": 13, "linear_gelu_tanh": 6, "ada_layer_norm_continuous": 1}, counts
    eekernels.disable(model)


def test_the_family_table_names_both_pipelines():
    fam = families.get("qwenimage")
    assert fam.denoisers(make_pipeline()) == ("transformer",)
    assert fam.denoisers(make_edit_pipeline()) == ("transformer",)
