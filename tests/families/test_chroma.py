"""Chroma in place (``ChromaTransformer2DModel``; ``ChromaPipeline``, ``ChromaImg2ImgPipeline``): the harness checks,
the cache policy at an exit in either block list, one exit cache per guidance branch (the pipelines call cond and
uncond unnamed), the preset's share of the blocks, the diffusers operations the pipelines support, and the patched
modules. Tiny random models (2 double + 2 single blocks, 4x4 latent tokens); prompts given as embeddings with
their attention masks: no text encoder is built."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import diffusers
import eekernels
from eekernels import ExitSchedule
from tests.families import operations
from tests.families.harness import CHECKS, Case, cache_equals_replay, full_depth_is_bit_identical, \
    schedule_depth_per_step
from tests.models._reference_models import randomize_
from tests.test_accelerate_text import tiny_vae

L_TXT, DIM_TXT = 5, 12


def tiny_transformer(seed=0):
    m = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=DIM_TXT,
                                           axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
                                           approximator_hidden_dim=16, approximator_layers=1)
    return randomize_(m, seed=seed).eval()


def make_pipeline(kind="t2i"):
    cls = {"t2i": diffusers.ChromaPipeline, "img2img": diffusers.ChromaImg2ImgPipeline}[kind]
    pipe = cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None,
               tokenizer=None, transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mask(B):
    mask = torch.ones(B, L_TXT, dtype=torch.bool)
    mask[1:, -2:] = False  # padded caption tokens
    return mask


def _embeds(B=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    return dict(prompt_embeds=torch.randn(B, L_TXT, DIM_TXT, generator=g).to(dtype), prompt_attention_mask=_mask(B),
                negative_prompt_embeds=torch.randn(B, L_TXT, DIM_TXT, generator=g).to(dtype),
                negative_prompt_attention_mask=_mask(B))


def run(pipe, seed=3, steps=3, **extra):
    """Guidance 4: cond and uncond, two calls per step. 8x8 latent pixels, 2x2-packed: 4x4 tokens. Prompt
    embeddings in the transformer's dtype (as its text encoder would give them)."""
    kw = dict(_embeds(dtype=pipe.transformer.dtype), height=8, width=8, num_inference_steps=steps, guidance_scale=4.0,
              output_type="latent")
    if isinstance(pipe, diffusers.ChromaImg2ImgPipeline):  # strength 0.8 of 4 steps: 3 steps run
        kw.update(image=torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)), strength=0.8,
                  num_inference_steps=steps + 1)
    return pipe(generator=torch.Generator().manual_seed(seed), **{**kw, **extra}).images


def inputs(seed, B=2, N=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"),
                      -1).reshape(N, 3)
    mask = torch.cat([_mask(B), torch.ones(B, N, dtype=torch.bool)], dim=1)
    return dict(hidden_states=torch.randn(B, N, 16, generator=g),
                encoder_hidden_states=torch.randn(B, L_TXT, DIM_TXT, generator=g),
                timestep=torch.full((B,), 0.55), img_ids=ids, txt_ids=torch.zeros(L_TXT, 3), attention_mask=mask)


class Skipped(nn.Module):
    """A block cut by hand: returns its streams as they came ((text, image) for a double block)."""

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        return hidden_states if encoder_hidden_states is None else (encoder_hidden_states, hidden_states)


def cut(model, d):
    """The first d blocks (double, then single) of ``model`` and stand-ins for the rest. Chroma's blocks must stay
    where they are: the model reads each block's modulation from one vector at offsets computed from the lists'
    lengths, so lists made shorter would hand the kept blocks other modulations."""
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, name)
        for i in range(min(d, len(blocks)), len(blocks)):
            blocks[i] = Skipped()
        d = max(0, d - len(blocks))
    return model


CASES = {kind: Case(name=f"chroma-{kind}", make_pipeline=lambda kind=kind: make_pipeline(kind), call=run,
                    make_model=tiny_transformer, inputs=inputs,
                    lists=("transformer_blocks", "single_transformer_blocks"), sliced=cut,
                    image_stream=lambda out: out[1] if isinstance(out, tuple) else out,  # (text, image) / joint
                    image_part=lambda joint, n: joint[:, -n:])  # [text; image]: the image tokens are last
         for kind in ("t2i", "img2img")}
CASE = CASES["t2i"]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_chroma(check):
    check(CASE)


@pytest.mark.parametrize("check", (full_depth_is_bit_identical, schedule_depth_per_step), ids=lambda c: c.__name__)
def test_img2img(check):
    check(CASES["img2img"])


def test_cache_policy_at_a_double_block_exit_takes_the_residual_on_the_image_tokens():
    cache_equals_replay(CASE, d=1)


def test_cache_policy_keeps_one_cache_per_guidance_branch():
    """ChromaPipeline calls cond, then uncond, in each step without naming them (no ``cache_context``). Under
    ``periodic(2, 1)`` with the cache policy, steps 0 and 2 run in full and record a residual per branch, steps 1
    and 3 exit after the first block and add their own branch's residual: equal to a hand-written replay on the
    plain pipeline, whose transformer runs copies of itself (full, or cut by hand with the residual added)."""
    d, steps = 1, 4
    pipe = make_pipeline()
    eekernels.accelerate(pipe, schedule=ExitSchedule.periodic(2, d, 4), exit_policy="cache")
    got = run(pipe, steps=steps)

    plain = make_pipeline()
    model = plain.transformer
    full, short = copy.deepcopy(model), cut(copy.deepcopy(model), d)
    fb, sb = (operations._blocks(m, CASE.lists) for m in (full, short))
    seen, residual, calls = {}, {}, []
    fb[d].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", k["hidden_states"]), with_kwargs=True)
    fb[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))  # joint [text; image]
    sb[d - 1].register_forward_hook(lambda m, a, out: (out[0], out[1] + residual[calls[-1][1]]))  # (text, image)

    def replay(**kw):
        step, branch = divmod(len(calls), 2)
        calls.append((step, branch))
        if step % 2:
            return short(**kw)
        out = full(**kw)
        n = seen["in"].shape[1]
        residual[branch] = seen["out"][:, -n:] - seen["in"]
        return out

    model.forward = replay
    want = run(plain, steps=steps)
    assert len(calls) == 2 * steps and not torch.equal(residual[0], residual[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_graph_runner_keeps_one_graph_per_guidance_branch_under_the_cache_policy():
    """The graph runner keys its graphs by the call's exit cache: cond and uncond (unnamed) each get their own graph
    per depth (a CUDA graph reads its own cache's residuals), through the runner's real code path with an eager
    stand-in for the capture; the images equal those without graphs."""
    from eekernels import inplace
    from eekernels.graphs import GraphCache

    class EagerGraph:
        def __init__(self, fn):
            self.fn = fn

        def replay(self):
            self.fn()

    schedule = ExitSchedule.periodic(2, 1, 4)
    pipe = make_pipeline()
    eekernels.accelerate(pipe, schedule=schedule, exit_policy="cache", graphs=False)
    want = run(pipe, steps=4)
    eekernels.disable(pipe)
    eekernels.accelerate(pipe, schedule=schedule, exit_policy="cache")
    cache = GraphCache(capture=lambda fn, pool, stream: (EagerGraph(fn), 1000))
    inplace.controller(pipe).graphs.cache = cache
    got = run(pipe, steps=4)
    assert torch.equal(got, want)
    depths = {inplace.controller(pipe).depth_at(float(t), i) for i, t in enumerate(pipe.scheduler.timesteps)}
    assert len(depths) == 2 and cache.stats()["graphs"] == 2 * len(depths), cache.stats()


def test_the_preset_runs_about_0_7_of_the_blocks_at_the_pipeline_default():
    """ChromaPipeline's default: 35 steps; 1024 px is 4096 tokens (its mu, dynamic shifting as FLUX.1). Double and
    single blocks cost the same FLOPs."""
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    steps = 35
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(4096))
    preset = ExitSchedule.preset("ase-chroma")
    depths = preset.plan(sched.timesteps.double())
    assert preset.total_depth == 57 and abs(depths.double().mean().item() / 57 - 0.70) < 0.01


# --------------------------------------------------------------------------------------------------
# diffusers operations on the accelerated pipeline
# --------------------------------------------------------------------------------------------------
def test_save_pretrained_round_trip(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_load_lora_weights(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_pipe_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_patched_modules():
    """Chroma's attention is FLUX.1's (QK-norm + RoPE) and its double blocks' feed-forwards are GELU(tanh) MLPs;
    its pruned modulated norms and its single block (not FLUX.1's class) match no rule."""
    operations.patched(CASE, {"flux_attention_qk_norm_rope": 4, "linear_gelu_tanh": 4})
