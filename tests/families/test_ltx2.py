"""LTX-2 in place (issue 22): the harness checks and the diffusers operations on a tiny ``LTX2Pipeline``.

Tiny and random: 2 blocks, video latents of 2 frames of 8x8 and audio latents of 5 frames (given to the pipeline,
drawn from the seed), 3 steps with the pipeline's default guidance: CFG batched ("cond_uncond"), spatio-temporal
guidance on block 1 ("uncond_stg") and modality isolation ("uncond_modality"), three model calls per step, each in
its ``cache_context``. Prompts as embeddings through the pipeline's own (tiny) text connectors, no text encoder.
The pipeline's output compared is the video and the audio latents together. Every parameter is randomized.
"""
import dataclasses

import numpy as np
import pytest
import torch

import diffusers
import eekernels
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from tests.families import operations
from tests.families.harness import CHECKS, Case, block_fraction, full_depth_is_bit_identical, schedule_depth_per_step
from tests.models._reference_models import randomize_

CAPTION, FACTOR, TXT = 16, 3, 6  # caption width, text-encoder layers the connectors mix, prompt tokens


def make_model(layers=2):
    m = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=layers, caption_channels=CAPTION,
        rope_double_precision=False, rope_type="split")
    return randomize_(m).eval()


def make_pipeline():
    connectors = LTX2TextConnectors(
        caption_channels=CAPTION, text_proj_in_factor=FACTOR, video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=4, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=4, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_double_precision=False,
        rope_type="split")
    vae = diffusers.AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False)
    audio_vae = diffusers.AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", mid_block_add_attention=False,
        mel_bins=8)
    pipe = diffusers.LTX2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), audio_vae=audio_vae.eval(),
        text_encoder=None, tokenizer=None, connectors=randomize_(connectors, seed=1).eval(), transformer=make_model(),
        vocoder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_i2v_pipeline():
    pipe = diffusers.LTX2ImageToVideoPipeline(**make_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_condition_pipeline():
    pipe = diffusers.LTX2ConditionPipeline(**make_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed, **extra):
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    pos, neg = (torch.randn(1, TXT, CAPTION * FACTOR, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(1, TXT)
    mask[0, :2] = 0  # left padding, as the Gemma tokenizer pads
    g = torch.Generator().manual_seed(seed)
    out = pipe(prompt_embeds=pos, prompt_attention_mask=mask, negative_prompt_embeds=neg,
               negative_prompt_attention_mask=mask, height=32, width=32, num_frames=5, frame_rate=25.0,
               audio_latents=torch.randn(1, 2, 5, 2, generator=g), num_inference_steps=3,
               spatio_temporal_guidance_blocks=[1], output_type="latent", generator=g, **extra)
    return torch.cat([out.frames.flatten(), out.audio.flatten()])


def call_t2v(pipe, seed):
    return call(pipe, seed, latents=torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(seed + 1)))


def call_i2v(pipe, seed):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return call(pipe, seed, image=image, image_crf=0)


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, TXT)
    mask[1, :2] = 0
    return dict(hidden_states=torch.randn(2, 2 * 8 * 8, 4, generator=g),
                audio_hidden_states=torch.randn(2, 5, 4, generator=g),
                encoder_hidden_states=torch.randn(2, TXT, CAPTION, generator=g),
                audio_encoder_hidden_states=torch.randn(2, TXT, CAPTION, generator=g),
                timestep=torch.tensor([500.0, 500.0]), encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                num_frames=2, height=8, width=8, fps=25.0, audio_num_frames=5)


CASE = Case(name="ltx2", make_pipeline=make_pipeline, call=call_t2v, make_model=make_model, inputs=inputs,
            lists=("transformer_blocks",), image_stream=lambda out: out[0],
            outputs=lambda o: (o.sample, o.audio_sample), second=("audio_hidden_states", lambda out: out[1]))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_ltx2(check):
    check(CASE)


def call_condition(pipe, seed):
    from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition

    frame = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return call(pipe, seed, conditions=[LTX2VideoCondition(frames=frame, index=0, strength=1.0, crf=0)])


@pytest.mark.parametrize("check", [full_depth_is_bit_identical, schedule_depth_per_step], ids=lambda c: c.__name__)
def test_ltx2_condition(check):
    """``LTX2ConditionPipeline`` with one conditioning frame at index 0."""
    check(dataclasses.replace(CASE, name="ltx2-condition", make_pipeline=make_condition_pipeline, call=call_condition))


@pytest.mark.parametrize("check", [full_depth_is_bit_identical, schedule_depth_per_step], ids=lambda c: c.__name__)
def test_ltx2_image_to_video(check):
    """``LTX2ImageToVideoPipeline``: the first latent frame is the encoded image (its per-token timestep is 0)."""
    check(dataclasses.replace(CASE, name="ltx2-i2v", make_pipeline=make_i2v_pipeline, call=call_i2v))


def test_ltx2_preset_runs_about_0_7_of_the_blocks():
    """LTX-2's usual run: 30 (the pipeline's default) or 40 steps at 768x512, 121 frames (16 x 16 x 24 = 6144
    latent tokens), its scheduler's exponential resolution-dependent shift (as the pipeline computes mu) with
    shift_terminal 0.1."""
    for steps in (30, 40):
        s = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
            max_image_seq_len=4096, shift_terminal=0.1, time_shift_type="exponential")
        mu = diffusers.pipelines.ltx2.pipeline_ltx2.calculate_shift(6144, 1024, 4096, 0.95, 2.05)
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert 0.69 <= block_fraction("ase-ltx2", s.timesteps) <= 0.74
    assert min(eekernels.ExitSchedule.preset("ase-ltx2").table) > 28  # the default STG block (28) always runs


def test_ltx2_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_ltx2_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_ltx2_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_ltx2_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_two_output_streams_are_declared_only_for_blocks_that_return_two():
    """``PrefixExit(out_streams=2)`` (LTX-2's video and audio) on blocks that return one tensor is refused by name,
    before any call; ``out_streams`` other than 1 or 2 is refused when the rule is written."""
    from eekernels import families
    from eekernels.families import Family, PrefixExit
    from tests.test_families import ToyModel

    with pytest.raises(ValueError, match="`out_streams` expected 1 or 2, got 3"):
        PrefixExit(blocks=("early",), out_streams=3)
    # `early` declared as two streams, `late` as one: refused at `late`, with no hook left on `early`'s blocks
    fam = families.register(Family(name="toy-two-outputs", classes=(ToyModel,),
                                   exit=PrefixExit(blocks=("early", "late"),
                                                   streams={"early": (0, 1, "x", "c"), "late": (0, None, "x", None)},
                                                   out_streams=2)))
    try:
        model = ToyModel()
        with pytest.raises(ValueError, match=r"`out_streams=2`\), but ToyBlock in `late` returns one"):
            eekernels.accelerate(model)
        assert eekernels.inplace.controller(model) is None
        for block in model.early:
            registry = getattr(block, "_diffusers_hook", None)
            assert registry is None or "eekernels_exit_block" not in registry.hooks
    finally:
        families.unregister(fam.name)
