"""HunyuanVideo 1.5 in place (issue 22): the harness checks and the diffusers operations on a tiny
``HunyuanVideo15Pipeline``.

Tiny and random: 2 blocks, 2 latent frames of 4x4 (3 video frames at 16 px), classifier-free guidance as
diffusers' guider runs it (cond and uncond as two calls, each in its ``cache_context``); prompts as embeddings (both
text encoders' outputs), no text encoder. The pipeline's 729 image tokens are cut to 4 on the instance before each
call (a plain attribute; every pipeline compared gets the same). Every parameter is randomized.
"""
import numpy as np
import pytest
import torch

import diffusers
import eekernels
from diffusers.guiders import ClassifierFreeGuidance
from eekernels import inplace
from tests.families import operations
from tests.families.harness import CHECKS, Case, block_fraction, compile_one_graph_per_depth, results
from tests.models._reference_models import randomize_

L1, D1, L2, D2, IMG = 5, 16, 3, 32, 12


def make_model(layers=2):
    m = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=D1, text_embed_2_dim=D2,
        image_embed_dim=IMG, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    return randomize_(m).eval()


def make_vae():
    vae = diffusers.AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False)
    return randomize_(vae, seed=1).eval()


def make_pipeline():
    pipe = diffusers.HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=make_model(), vae=make_vae(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text(g, dtype):
    mask = torch.ones(1, L1)
    mask[0, L1 - 1:] = 0  # padding in the caption
    return dict(prompt_embeds=torch.randn(1, L1, D1, generator=g).to(dtype), prompt_embeds_mask=mask,
                prompt_embeds_2=torch.randn(1, L2, D2, generator=g).to(dtype), prompt_embeds_mask_2=torch.ones(1, L2))


def call(pipe, seed):
    pipe.vision_num_semantic_tokens = 4
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    pos, neg = _text(g, dtype), _text(g, dtype)
    return pipe(**pos, **{f"negative_{k}": v for k, v in neg.items()}, height=16, width=16, num_frames=3,
                num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, L1)
    mask[1, 3:] = 0
    return dict(hidden_states=torch.randn(2, 9, 2, 4, 4, generator=g), timestep=torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, L1, D1, generator=g), encoder_attention_mask=mask,
                encoder_hidden_states_2=torch.randn(2, L2, D2, generator=g), encoder_attention_mask_2=torch.ones(2, L2),
                image_embeds=torch.zeros(2, 4, IMG))


CASE = Case(name="hunyuanvideo15", make_pipeline=make_pipeline, call=call, make_model=make_model, inputs=inputs,
            lists=("transformer_blocks",), image_stream=lambda out: out[0])


@pytest.mark.parametrize("check", [c for c in CHECKS if c is not compile_one_graph_per_depth],
                         ids=lambda c: c.__name__)
def test_hunyuanvideo15(check):
    check(CASE)


def test_hunyuanvideo15_whole_model_does_not_compile_fullgraph_in_diffusers_itself():
    """diffusers' forward branches on ``torch.all(image_embeds == 0)`` and indexes the text tokens with boolean
    masks: the plain model has no full graph (so the harness's one-graph-per-depth check does not apply; diffusers
    compiles this model by regions, below). When this fails, diffusers has fixed it: add that check."""
    torch._dynamo.reset()
    with pytest.raises(Exception, match="Data-dependent branching"), torch.no_grad():
        torch.compile(make_model(), fullgraph=True, backend="aot_eager")(**inputs(0))


def test_hunyuanvideo15_regional_compile_fullgraph():
    """diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``, its ``_repeated_blocks``) on the
    accelerated model: every depth gives the eager output, no graph break. With ``kernels=False``: the patched
    submodules' own hooks are guarded per block instance, which exceeds dynamo's recompile limit."""
    from torch._dynamo.utils import counters

    kw = inputs(0)
    model = make_model()
    eekernels.accelerate(model, kernels=False)
    eager = {}
    for d in (2, 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            eager[d] = results(CASE, model(**kw))
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    for _ in range(2):
        for d in (2, 1):
            with torch.no_grad(), inplace.at_depth(model, d):
                got = results(CASE, model(**kw))
            assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, eager[d]))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_hunyuanvideo15_preset_runs_about_0_7_of_the_blocks():
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    s.set_timesteps(sigmas=np.linspace(1.0, 0.0, 51)[:-1])  # the pipeline's own sigmas, 50 steps
    assert 0.69 <= block_fraction("ase-hunyuanvideo15", s.timesteps) <= 0.73


def test_hunyuanvideo15_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_hunyuanvideo15_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_hunyuanvideo15_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_hunyuanvideo15_pipeline_has_no_lora_loader():
    """diffusers 0.42's HunyuanVideo 1.5 pipelines have no ``load_lora_weights`` (its model takes peft adapters:
    ``test_hunyuanvideo15_add_adapter``)."""
    assert operations.lacks(make_pipeline(), "load_lora_weights")


def test_hunyuanvideo15_add_adapter():
    operations.add_adapter(CASE)
