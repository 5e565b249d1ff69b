"""Cosmos in place (issue 22): the harness checks and the diffusers operations on a tiny ``CosmosTextToWorldPipeline``
(Cosmos 1.0: EDM Euler), and the pipeline checks on a tiny ``Cosmos2TextToImagePipeline`` (Predict2: Karras flow
sigmas).

Tiny and random: 2 blocks, 2 latent frames of 8x8 (9 video frames at 64 px), 3 steps, CFG as these pipelines run
it: cond and uncond as two model calls per step, neither in a ``cache_context`` (the exit cache keeps one per call
of the step). Prompts as embeddings, no text encoder, no VAE (``output_type="latent"``). The Cosmos guardrail is a
stand-in that passes everything (the real one is a large model; these pipelines refuse to run without one).
``concat_padding_mask=False``: diffusers resizes the padding mask with torchvision, which this environment lacks.
Every parameter is randomized.
"""
import dataclasses
import functools

import pytest
import torch

import diffusers
import eekernels
from diffusers import ConfigMixin, ModelMixin
from eekernels import ExitSchedule, inplace
from tests.families import operations
from tests.families.harness import (CHECKS, Case, block_fraction, calibrates_on_the_pipeline,
                                    full_depth_is_bit_identical, record_depths, schedule_depth_per_step)
from tests.models._reference_models import randomize_

T_TXT, D_TXT = 5, 12


class PassingGuardrail(ModelMixin, ConfigMixin):
    """Stands in for ``CosmosSafetyChecker`` (cosmos_guardrail): every text and video is safe."""

    def __init__(self):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))  # diffusers reads a component's device from its tensors

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video


def make_model(layers=2, in_channels=4, out_channels=4):
    m = diffusers.CosmosTransformer3DModel(
        in_channels=in_channels, out_channels=out_channels, num_attention_heads=2, attention_head_dim=16,
        num_layers=layers, mlp_ratio=2, text_embed_dim=D_TXT, adaln_lora_dim=4, max_size=(4, 16, 16),
        patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")
    return randomize_(m).eval()


def make_pipeline():
    scheduler = diffusers.EDMEulerScheduler(sigma_max=80.0, sigma_min=0.002, sigma_data=0.5,
                                            final_sigmas_type="sigma_min")
    pipe = diffusers.CosmosTextToWorldPipeline(text_encoder=None, tokenizer=None, transformer=make_model(), vae=None,
                                               scheduler=scheduler, safety_checker=PassingGuardrail())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, T_TXT, D_TXT, generator=g).to(dtype) for _ in range(2)]


def call(pipe, seed):
    emb, neg = _embeds(pipe.transformer.dtype)
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=3.0, height=64, width=64, num_frames=9,
                num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([0.5, 0.5]),
                encoder_hidden_states=torch.randn(2, T_TXT, D_TXT, generator=g), fps=30)


CASE = Case(name="cosmos", make_pipeline=make_pipeline, call=call, make_model=make_model, inputs=inputs,
            lists=("transformer_blocks",), extra={"load_kwargs": {"safety_checker": PassingGuardrail()}})


def make_pipeline2():
    pipe = diffusers.Cosmos2TextToImagePipeline(
        text_encoder=None, tokenizer=None, transformer=make_model(), vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), safety_checker=PassingGuardrail())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call2(pipe, seed):
    emb, neg = _embeds(pipe.transformer.dtype)
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=3.0, height=64, width=64,
                num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


CASE2 = Case(name="cosmos2", make_pipeline=make_pipeline2, call=call2, make_model=make_model, inputs=inputs,
             lists=("transformer_blocks",))


def make_v2w_pipeline():
    """Cosmos 1.0 video-to-world: the model takes the condition mask as a fifth channel."""
    vae = diffusers.AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64, num_layers=2, patch_size=4,
        patch_type="haar", scaling_factor=1.0, spatial_compression_ratio=4, temporal_compression_ratio=4)
    scheduler = diffusers.EDMEulerScheduler(sigma_max=80.0, sigma_min=0.002, sigma_data=0.5,
                                            final_sigmas_type="sigma_min")
    pipe = diffusers.CosmosVideoToWorldPipeline(
        text_encoder=None, tokenizer=None, transformer=make_model(in_channels=5), vae=randomize_(vae, seed=1).eval(),
        scheduler=scheduler, safety_checker=PassingGuardrail())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_v2w_pipeline2():
    """Predict2 video-to-world (Wan VAE, 16 latent channels and the condition mask)."""
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    pipe = diffusers.Cosmos2VideoToWorldPipeline(
        text_encoder=None, tokenizer=None, transformer=make_model(in_channels=17, out_channels=16),
        vae=randomize_(vae, seed=1).eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=PassingGuardrail())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_v2w(pipe, seed, size=32):
    emb, neg = _embeds(pipe.transformer.dtype)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    return pipe(image=image, prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=3.0, height=size,
                width=size, num_frames=9, num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


V2W = {"cosmos-v2w": (make_v2w_pipeline, call_v2w),
       "cosmos2-v2w": (make_v2w_pipeline2, functools.partial(call_v2w, size=64))}


@pytest.mark.parametrize("check", [c for c in CHECKS if c is not calibrates_on_the_pipeline],
                         ids=lambda c: c.__name__)
def test_cosmos(check):
    check(CASE)


def test_cosmos1_calibrate_is_refused_by_name():
    """Cosmos 1.0's loop steps its scheduler twice per step (x0, then the guided step) and rewinds ``_step_index``
    between: calibrate's one-step-per-step replay of the scheduler does not apply, and it says so (the Predict2
    pipeline calibrates: ``test_cosmos2_text_to_image``)."""
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="stepped twice at step index .* cannot calibrate this pipeline"):
        eekernels.calibrate(pipe, inputs=[lambda p: call(p, 0)], budget=0.7)
    assert inplace.controller(pipe.transformer) is None and "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize("check", [full_depth_is_bit_identical, schedule_depth_per_step, calibrates_on_the_pipeline],
                         ids=lambda c: c.__name__)
def test_cosmos2_text_to_image(check):
    check(CASE2)


@pytest.mark.parametrize("check", [full_depth_is_bit_identical, schedule_depth_per_step], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", sorted(V2W))
def test_cosmos_video_to_world(name, check):
    """Both video-to-world pipelines: one conditioning image (the first latent frame, its own timestep)."""
    make, run = V2W[name]
    check(dataclasses.replace(CASE, name=name, make_pipeline=make, call=run))


@pytest.mark.parametrize("make, steps", [(make_pipeline, 3), (make_pipeline2, 3)], ids=["cosmos1", "cosmos2"])
def test_cosmos_steps_are_in_flow_t_in_the_loop_and_in_plan(make, steps):
    """Each step's depth is read at t = 1000 * sigma / (1 + sigma) of the step's EDM sigma, not at the scheduler's
    timestep (0.25 * log(sigma) for Cosmos 1.0, sigma * 1000 for Predict2); ``inplace.plan`` reports those t and
    depths."""
    pipe = make()
    table = [1, 2, 2, 2, 2, 2, 2, 1, 2, 2]  # t near 715 (sigma 2.5) runs 1 block; 80000 or 2515 would run 2
    eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise(table, total_depth=2))
    seen = record_depths(pipe.transformer, with_t=True)
    (call if make is make_pipeline else call2)(pipe, 3)
    sigma = pipe.scheduler.sigmas[:steps].double()
    t = (1000 * sigma / (1 + sigma)).tolist()
    want = [table[min(9, int(x // 100))] for x in t]
    assert [d for _, d in seen] == [d for d in want for _ in range(2)], (seen, want, t)
    assert [x for x, _ in seen] == pytest.approx([x for x in t for _ in range(2)]), (seen, t)
    planned = [(p.t, p.depth) for p in inplace.plan(pipe)]
    assert [p for p in planned for _ in range(2)] == seen, (planned, seen)


def test_cosmos_cache_keeps_cond_and_uncond_apart():
    """The two unnamed calls of a step (cond, then uncond) each replay their own residual: the pipeline under the
    cache policy equals a run where each call kind's residual is recorded and replayed by hand."""
    pipe = make_pipeline()
    model = pipe.transformer
    eekernels.accelerate(pipe, schedule=ExitSchedule.periodic(2, 1, 2), exit_policy="cache")
    ctl = inplace.controller(model)
    kinds = [ctl._caches.get(("call", 0)), ctl._caches.get(("call", 1))]
    assert kinds == [None, None]
    call(pipe, 3)
    c0, c1 = ctl._caches[("call", 0)][0], ctl._caches[("call", 1)][0]
    assert c0 is not c1 and not torch.equal(c0.load(1), c1.load(1))


def test_a_family_step_t_is_a_function():
    from eekernels.families import Family, PrefixExit

    with pytest.raises(ValueError, match="`step_t` expected a function of the pipeline, got 1000"):
        Family(name="bad-step-t", classes=("diffusers:CosmosTransformer3DModel",),
               exit=PrefixExit(blocks=("transformer_blocks",)), step_t=1000)


def test_cosmos_preset_runs_about_0_7_of_the_blocks():
    edm = diffusers.EDMEulerScheduler(sigma_max=80.0, sigma_min=0.002, sigma_data=0.5, final_sigmas_type="sigma_min")
    edm.set_timesteps(36)  # Cosmos 1.0's default steps
    flow = make_pipeline2().scheduler  # Predict2's, with the sigma range its pipeline registers
    flow.set_timesteps(sigmas=torch.linspace(0, 1, 35).numpy())  # its pipeline's 35 default steps
    for sched, n in ((edm, 36), (flow, 35)):
        sigma = sched.sigmas[:n].double()
        assert 0.68 <= block_fraction("ase-cosmos", 1000 * sigma / (1 + sigma)) <= 0.72


def test_cosmos_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_cosmos_pipeline_has_no_lora_loader():
    """diffusers 0.42's Cosmos 1.0 and Predict2 pipelines have no ``load_lora_weights``; the model takes peft
    adapters (``test_cosmos_add_adapter``)."""
    assert operations.lacks(make_pipeline(), "load_lora_weights") and operations.lacks(make_pipeline2(),
                                                                                        "load_lora_weights")


def test_cosmos_add_adapter():
    operations.add_adapter(CASE)


def test_cosmos_model_has_no_set_attn_processor():
    """diffusers 0.42's ``CosmosTransformer3DModel`` has no ``AttentionMixin`` (no ``set_attn_processor``)."""
    assert operations.lacks(make_model(), "set_attn_processor", "attn_processors")


def test_cosmos_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_step_t_in_a_loop_over_the_progress_bar():
    """``Family.step_t`` where the pipeline iterates ``self.progress_bar(timesteps)`` (DiT's loop): the depth of each
    step is read at the family's t, and the pipeline still gets its own timesteps (its images are unchanged at full
    depth)."""
    from eekernels import families
    from eekernels.families import Family, PrefixExit
    from tests.test_accelerate import dit_pipeline

    plain = dit_pipeline()
    want = plain(class_labels=[1], num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    families.families()  # the built-in table first: the last registration matching a pipeline wins
    fam = families.register(Family(name="dit-step-t", classes=("diffusers:DiTTransformer2DModel",),
                                   pipelines={"diffusers:DiTPipeline": ("transformer",)},
                                   exit=PrefixExit(blocks=("transformer_blocks",)),
                                   step_t=lambda pipe: [950.0, 50.0, 950.0]))
    try:
        pipe = dit_pipeline()
        eekernels.accelerate(pipe)
        got = pipe(class_labels=[1], num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert (got == want).all()
        eekernels.disable(pipe)
        total = len(pipe.transformer.transformer_blocks)
        eekernels.accelerate(pipe, schedule=ExitSchedule.piecewise([total] + [1] * 9, total_depth=total))
        seen = record_depths(pipe.transformer)
        pipe(class_labels=[1], num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
        per_step = len(seen) // 3
        assert seen == [d for d in (1, total, 1) for _ in range(per_step)], seen
    finally:
        families.unregister(fam.name)
