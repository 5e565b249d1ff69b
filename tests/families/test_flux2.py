"""FLUX.2 in place (``Flux2Transformer2DModel``; ``Flux2Pipeline``, ``Flux2KleinPipeline``): the harness checks, the
cache policy at an exit in either block list (the single blocks' stream is ``[text; image]``), the preset's share
of the blocks, the diffusers operations the pipelines support, the patched modules, and the refused KV pipeline.
Tiny random models (2 double + 2 single blocks, 4x4 latent tokens); prompts given as embeddings: no text encoder
is built."""
import numpy as np
import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, families
from eekernels.families import Family, PrefixExit
from tests.families import operations
from tests.families.harness import CHECKS, Case, cache_equals_replay, full_depth_is_bit_identical, \
    schedule_depth_per_step
from tests.models._reference_models import randomize_

L_TXT, DIM_TXT = 5, 12
LISTS = ("transformer_blocks", "single_transformer_blocks")


def tiny_transformer(seed=0, guidance=True):
    m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=DIM_TXT,
                                          timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                          guidance_embeds=guidance)
    return randomize_(m, seed=seed).eval()


def tiny_vae():
    vae = diffusers.AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                       up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                       layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=8,
                                       use_quant_conv=False, use_post_quant_conv=False)
    return randomize_(vae, seed=1).eval()


def make_pipeline(kind="flux2"):
    parts = dict(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
                 tokenizer=None)
    if kind == "klein":  # klein base: no guidance embedding, classifier-free guidance (two calls per step)
        pipe = diffusers.Flux2KleinPipeline(**parts, transformer=tiny_transformer(guidance=False), is_distilled=False)
    elif kind == "inpaint":  # klein's inpainting: two calls per step too
        pipe = diffusers.Flux2KleinInpaintPipeline(**parts, transformer=tiny_transformer(guidance=False))
    elif kind == "kv":
        pipe = diffusers.Flux2KleinKVPipeline(**parts, transformer=tiny_transformer(guidance=False))
    else:
        pipe = diffusers.Flux2Pipeline(**parts, transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(pipe, B=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    kw = dict(prompt_embeds=torch.randn(B, L_TXT, DIM_TXT, generator=g).to(dtype))
    if isinstance(pipe, (diffusers.Flux2KleinPipeline, diffusers.Flux2KleinInpaintPipeline)):
        kw["negative_prompt_embeds"] = torch.randn(B, L_TXT, DIM_TXT, generator=g).to(dtype)
    return kw


def run(pipe, seed=3, **extra):
    """Prompt embeddings in the transformer's dtype (as its text encoder would give them)."""
    kw = dict(_embeds(pipe, dtype=pipe.transformer.dtype), height=8, width=8, num_inference_steps=3,
              guidance_scale=4.0, output_type="latent")
    if isinstance(pipe, diffusers.Flux2KleinInpaintPipeline):  # strength 0.8 of 4 steps: 3 steps run
        g = torch.Generator().manual_seed(5)
        mask = torch.zeros(2, 1, 8, 8)
        mask[..., 4:] = 1.0
        kw.update(image=torch.rand(2, 3, 8, 8, generator=g), mask_image=mask, strength=0.8, num_inference_steps=4)
    return pipe(generator=torch.Generator().manual_seed(seed), **{**kw, **extra}).images


def inputs(seed, B=2, N=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                     indexing="ij"), -1).reshape(N, 4)
    return dict(hidden_states=torch.randn(B, N, 16, generator=g),
                encoder_hidden_states=torch.randn(B, L_TXT, DIM_TXT, generator=g),
                timestep=torch.full((B,), 0.55), img_ids=ids, txt_ids=torch.zeros(L_TXT, 4),
                guidance=torch.full((B,), 3.0))


CASES = {kind: Case(name=kind, make_pipeline=lambda kind=kind: make_pipeline(kind), call=run,
                    make_model=tiny_transformer, inputs=inputs, lists=LISTS,
                    image_stream=lambda out: out[1] if isinstance(out, tuple) else out,  # (text, image) / joint
                    image_part=lambda joint, n: joint[:, -n:])  # [text; image]: the image tokens are last
         for kind in ("flux2", "klein", "inpaint")}
CASE = CASES["flux2"]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_flux2(check):
    check(CASE)


@pytest.mark.parametrize("check", (full_depth_is_bit_identical, schedule_depth_per_step), ids=lambda c: c.__name__)
def test_klein(check):
    check(CASES["klein"])


@pytest.mark.parametrize("check", (full_depth_is_bit_identical, schedule_depth_per_step), ids=lambda c: c.__name__)
def test_klein_inpaint(check):
    check(CASES["inpaint"])


def test_cache_policy_at_a_double_block_exit_takes_the_residual_on_the_image_tokens():
    """Exit after the first double block: the residual is the last single block's image tokens (its stream is
    [text; image]) minus the exit block's image stream."""
    cache_equals_replay(CASE, d=1)


def test_a_joint_stream_without_its_declaration_is_refused_by_name():
    """The same family without ``PrefixExit.joint``: the cache policy cannot line the streams up and says so."""
    fam = families.get("flux2")
    families.register(Family(name="flux2-undeclared", classes=fam.classes, timestep_scale=1000.0,
                             exit=PrefixExit(blocks=LISTS)))
    try:
        model = tiny_transformer()
        eekernels.accelerate(model, schedule=ExitSchedule.periodic(2, 1, 4), exit_policy="cache")
        with torch.no_grad(), pytest.raises(ValueError, match=r"needs `PrefixExit\(joint="):
            model(**inputs(1))
    finally:
        families.unregister("flux2-undeclared")


def test_a_joint_order_other_than_text_first_or_image_first_is_refused_by_name():
    with pytest.raises(ValueError, match=r"`joint` expected values in \('text-first', 'image-first'\), got "
                                         r"\{'single_transformer_blocks': 'last'\}"):
        PrefixExit(blocks=LISTS, joint={"single_transformer_blocks": "last"})


def test_the_preset_runs_about_0_7_of_the_blocks_at_the_pipeline_default():
    """FLUX.2 dev's default: 50 steps, 1024 px (4096 tokens: the pipeline's empirical mu), dynamic shifting. Double
    and single blocks cost the same FLOPs, so the share of blocks is the share of block FLOPs."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    steps = 50
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(4096, steps))
    preset = ExitSchedule.preset("ase-flux2")
    depths = preset.plan(sched.timesteps.double())
    assert preset.total_depth == 56 and abs(depths.double().mean().item() / 56 - 0.70) < 0.01
    assert ExitSchedule.preset("ase-flux2", total_depth=25).total_depth == 25  # klein 4B: 5 + 20 blocks


def test_the_kv_pipeline_is_refused_by_name():
    with pytest.raises(TypeError, match="Flux2KleinKVPipeline .* cannot run early exit in place: its first step"):
        eekernels.accelerate(make_pipeline("kv"))


# --------------------------------------------------------------------------------------------------
# diffusers operations on the accelerated pipeline
# --------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_load_lora_weights(tmp_path):
    operations.load_lora_weights(CASE, tmp_path, targets=("to_q", "to_k", "to_v", "to_qkv_mlp_proj"))


def test_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_pipe_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_patched_modules():
    """Only the output AdaLayerNormContinuous matches a rule: FLUX.2's attention and SwiGLU feed-forward are its own
    classes, its block LayerNorms take the model-level modulation outside any module eekernels patches."""
    operations.patched(CASE, {"ada_layer_norm_continuous": 1})
