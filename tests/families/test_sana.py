"""Sana in place (issue 22): the harness checks and the diffusers operations on a tiny ``SanaPipeline``.

Tiny and random: 2 blocks, 8x8 latents (256 px with no VAE: the pipeline's default factor 32), 3 steps, CFG batched;
prompts as embeddings, no text encoder, no VAE (``output_type="latent"``). Every parameter is randomized.
"""
import pytest
import torch

import diffusers
from eekernels import ExitSchedule
from tests.families import operations
from tests.families.harness import CHECKS, Case, block_fraction, patched_equals_plain
from tests.models._reference_models import randomize_

T_TXT, D_TXT = 6, 12


def make_model(layers=2):
    m = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=layers,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=D_TXT,
        sample_size=8, patch_size=1)
    return randomize_(m).eval()


def scheduler(shift=3.0):
    """Sana's scheduler: DPM-Solver++ on flow sigmas."""
    return diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=shift)


def make_pipeline():
    """Flow shift 1 here, so that 3 steps (t = 999, 666, 333) fall in different bins of the harness's schedule."""
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=make_model(),
                                  scheduler=scheduler(1.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed):
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    emb, neg = (torch.randn(1, T_TXT, D_TXT, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(1, T_TXT, dtype=torch.long)
    return pipe(negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=mask, guidance_scale=3.0, height=256, width=256,
                num_inference_steps=3, use_resolution_binning=False, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, T_TXT, D_TXT, generator=g), timestep=torch.tensor([500, 500]),
                encoder_attention_mask=torch.ones(2, T_TXT))


CASE = Case(name="sana", make_pipeline=make_pipeline, call=call, make_model=make_model, inputs=inputs,
            lists=("transformer_blocks",))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_sana(check):
    check(CASE)


def test_sana_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_sana_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_sana_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_sana_to_dtype():
    operations.pipe_to_dtype(CASE)


@pytest.mark.parametrize("steps,want", [(20, 0.695), (50, 0.699)])
def test_sana_preset_block_fraction(steps, want):
    """"ase-sana" under Sana's default scheduler (flow shift 3; 20 steps, the pipeline's default)."""
    s = scheduler()
    s.set_timesteps(steps)
    assert abs(block_fraction("ase-sana", s.timesteps) - want) < 0.005
    assert ExitSchedule.preset("ase-sana", total_depth=28).total_depth == 28  # the 600M


def test_what_the_patches_replace_in_a_sana_transformer():
    """The caption projection's Linear + GELU(tanh) and the caption RMSNorm are replaced; the blocks' LayerNorms
    (modulated inside ``SanaTransformerBlock.forward``, which no rule sees) and the linear attention are not."""
    patched_equals_plain(CASE, {"text_projection_gelu_tanh": 1, "rms_norm": 1}, {"LayerNorm", "Attention", "GELU"})
