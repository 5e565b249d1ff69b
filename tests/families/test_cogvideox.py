"""CogVideoX in place (issue 22): the harness checks and the diffusers operations on a tiny ``CogVideoXPipeline``.

Tiny and random: 2 blocks, 3 latent frames of 8x8 (9 video frames at 64 px), 3 steps, CFG batched; prompts as
embeddings, no text encoder, no VAE (``output_type="latent"``). Every parameter is randomized.
"""
import pytest
import torch

import diffusers
from tests.families import operations
from tests.families.harness import CHECKS, Case
from tests.models._reference_models import randomize_

T_TXT, D_TXT = 7, 12


def make_model(layers=2):
    m = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=D_TXT, num_layers=layers, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=T_TXT, use_rotary_positional_embeddings=True)
    return randomize_(m).eval()


def make_pipeline():
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=make_model(),
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed):
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    emb, neg = (torch.randn(1, T_TXT, D_TXT, generator=g).to(dtype) for _ in range(2))
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=3.0, num_frames=9, height=64,
                width=64, num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    rope = make_pipeline()._prepare_rotary_positional_embeddings(64, 64, 3, "cpu")
    return dict(hidden_states=torch.randn(2, 3, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, T_TXT, D_TXT, generator=g), timestep=torch.tensor([500, 500]),
                image_rotary_emb=rope)


CASE = Case(name="cogvideox", make_pipeline=make_pipeline, call=call, make_model=make_model, inputs=inputs,
            lists=("transformer_blocks",), image_stream=lambda out: out[0])


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_cogvideox(check):
    check(CASE)


def test_cogvideox_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_cogvideox_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_cogvideox_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_cogvideox_to_dtype():
    operations.pipe_to_dtype(CASE)
