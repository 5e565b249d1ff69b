"""Z-Image in place (``ZImagePipeline``): the harness's checks and operations, the refiners, the timestep convention.

Tiny model, random weights, float32; the pipeline gets ``prompt_embeds`` and ``negative_prompt_embeds`` (lists of
caption features, as its encoder gives), so no text encoder is built (``text_encoder=None``, ``tokenizer=None``),
and returns latents (``vae=None``).
"""
import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, inplace
from tests.families import operations
from tests.families.harness import CHECKS, BlocksRan, Case, output
from tests.models._reference_models import randomize_

STEPS = 3


def tiny_transformer(seed=0):
    m = diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=3, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[4, 6, 6], axes_lens=[64, 16, 16])
    return randomize_(m, seed=seed).eval()


def make_pipeline():
    # diffusers' default flow scheduler (shift 1: three steps spread over sigma; Z-Image-Turbo's shift 3 puts them
    # all near the noise); the preset test below uses Turbo's
    pipe = diffusers.ZImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed, **kw):
    """Final latents of a 3-step run at 64 px (8 x 8 latents without a VAE, 4 x 4 tokens), with CFG (the cond and
    uncond samples in one call)."""
    g = torch.Generator().manual_seed(11)
    dtype = pipe.transformer.dtype
    emb, neg = [torch.randn(5, 16, generator=g).to(dtype)], [torch.randn(3, 16, generator=g).to(dtype)]
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=4.0, height=64, width=64,
               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="latent", **kw)
    return out.images


def inputs(seed, t=None):
    g = torch.Generator().manual_seed(100 + seed)
    return dict(x=[torch.randn(4, 1, 8, 8, generator=g)], t=torch.tensor([0.3 + 0.2 * seed if t is None else t]),
                cap_feats=[torch.randn(5, 16, generator=g)], return_dict=False)


CASE = Case(name="zimage", make_pipeline=make_pipeline, call=call, make_model=tiny_transformer, inputs=inputs,
            lists=("layers",))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_zimage(check):
    check(CASE)


def test_zimage_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_zimage_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_zimage_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_diffusers_has_no_set_attn_processor_for_z_image():
    """``ZImageTransformer2DModel`` is not an ``AttentionMixin`` in diffusers 0.42 (no ``set_attn_processor`` nor
    ``attn_processors``), so that operation is not tested; when diffusers adds it, this fails: test it with ``operations.set_attn_processor``."""
    assert operations.lacks(tiny_transformer(), "set_attn_processor", "attn_processors")


def test_the_refiners_always_run_and_are_not_counted():
    """Depth counts the main ``layers`` only: at depth 1 the noise and context refiners still run (torch pre-hooks on
    their submodules), and the output is the plain model's with ``layers`` cut to one block."""
    model = tiny_transformer()
    plain = tiny_transformer()
    kw = inputs(0)
    eekernels.accelerate(model)
    assert inplace.controller(model).num_blocks == 3 and inplace.controller(model).min_depth == 1
    ran = []
    for name in ("noise_refiner", "context_refiner"):
        for m in getattr(model, name)[0].modules():
            m.register_forward_pre_hook(lambda *a, name=name: ran.append(name))
    with torch.no_grad(), inplace.at_depth(model, 1):
        got = output(model(**kw))
    assert set(ran) == {"noise_refiner", "context_refiner"}
    plain.layers = plain.layers[:1]
    with torch.no_grad():
        want = output(plain(**kw))
    assert torch.equal(got, want)


def test_a_direct_call_reads_the_timestep_as_one_minus_sigma():
    """Z-Image's model takes ``(1000 - t) / 1000`` = 1 - sigma; a direct call (no pipeline, no ``at_depth``) gets the
    schedule's depth at t = sigma * 1000: near noise (model timestep 0.05) the noise end's depth, near the data
    (0.95) the data end's."""
    schedule = ExitSchedule.piecewise([3, 3, 3, 3, 3, 2, 2, 2, 1, 1])  # data end first
    model = tiny_transformer()
    eekernels.accelerate(model, schedule=schedule)
    for t_model, depth in ((0.05, 1), (0.95, 3), (0.45, 2)):
        ran = BlocksRan(CASE, model)
        with torch.no_grad():
            model(**inputs(0, t=t_model))
        assert ran.depths() == [depth], (t_model, ran.depths())


def test_the_preset_is_z_image_turbos_and_about_seven_tenths_of_the_layers():
    """``ase-zimage-turbo`` (in sigma, the scheduler's own t = sigma * 1000): 30 layers, 0.70 of them per call over
    Z-Image-Turbo's 9 steps (the pipeline's sigmas under the scheduler's shift 3), fewer toward the noise; in a
    pipeline (rescaled to the tiny model) each step runs the depth at its scheduler timestep."""
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas

    schedule = ExitSchedule.preset("ase-zimage-turbo")
    assert schedule.total_depth == 30
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(9), mu=0.0)
    plan = schedule.plan(sched.timesteps.to(torch.float64))
    assert abs(float(plan.double().mean()) / 30 - 0.70) < 0.01
    assert plan[0] < plan[-1] == 30 and bool((plan[1:] >= plan[:-1]).all())
    pipe = make_pipeline()
    eekernels.accelerate(pipe, schedule=ExitSchedule.preset("ase-zimage-turbo", 3))
    ran = BlocksRan(CASE, pipe.transformer)
    call(pipe, 3)
    want = schedule.rescaled(3).plan(pipe.scheduler.timesteps.to(torch.float64)).tolist()
    assert ran.depths() == want and want[0] < want[-1]


def test_patched_modules_are_listed():
    """What eekernels' fused ops replace in a Z-Image transformer (they run on CUDA; on the CPU the modules' own
    forwards run): its RMSNorms (four per block and the attention's QK norms, the caption embedder's)."""
    model = tiny_transformer()
    eekernels.accelerate(model)
    assert inplace.controller(model).patches.counts() == {"rms_norm": 31}
    eekernels.disable(model)
