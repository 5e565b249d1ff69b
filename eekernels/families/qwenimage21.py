"""Qwen-Image 2.1: diffusers' ``QwenImage21Transformer2DModel`` (``QwenImage21Pipeline``).

Exit rule: ``transformer_blocks[:d]`` (single-stream blocks over one joint sequence: text, condition-image and
target-image tokens), then the model's own ``norm_out`` and ``proj_out`` on that sequence; the pipeline keeps the
target's tokens, as at full depth. The block class is not in diffusers' ``TransformerBlockRegistry``: it returns
the joint stream alone, declared here.

The prefix KV cache (the pipeline's ``use_kv_cache=True``, its default): the first call (``kv_cache_mode="extract"``)
stores every block's keys and values of the text and condition-image tokens, and the later calls
(``"cached"``) compute only the target's tokens and read those of every block they run. So the prefill call runs every
block whatever the schedule says (``full_depth_call``), and a later call at any depth finds its blocks' keys and
values; the rest of the run follows the schedule. ``exit_policy="cache"`` with the KV cache is refused by name at the
first call (the prefill's residual covers the whole joint sequence, a later call's only the target's tokens): pass
``use_kv_cache=False`` to the pipeline for it.

Timestep: the pipeline passes sigma in [0, 1] (``timestep / 1000``; the model scales by 1000 inside):
``timestep_scale=1000``, flow matching, the preset in bins of sigma.
"""
from eekernels.families import Family, PrefixExit, register


def _prefill_runs_every_block(call, policy) -> bool:
    mode, cache = call.get("kv_cache_mode"), call.get("kv_cache")
    if cache is not None and policy == "cache":
        raise ValueError("accelerate: exit_policy='cache' expected Qwen-Image 2.1 calls without the prefix KV cache "
                         f"(its prefill and its later calls see different tokens), got kv_cache_mode={mode!r}; pass "
                         "use_kv_cache=False to QwenImage21Pipeline, or use exit_policy='drop'")
    return cache is not None and mode == "extract"


register(Family(
    name="qwenimage21",
    classes=("diffusers:QwenImage21Transformer2DModel",),
    pipelines={"diffusers:QwenImage21Pipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",),
                    streams={"QwenImage21TransformerBlock": (0, None, "hidden_states", None)}),
    full_depth_call=_prefill_runs_every_block,
    timestep_scale=1000.0,
    prediction="flow",
    param_roles={"t-embedder": ("time_text_embed.timestep_embedder.",),
                 "caption": ("txt_in.",),
                 "embedders": ("time_text_embed.", "img_in.", "txt_in.")},
    # About 0.72 of the block calls (0.70 without the KV cache's full-depth prefill): the pipeline's default 40 steps
    # at 1024 px (4096 target tokens) under Qwen-Image 2.1's scheduler (dynamic exponential shift, base/max shift
    # 0.5/0.9 over 256..8192 tokens, shift_terminal 0.02), calls per sigma bin (data end first)
    # [2, 3, 2, 3, 3, 4, 4, 5, 6, 8]. The ASE DiT shape mapped by trajectory position, over 32 blocks.
    presets={"ase-qwenimage21": ((32, 32, 32, 27, 27, 27, 22, 22, 17, 13), 32, "sigma")},
))
