"""Lumina Image 2.0 in place (issue 22): the harness checks and the diffusers operations on a tiny ``Lumina2Pipeline``.

Tiny and random: 2 joint blocks and 1 + 1 refiner blocks, 8x8 latents (64 px, no VAE), 3 steps, CFG as two calls;
prompts as embeddings with their masks, no text encoder, no VAE (``output_type="latent"``). Every parameter is
randomized. The model's own timestep runs from noise (0) to data (1): the direct-call depth is checked against it.
"""
import numpy as np
import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, inplace
from tests.families import operations
from tests.families.harness import CHECKS, Case, block_fraction, compile_one_graph_per_depth, patched_equals_plain
from tests.models._reference_models import randomize_

T_TXT, D_TXT = 6, 12


def make_model(layers=2):
    m = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=layers, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=[4, 6, 6], axes_lens=[32, 32, 32],
        cap_feat_dim=D_TXT)
    return randomize_(m).eval()


def scheduler(shift=1.0):
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)


def make_pipeline():
    """Shift 1 here, so that 3 steps (t = 1000, 667, 333) fall in different bins of the harness's schedule."""
    pipe = diffusers.Lumina2Pipeline(transformer=make_model(), scheduler=scheduler(), vae=None, text_encoder=None,
                                     tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed):
    g = torch.Generator().manual_seed(0)
    dtype = pipe.transformer.dtype
    emb, neg = (torch.randn(1, T_TXT, D_TXT, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(1, T_TXT, dtype=torch.bool)
    return pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=mask, guidance_scale=3.0, height=64, width=64,
                num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def inputs(seed, timestep=0.3):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([timestep, timestep]),
                encoder_hidden_states=torch.randn(2, T_TXT, D_TXT, generator=g),
                encoder_attention_mask=torch.ones(2, T_TXT, dtype=torch.bool))


CASE = Case(name="lumina2", make_pipeline=make_pipeline, call=call, make_model=make_model, inputs=inputs,
            lists=("layers",))


@pytest.mark.parametrize("check", [c for c in CHECKS if c is not compile_one_graph_per_depth],
                         ids=lambda c: c.__name__)
def test_lumina2(check):
    check(CASE)


def test_lumina2_whole_model_does_not_compile_fullgraph_in_diffusers_itself():
    """diffusers' forward builds the joint sequence from per-sample lengths read off the caption mask
    (``len(set(seq_lengths))``, Python loops over them): the plain model has no full graph, so the harness's
    one-graph-per-depth check does not apply; its blocks compile (below). When this fails, diffusers has fixed it:
    run the harness check."""
    torch._dynamo.reset()
    with pytest.raises(Exception, match="data-dependent"), torch.no_grad():
        torch.compile(make_model(), fullgraph=True, backend="aot_eager")(**inputs(0))


def test_lumina2_blocks_compile_fullgraph_at_every_depth():
    """Each joint block compiled on its own (``nn.Module.compile(fullgraph=True)``, the exit hook inside): every
    depth gives the eager output, no graph break."""
    from torch._dynamo.utils import counters

    kw = inputs(0)
    model = make_model()
    eekernels.accelerate(model, kernels=False)
    eager = {}
    for d in (2, 1):
        with torch.no_grad(), inplace.at_depth(model, d):
            eager[d] = model(**kw).sample
    torch._dynamo.reset()
    counters.clear()
    for block in model.layers:
        block.compile(fullgraph=True, backend="aot_eager")
    for _ in range(2):
        for d in (2, 1):
            with torch.no_grad(), inplace.at_depth(model, d):
                assert torch.allclose(model(**kw).sample, eager[d], atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_lumina2_direct_call_depth_reads_the_reversed_timestep():
    """The model's ``timestep`` x is 1 - sigma: a direct call at x runs the schedule's depth at t = 1000 (1 - x)
    (x = 0.05: t = 950, pure noise end; x = 0.95: t = 50, data end), as the pipeline loop does at the same sigma."""
    from tests.test_inplace_diffusers import _Ran

    model = make_model()
    eekernels.accelerate(model, schedule=ExitSchedule.piecewise([2] * 5 + [1] * 5))
    ran = _Ran(model)
    with torch.no_grad():
        for x in (0.05, 0.95, 0.45, 0.55):
            model(**inputs(0, timestep=x))
    assert ran.depths() == [1, 2, 1, 2]


def test_lumina2_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_lumina2_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_lumina2_has_no_attention_processor_api():
    """``Lumina2Transformer2DModel`` is not an ``AttentionMixin`` in diffusers 0.42: no ``set_attn_processor``."""
    assert operations.lacks(make_model(), "set_attn_processor", "attn_processors")


def test_lumina2_to_dtype():
    operations.pipe_to_dtype(CASE)


@pytest.mark.parametrize("shift,steps,want", [(6.0, 30, 0.706), (6.0, 50, 0.708), (3.0, 30, 0.794)])
def test_lumina2_preset_block_fraction(shift, steps, want):
    """"ase-lumina2" under Lumina 2.0's sampling: sigmas linear from 1 to 1/N, shifted (the pipeline's own)."""
    s = scheduler(shift)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    assert abs(block_fraction("ase-lumina2", s.timesteps) - want) < 0.005


def test_what_the_patches_replace_in_a_lumina2_transformer():
    """Every diffusers ``RMSNorm`` (the blocks' four, the QK norms, the caption embedder's: 25 in this model) is
    replaced; the output ``LayerNorm`` and the attention are not."""
    patched_equals_plain(CASE, {"rms_norm": 25}, {"LayerNorm", "Attention"})


def test_family_timestep_fields_are_checked():
    from eekernels.families import Family, PrefixExit, scaled_step_t

    with pytest.raises(ValueError, match="`timestep_map` expected fn"):
        Family(name="x", exit=PrefixExit(blocks=("layers",)), timestep_map=3)
    with pytest.raises(ValueError, match="`scale` expected a positive number, got 0"):
        scaled_step_t(0)
