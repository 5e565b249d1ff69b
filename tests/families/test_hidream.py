"""HiDream-I1 in place (``HiDreamImageTransformer2DModel``, a mixture-of-experts MLP; ``HiDreamImagePipeline``): the
harness checks (compile: see its test), the cache policy at an exit in either block list (the single blocks' stream
is ``[image; text]``), the preset's share of the block FLOPs, the diffusers operations the pipeline supports, and the
patched modules (none). Tiny random models (2 double + 2 single blocks, 4 experts of
which 2 are routed, 4x4 latent tokens); prompts given as T5 and Llama embeddings and the pooled CLIP embedding: no
text encoder is built."""
import diffusers
import pytest
import torch
from torch._dynamo.utils import counters

import eekernels
from eekernels import ExitSchedule, inplace
from tests.families import operations
from tests.families.harness import CHECKS, Case, cache_equals_replay, compile_one_graph_per_depth, output
from tests.models._reference_models import randomize_
from tests.test_accelerate_text import tiny_vae

L_T5, L_LLAMA, DIM_T5, DIM_LLAMA, DIM_POOLED = 5, 3, 10, 12, 6
LLAMA_LAYERS = 5  # hidden states of 5 Llama layers; the model reads one per block, and the last again


def tiny_transformer(seed=0, layers=(2, 2)):
    """``layers``: (double, single) blocks, each reading one of the Llama layers."""
    m = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=layers[0], num_single_layers=layers[1], attention_head_dim=8,
        num_attention_heads=2, caption_channels=[DIM_T5, DIM_LLAMA], text_emb_dim=DIM_POOLED, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(8, 8),
        llama_layers=[0, 2, 3, 4][-sum(layers):])
    return randomize_(m, seed=seed).eval()


def make_pipeline():
    pipe = diffusers.HiDreamImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, text_encoder_4=None,
        tokenizer_4=None, transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(g, B, dtype=torch.float32):
    return dict(t5=torch.randn(B, L_T5, DIM_T5, generator=g).to(dtype),
                llama3=torch.randn(LLAMA_LAYERS, B, L_LLAMA, DIM_LLAMA, generator=g).to(dtype),
                pooled=torch.randn(B, DIM_POOLED, generator=g).to(dtype))


def call_kwargs(pipe, steps=3, B=2):
    """Prompt embeddings in the transformer's dtype (as its text encoders would give them)."""
    g = torch.Generator().manual_seed(11)
    pos, neg = (_embeds(g, B, pipe.transformer.dtype) for _ in range(2))
    return dict(prompt_embeds_t5=pos["t5"], prompt_embeds_llama3=pos["llama3"], pooled_prompt_embeds=pos["pooled"],
                negative_prompt_embeds_t5=neg["t5"], negative_prompt_embeds_llama3=neg["llama3"],
                negative_pooled_prompt_embeds=neg["pooled"], height=8, width=8, num_inference_steps=steps,
                guidance_scale=4.0, output_type="latent")


def run(pipe, seed=3, **extra):
    pipe.default_sample_size = 8  # the pipeline resizes every request to this area (8x8 latent pixels here); a
    # pipeline setting that save_pretrained does not keep
    kw = {**call_kwargs(pipe), **extra}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def inputs(seed, B=2):
    g = torch.Generator().manual_seed(seed)
    e = _embeds(g, B)
    return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), timesteps=torch.full((B,), 550.0),
                encoder_hidden_states_t5=e["t5"], encoder_hidden_states_llama3=e["llama3"], pooled_embeds=e["pooled"])


CASE = Case(name="hidream", make_pipeline=make_pipeline, call=run, make_model=tiny_transformer, inputs=inputs,
            lists=("double_stream_blocks", "single_stream_blocks"),
            image_stream=lambda out: out[0] if isinstance(out, tuple) else out,  # (image, text) / joint
            image_part=lambda joint, n: joint[:, :n])  # [image; text]: the image tokens are first
CASES = {"t2i": CASE}


@pytest.mark.parametrize("check", [c for c in CHECKS if c is not compile_one_graph_per_depth], ids=lambda c: c.__name__)
def test_hidream(check):
    check(CASE)


def test_cache_policy_at_a_double_block_exit_takes_the_residual_on_the_image_tokens():
    """Exit after the first double block: the residual is the last single block's image tokens (the first ones of
    its [image; text] stream) minus the exit block's image stream."""
    cache_equals_replay(CASE, d=1)


def test_compile_breaks_only_where_the_plain_model_does():
    """diffusers' MoE inference routing (``moe_infer``) sizes its loop by expert counts read on the host: the plain
    model itself has no ``fullgraph=True`` compile. Without fullgraph, the in-place model compiles with the plain
    model's graph break alone (eekernels adds none) and equals eager at the smallest and full depths, switching
    between them. One block per list: the graph breaks make every block its own graphs (slow to compile)."""
    torch._dynamo.reset()
    kw = inputs(0)
    with pytest.raises(Exception, match="data-dependent"):  # diffusers' own model, no eekernels
        torch.compile(tiny_transformer(layers=(1, 1)), fullgraph=True, backend="eager")(**kw)
    torch._dynamo.reset()
    counters.clear()
    model = tiny_transformer(layers=(1, 1))
    eekernels.accelerate(model)
    ctl = inplace.controller(model)
    depths = (ctl.min_depth, ctl.num_blocks)
    assert depths == (1, 2)
    eager = {}
    for d in depths:
        with torch.no_grad(), inplace.at_depth(model, d):
            eager[d] = output(model(**kw))
    compiled = torch.compile(model, backend="eager")
    for d in depths + depths:
        with torch.no_grad(), inplace.at_depth(model, d):
            assert torch.equal(output(compiled(**kw)), eager[d]), d
    breaks = {reason.split("\n")[0] for reason in counters["graph_break"]}
    assert breaks == {"Dynamic shape operator"}, breaks


def test_the_preset_runs_about_0_7_of_the_block_flops_at_the_published_setting():
    """HiDream-I1 Full: 50 UniPC steps, flow shift 3 (timesteps t = sigma * 1000). A single block costs 1.04 of a
    double one (its text tokens go through the experts too), so the share of FLOPs weights the blocks."""
    sched = diffusers.UniPCMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    sched.set_timesteps(50)
    preset = ExitSchedule.preset("ase-hidream")
    depths = preset.plan(sched.timesteps.double())
    cost = torch.tensor([1.0] * 16 + [1.04] * 32, dtype=torch.float64).cumsum(0)
    assert preset.total_depth == 48 and abs(cost[depths - 1].mean().item() / cost[-1].item() - 0.70) < 0.01


# --------------------------------------------------------------------------------------------------
# diffusers operations on the accelerated pipeline
# --------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_load_lora_weights(tmp_path):
    operations.load_lora_weights(CASE, tmp_path, targets=("to_q", "to_k", "to_v", "to_out"))


def test_pipe_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_diffusers_has_no_set_attn_processor_for_hidream():
    """HiDreamImageTransformer2DModel is not an AttentionMixin: diffusers gives it no ``set_attn_processor``."""
    assert operations.lacks(tiny_transformer(), "set_attn_processor", "attn_processors")


def test_patched_modules():
    """No module matches a rule: HiDream's attention has no RoPE module to fuse QK-norm with, its LayerNorms take the
    modulation outside them, its feed-forwards are SwiGLU experts."""
    operations.patched(CASE, {})
