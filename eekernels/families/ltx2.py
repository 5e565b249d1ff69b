"""LTX-2 (audio and video): diffusers' ``LTX2VideoTransformer3DModel`` (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``,
``LTX2ConditionPipeline``). Video latents ``(B, C, F, H, W)`` and audio latents ``(B, C, L, M)``, both denoised by
the same blocks.

Exit rule: ``transformer_blocks[:d]`` (``LTX2VideoTransformerBlock``: a video stream and an audio stream, each
attending to the other; not in diffusers' ``TransformerBlockRegistry``, so its streams are declared here), then the
model's own heads on both streams (``norm_out``/``proj_out`` on video, ``audio_norm_out``/``audio_proj_out`` on
audio). Both streams are outputs (``out_streams=2``): the cache policy replays the skipped blocks' residual on each.
Flow matching, t = sigma * 1000 (the scheduler's timesteps and the model's ``timestep`` argument).

Spatio-temporal guidance (the pipeline's ``spatio_temporal_guidance_blocks``, block 28 of 48 by default) perturbs a
block in its own model call: at a depth that skips that block, the call runs unperturbed. The preset below never
goes under depth 30, so the default STG block always runs.
"""
from eekernels.families import Family, PrefixExit, register

register(Family(
    name="ltx2",
    classes=("diffusers:LTX2VideoTransformer3DModel",),
    pipelines={"diffusers:LTX2Pipeline": ("transformer",),
               "diffusers:LTX2ImageToVideoPipeline": ("transformer",),
               "diffusers:LTX2ConditionPipeline": ("transformer",)},
    exit=PrefixExit(blocks=("transformer_blocks",),
                    streams={"LTX2VideoTransformerBlock": (0, 1, "hidden_states", "audio_hidden_states")},
                    out_streams=2),
    prediction="flow",
    param_roles={"t-embedder": ("time_embed.", "audio_time_embed.", "av_cross_attn_", "prompt_adaln.",
                                "audio_prompt_adaln."),
                 "caption": ("caption_projection.", "audio_caption_projection."),
                 "embedders": ("proj_in.", "audio_proj_in.", "time_embed.", "audio_time_embed.", "av_cross_attn_",
                               "caption_projection.", "audio_caption_projection.", "prompt_adaln.",
                               "audio_prompt_adaln.")},
    # LTX-2's 48 blocks over ten equal bins of sigma (data end first), written for its usual run: 768x512, 121
    # frames (6144 video tokens), under its scheduler's resolution-dependent exponential shift (mu from the token
    # count between base_shift 0.95 at 1024 and max_shift 2.05 at 4096, shift_terminal 0.1): 0.72 of the block
    # FLOPs over 40 steps, 0.73 over the pipeline's default 30 (0.70 either way without shift_terminal; 0.77 at
    # 4096 tokens). The shift puts most steps at sigma > 0.9, so the last bin decides the fraction
    # (tests/families/test_ltx2.py checks it).
    presets={"ase-ltx2": ((48, 48, 48, 48, 48, 48, 46, 42, 36, 30), 48, "sigma")},
))
