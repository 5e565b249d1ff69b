"""Qwen-Image 2.1 in place (``QwenImage21Pipeline``): the harness's checks and operations, and its prefix KV cache.

Tiny model, random weights, float32; the pipeline gets ``prompt_embeds`` (and masks), so no text encoder is built
(``text_encoder=None``) and returns latents (``vae=None``). Its ``__init__`` reads its Qwen3-VL processor (the chat
template, to count the system prompt's tokens, and the image-pad token's id); transformers' ``Qwen3VLProcessor``
needs torchvision for its video processor, which this environment lacks, so the pipeline gets :class:`ChatTemplate`:
a real in-memory tokenizer with a chat template, behind the two calls ``__init__`` makes. Condition images need the
Qwen3-VL encoder (the pipeline takes no image mask with ``prompt_embeds``): text-to-image only here.

The harness's pipeline runs pass ``use_kv_cache=False`` (every call sees the whole joint sequence, so a call's depth
is its step's); the tests below run the KV cache (the pipeline's default).
"""
import pytest
import torch

import diffusers
import eekernels
from eekernels import ExitSchedule, inplace
from tests.families import operations
from tests.families.harness import CHECKS, BlocksRan, Case, compile_one_graph_per_depth
from tests.models._reference_models import randomize_

STEPS = 3
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift_terminal=0.02,
                 use_dynamic_shifting=True, time_shift_type="exponential")  # Qwen-Image 2.1's own scheduler config


class ChatTemplate:
    """What ``QwenImage21Pipeline.__init__`` reads of its processor: ``apply_chat_template`` (batched token ids, as a
    processor returns them) and ``tokenizer.encode``; a real tokenizer and template, in memory."""

    def __init__(self):
        import tokenizers
        import transformers

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
        words = special + "system user assistant comprehend and analyze the provided prompt .".split()
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                               unk_token="<|endoftext|>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        self.tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<|endoftext|>", additional_special_tokens=special[1:],
            chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                          "{{ c['text'] }}{% endfor %}<|im_end|>\n{% endfor %}")

    def apply_chat_template(self, conversation, **kwargs):
        return [self.tokenizer.apply_chat_template(conversation, **kwargs)]


def tiny_transformer(seed=0):
    m = diffusers.QwenImage21Transformer2DModel(patch_size=1, in_channels=8, out_channels=8, num_layers=3,
                                                attention_head_dim=8, num_attention_heads=2, context_in_dim=16,
                                                mlp_ratio=2, axes_dims_rope=(2, 2, 4))
    return randomize_(m, seed=seed).eval()


def make_pipeline():
    pipe = diffusers.QwenImage21Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None,
                                         text_encoder=None, processor=ChatTemplate(), transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, seed, use_kv_cache=False, **kw):
    """Final latents of a 3-step run at 64 px (4 x 4 target tokens: 2.1's VAE is 16x, its latents unpatched), with
    true CFG (two calls per step); prompts of 6 tokens, the last one padded."""
    g = torch.Generator().manual_seed(11)
    dtype = pipe.transformer.dtype
    emb, neg = torch.randn(2, 1, 6, 16, generator=g).to(dtype)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, -1] = False
    out = pipe(prompt_embeds=emb, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
               negative_prompt_embeds_mask=mask.clone(), true_cfg_scale=2.0, height=64, width=64,
               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="latent",
               use_kv_cache=use_kv_cache, **kw)
    return out.images


def with_kv_cache(pipe, seed):
    return call(pipe, seed, use_kv_cache=True)


def inputs(seed):
    """A direct call as the pipeline makes it without the KV cache: 6 text positions, then 4 slots of 2 x 2 target
    tokens (16 tokens)."""
    g = torch.Generator().manual_seed(100 + seed)
    mask = torch.ones(1, 6, dtype=torch.bool)
    mask[:, -1] = False
    img_mask = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], dim=1)
    return dict(hidden_states=torch.randn(1, 16, 8, generator=g), encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
                timestep=torch.tensor([0.3 + 0.2 * seed]), img_shapes=[[(1, 4, 4)]], img_mask=img_mask,
                encoder_hidden_states_mask=mask, return_dict=False)


CASE = Case(name="qwenimage21", make_pipeline=make_pipeline, call=call, make_model=tiny_transformer, inputs=inputs,
            lists=("transformer_blocks",), extra={"load_kwargs": {"processor": ChatTemplate()}})
KV = Case(name="qwenimage21-kv", make_pipeline=make_pipeline, call=with_kv_cache, make_model=tiny_transformer,
          inputs=inputs, lists=("transformer_blocks",))


@pytest.mark.parametrize("check", [c for c in CHECKS if c is not compile_one_graph_per_depth],
                         ids=lambda c: c.__name__)
def test_qwenimage21(check):
    check(CASE)


def test_diffusers_own_model_does_not_compile_to_one_graph():
    """``compile_one_graph_per_depth`` is not run: diffusers 0.42's plain ``QwenImage21Transformer2DModel`` (no
    eekernels) breaks the graph itself (its RoPE calls ``tolist()`` on the image-pad mask), so ``fullgraph=True``
    fails before any eekernels code; when diffusers fixes it, this fails: add the check back."""
    from torch._dynamo.exc import Unsupported

    torch._dynamo.reset()
    compiled = torch.compile(tiny_transformer(), fullgraph=True, backend="aot_eager")
    with torch.no_grad(), pytest.raises(Unsupported, match="tolist"):
        compiled(**inputs(0))


def test_qwenimage21_save_load(tmp_path):
    operations.save_load_round_trip(CASE, tmp_path)


def test_qwenimage21_lora(tmp_path):
    operations.load_lora_weights(CASE, tmp_path)


def test_qwenimage21_set_attn_processor():
    operations.set_attn_processor(CASE)


def test_qwenimage21_to_dtype():
    operations.pipe_to_dtype(CASE)


def test_kv_cache_full_depth_is_bit_identical():
    want = with_kv_cache(make_pipeline(), 3)
    pipe = make_pipeline()
    model = pipe.transformer
    eekernels.accelerate(pipe)
    assert pipe.transformer is model and torch.equal(with_kv_cache(pipe, 3), want)
    eekernels.disable(pipe)
    assert torch.equal(with_kv_cache(pipe, 3), want)


def test_kv_cache_prefill_runs_every_block_and_later_calls_their_depth():
    """With the KV cache the first step (the prefill, storing every block's text keys and values) runs every block
    whatever the schedule says, and the later steps their scheduled depth, reading the stored keys and values of the
    blocks they run: without that, a later step deeper than the first reads keys never stored (diffusers raises
    "KV cache has not been populated yet"). Text tokens are modulated from t = 0 and attend only to text, so their
    keys and values are the same at every step: the result equals the run without the cache, up to rounding."""
    pipe = make_pipeline()
    schedule = ExitSchedule.piecewise([3, 3, 3, 3, 3, 3, 2, 2, 2, 1])  # data end first: depth 1 at the first step
    eekernels.accelerate(pipe, schedule=schedule)
    ran = BlocksRan(KV, pipe.transformer)
    got = with_kv_cache(pipe, 3)
    depths = ran.depths()
    plan = schedule.plan(pipe.scheduler.timesteps.to(torch.float64)).tolist()
    assert plan[0] == 1 and max(plan[1:]) > 1, plan
    assert depths == [3, 3] + [d for d in plan[1:] for _ in range(2)], (depths, plan)  # cond and uncond per step
    ran = BlocksRan(KV, pipe.transformer)
    without = call(pipe, 3)
    assert ran.depths() == [d for d in plan for _ in range(2)]  # without the cache, the first step at its depth
    first_full = ExitSchedule.piecewise([3, 3, 3, 3, 3, 3, 2, 2, 2, 3])
    eekernels.disable(pipe)
    eekernels.accelerate(pipe, schedule=first_full)
    reference = call(pipe, 3)  # no cache, every step at the depth the cached run used
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-5), (got - reference).abs().max()
    assert not torch.allclose(got, without, rtol=1e-5, atol=1e-5)  # the first step's depth shows


def test_kv_cache_with_the_cache_exit_policy_is_refused_by_name():
    """``exit_policy="cache"`` records a full call's residual over the whole joint sequence, which a cached call (the
    target's tokens only) cannot use: with the KV cache it is refused by name at the first model call, before any
    block runs; without it, it runs."""
    pipe = make_pipeline()
    eekernels.accelerate(pipe, schedule=ExitSchedule.periodic(2, 1, 3), exit_policy="cache")
    ran = BlocksRan(KV, pipe.transformer)
    with pytest.raises(ValueError, match="exit_policy='cache'.*use_kv_cache=False"):
        with_kv_cache(pipe, 3)
    assert ran.depths() == [0]
    assert call(pipe, 3).shape == (1, 16, 8)


def test_kv_cache_operations_keep_working():
    """An attention processor set after ``accelerate`` (diffusers' flex one falls back eagerly on CPU; its own SDPA
    one here) under the KV cache: full depth as the plain pipeline's."""
    want = with_kv_cache(make_pipeline(), 3)
    pipe, _ = operations._accelerated(CASE)
    pipe.transformer.set_attn_processor(diffusers.models.transformers.transformer_qwenimage21
                                        .QwenImage21AttnProcessor())
    with inplace.at_depth(pipe.transformer, None):
        assert torch.equal(with_kv_cache(pipe, 3), want)


def test_the_preset_is_qwen_image_21s_and_about_seven_tenths_of_the_blocks():
    """``ase-qwenimage21`` (in sigma, the scheduler's own t = sigma * 1000): 32 blocks, about 0.7 of them per call
    over the pipeline's default 40 steps at 1024 px (4096 target tokens), 0.72 with the KV cache's full prefill."""
    import numpy as np

    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    schedule = ExitSchedule.preset("ase-qwenimage21")
    assert schedule.total_depth == 32
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 40, 40), mu=calculate_shift(4096, 256, 8192, 0.5, 0.9))
    plan = schedule.plan(sched.timesteps.to(torch.float64)).double()
    assert 0.69 <= float(plan.mean()) / 32 <= 0.71
    assert 0.71 <= float((plan.sum() - plan[0] + 32) / 40) / 32 <= 0.73  # the prefill at full depth
    assert plan[0] < plan[-1] == 32 and bool((plan[1:] >= plan[:-1]).all())


def test_patched_modules_are_listed():
    """What eekernels' fused ops replace in a Qwen-Image 2.1 transformer (on CUDA; on the CPU the modules' own
    forwards run): the attention's QK RMSNorms. Its zero-centred RMSNorm, scale-only final norm and SwiGLU MLP have
    no rule."""
    model = tiny_transformer()
    eekernels.accelerate(model)
    assert inplace.controller(model).patches.counts() == {"rms_norm": 6}
    eekernels.disable(model)
